package worker

import (
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

func TestStreamConfigValidate(t *testing.T) {
	var c StreamConfig
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	want := StreamConfig{AckWait: 60 * time.Second, MaxDeliver: 5, Replicas: 1, MaxBytes: -1,
		DataDuplicates: 5 * time.Minute, TaskDuplicates: time.Hour, KVHistory: 5}
	if c != want {
		t.Fatalf("defaults %+v, want %+v", c, want)
	}
	for name, bad := range map[string]StreamConfig{
		"negative ack wait": {AckWait: -1},
		"tiny ack wait":     {AckWait: time.Millisecond},
		"negative deliver":  {MaxDeliver: -1},
		"replicas":          {Replicas: 7},
		"max bytes":         {MaxBytes: -2},
		"history":           {KVHistory: 65},
		"dup window":        {DataDuplicates: -time.Second},
	} {
		t.Run(name, func(t *testing.T) {
			if err := bad.Validate(); !errors.Is(err, ErrInvalidOption) {
				t.Fatalf("Validate = %v, want ErrInvalidOption", err)
			}
		})
	}
}

func TestSetupIdempotent(t *testing.T) {
	cfg := StreamConfig{AckWait: time.Second, MaxDeliver: 3}
	_, _, js, names := setupRun(t, cfg)
	if err := Setup(t.Context(), js, names, cfg); err != nil {
		t.Fatalf("second Setup: %v", err)
	}
	check := func(name string, ret jetstream.RetentionPolicy, dup time.Duration) {
		t.Helper()
		s, err := js.Stream(t.Context(), name)
		if err != nil {
			t.Fatalf("stream %s: %v", name, err)
		}
		c := s.CachedInfo().Config
		if c.Retention != ret || c.Storage != jetstream.FileStorage || c.Duplicates != dup || c.Discard != jetstream.DiscardNew {
			t.Fatalf("stream %s config %+v", name, c)
		}
	}
	check(names.TasksStream(), jetstream.WorkQueuePolicy, DefaultTaskDuplicates)
	check(names.DataStream(), jetstream.LimitsPolicy, 3*time.Second)
	check(names.DeadStream(), jetstream.LimitsPolicy, 3*time.Second)
	kv, err := js.KeyValue(t.Context(), names.KVBucket())
	if err != nil {
		t.Fatalf("kv: %v", err)
	}
	st, err := kv.Status(t.Context())
	if err != nil || st.History() != DefaultKVHistory {
		t.Fatalf("kv status %v, %v", st, err)
	}
	if _, err := js.ObjectStore(t.Context(), names.ObjectStore()); err != nil {
		t.Fatalf("object store: %v", err)
	}

	// A changed config updates the streams in place.
	cfg.AckWait = 2 * time.Second
	if err := Setup(t.Context(), js, names, cfg); err != nil {
		t.Fatalf("Setup with new AckWait: %v", err)
	}
	check(names.DataStream(), jetstream.LimitsPolicy, 6*time.Second)
}
