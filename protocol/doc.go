// Package protocol is the contract every process of a run speaks: the coordinator, the
// teachers, the cache writer and the student. It holds the run's plan (settings, phases,
// splits, shards, run ids and plan versions), the names of the run's state in its JetStream
// KV bucket and object store, the subjects and durable names shared over NATS, the records
// and markers the workers exchange (tasks, done markers, shard completions, progress,
// recomputation requests, the fit, the student's status and result), their encodings, and
// the files of a run directory.
//
// It decides nothing and drives nothing: the coordinator (package coordinator) plans and
// tracks a run with these types, and every worker imports this package rather than the
// coordinator.
package protocol
