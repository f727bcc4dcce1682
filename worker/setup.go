package worker

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Defaults of StreamConfig.
const (
	DefaultAckWait        = 60 * time.Second
	DefaultMaxDeliver     = 5
	DefaultTaskDuplicates = time.Hour
	DefaultKVHistory      = 5
)

// StreamConfig is the JetStream section of the process config. The same value
// goes to Setup (stream duplicate windows) and to the task loops (consumer
// AckWait and MaxDeliver) so the two agree.
type StreamConfig struct {
	// AckWait is how long a delivered task may go without an ack or an
	// in-progress ack before it is redelivered (default 60s).
	AckWait time.Duration
	// MaxDeliver is how many times a task is delivered before it becomes a
	// dead letter (default 5).
	MaxDeliver int
	// Replicas of every stream and bucket. 0 (the default) keeps those of a run
	// that already exists on the server (its data stream's), so a resumed run is
	// never scaled down or up by accident, and is 1 for a new run (an embedded
	// server is a single node).
	Replicas int
	// MaxBytes caps the data stream; -1 (the default) leaves only the server's
	// and account's storage limits. The stream discards nothing: when full,
	// publishes fail instead of dropping old records.
	MaxBytes int64
	// DataDuplicates is the data stream's duplicate window (default
	// AckWait × MaxDeliver, the longest redelivery chain of a task whose
	// worker died). A shard whose handler ran far longer than that (kept alive
	// by in-progress acks) can still republish outside the window; consumers
	// drop such duplicates by key.
	DataDuplicates time.Duration
	// TaskDuplicates is the tasks stream's duplicate window (default 1h), so a
	// coordinator that restarts and republishes its plan adds nothing.
	TaskDuplicates time.Duration
	// KVHistory is the number of revisions kept per key (default 5, max 64).
	KVHistory int
}

// Validate checks c and fills defaults (Replicas 0 becomes 1: Setup resolves it
// first). Errors wrap ErrInvalidOption.
func (c *StreamConfig) Validate() error {
	switch {
	case c.AckWait < 0:
		return fmt.Errorf("%w: negative AckWait", ErrInvalidOption)
	case c.AckWait > 0 && c.AckWait < 100*time.Millisecond:
		return fmt.Errorf("%w: AckWait %v below 100ms", ErrInvalidOption, c.AckWait)
	case c.MaxDeliver < 0:
		return fmt.Errorf("%w: negative MaxDeliver", ErrInvalidOption)
	case c.Replicas < 0 || c.Replicas > 5:
		return fmt.Errorf("%w: Replicas %d (want 1..5)", ErrInvalidOption, c.Replicas)
	case c.MaxBytes < -1:
		return fmt.Errorf("%w: MaxBytes %d", ErrInvalidOption, c.MaxBytes)
	case c.DataDuplicates < 0 || c.TaskDuplicates < 0:
		return fmt.Errorf("%w: negative duplicate window", ErrInvalidOption)
	case c.KVHistory < 0 || c.KVHistory > 64:
		return fmt.Errorf("%w: KVHistory %d (want 1..64)", ErrInvalidOption, c.KVHistory)
	}
	if c.AckWait == 0 {
		c.AckWait = DefaultAckWait
	}
	if c.MaxDeliver == 0 {
		c.MaxDeliver = DefaultMaxDeliver
	}
	if c.Replicas == 0 {
		c.Replicas = 1
	}
	if c.MaxBytes == 0 {
		c.MaxBytes = -1
	}
	if c.DataDuplicates == 0 {
		c.DataDuplicates = c.AckWait * time.Duration(c.MaxDeliver)
	}
	if c.TaskDuplicates == 0 {
		c.TaskDuplicates = DefaultTaskDuplicates
	}
	if c.KVHistory == 0 {
		c.KVHistory = DefaultKVHistory
	}
	return nil
}

