// Package worker is what every linearpatch worker shares: the NATS connection
// (an embedded nats-server or an external one), JetStream set-up namespaced by
// run id, the task ack/nak loop with in-progress acks and dead letters, a
// bounded idempotent publisher for data messages and a durable data consumer.
//
// Delivery is at least once everywhere: a task is acked only after its handler
// returned nil (its effects are durable), data messages carry a deterministic
// Nats-Msg-Id so a republish inside the stream's duplicate window is dropped by
// the server, and consumers drop what is left by key.
package worker
