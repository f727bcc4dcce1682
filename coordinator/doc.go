// Package coordinator plans a run, hands out shards, aggregates the calibration statistics,
// tracks progress and resumes after a restart.
//
// Its decisions live in a deterministic core (Core: events in, actions out, no clock, no
// I/O); the process that drives it (Coordinator) performs the actions over NATS JetStream
// and feeds back what happened.
//
// The run's protocol (plan, keys, subjects, markers and records) that the workers share lives
// in package protocol.
package coordinator