// Setup creates or updates, idempotently, everything a run needs: the tasks
// stream (WorkQueue), the data stream (Limits, DiscardNew), the dead-letter
// stream, the KV bucket, the object store and the students' gradient store, all on file storage. It fails
// (wrapping the JetStream error) if an existing stream cannot be updated to
// the wanted configuration, e.g. a changed retention policy. With cfg.Replicas 0
// the replicas of an existing run are kept (see RunReplicas).
func Setup(ctx context.Context, js jetstream.JetStream, names Names, cfg StreamConfig) error {
	if cfg.Replicas == 0 {
		have, ok, err := RunReplicas(ctx, js, names)
		if err != nil {
			return err
		}
		if ok {
			cfg.Replicas = have
		}
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	streams := []jetstream.StreamConfig{
		{
			Name:        names.TasksStream(),
			Description: "linearpatch shard tasks of run " + names.Run(),
			Subjects:    []string{names.TasksSubjects()},
			Retention:   jetstream.WorkQueuePolicy,
			Storage:     jetstream.FileStorage,
			Replicas:    cfg.Replicas,
			Duplicates:  cfg.TaskDuplicates,
			Discard:     jetstream.DiscardNew,
			MaxBytes:    -1,
			MaxMsgs:     -1,
		},
		{
			Name:        names.DataStream(),
			Description: "linearpatch record batches of run " + names.Run(),
			Subjects:    []string{names.DataSubjects()},
			Retention:   jetstream.LimitsPolicy,
			Storage:     jetstream.FileStorage,
			Replicas:    cfg.Replicas,
			Duplicates:  cfg.DataDuplicates,
			Discard:     jetstream.DiscardNew,
			MaxBytes:    cfg.MaxBytes,
			MaxMsgs:     -1,
		},
		{
			Name:        names.DeadStream(),
			Description: "linearpatch dead-letter records of run " + names.Run(),
			Subjects:    []string{names.DeadLetterSubject()},
			Retention:   jetstream.LimitsPolicy,
			Storage:     jetstream.FileStorage,
			Replicas:    cfg.Replicas,
			Duplicates:  cfg.DataDuplicates,
			Discard:     jetstream.DiscardNew,
			MaxBytes:    -1,
			MaxMsgs:     -1,
		},
	}
	for _, sc := range streams {
		if _, err := js.CreateOrUpdateStream(ctx, sc); err != nil {
			return fmt.Errorf("worker: set up stream %s: %w", sc.Name, err)
		}
	}
	if _, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      names.KVBucket(),
		Description: "linearpatch state of run " + names.Run(),
		History:     uint8(cfg.KVHistory),
		Storage:     jetstream.FileStorage,
		Replicas:    cfg.Replicas,
	}); err != nil {
		return fmt.Errorf("worker: set up kv bucket %s: %w", names.KVBucket(), err)
	}
	if _, err := js.CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{
		Bucket:      names.ObjectStore(),
		Description: "linearpatch objects of run " + names.Run(),
		Storage:     jetstream.FileStorage,
		Replicas:    cfg.Replicas,
	}); err != nil {
		return fmt.Errorf("worker: set up object store %s: %w", names.ObjectStore(), err)
	}
	if _, err := js.CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{
		Bucket:      names.GradStore(),
		Description: "linearpatch students' gradients and checkpoints of run " + names.Run(),
		Storage:     jetstream.FileStorage,
		Replicas:    cfg.Replicas,
	}); err != nil {
		return fmt.Errorf("worker: set up object store %s: %w", names.GradStore(), err)
	}
	return nil
}

// RunReplicas returns the replicas of a run that already exists on the server (those of
// its data stream, which Setup gives every stream and bucket of the run); ok is false when
// the run has no data stream yet.
func RunReplicas(ctx context.Context, js jetstream.JetStream, names Names) (replicas int, ok bool, err error) {
	s, err := js.Stream(ctx, names.DataStream())
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("worker: data stream of run %s: %w", names.Run(), err)
	}
	return max(s.CachedInfo().Config.Replicas, 1), true, nil
}
