package student

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// TestDataGivesUpOnStalledManifest: a poll for a shard missing from a manifest that nothing
// adds to logs what it waits for and ends with ErrShardMissing once the manifest has not
// changed for the stall limit (the offline student used to wait forever, silently).
func TestDataGivesUpOnStalledManifest(t *testing.T) {
	fx := newFixture(t, t.TempDir(), fixtureOpts{trainShards: 2, validShards: 1, perShard: 3})
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	d, err := NewShardData(fx.dir, fx.meta, []ShardSpec{{5, 3}}, nil, WithManifestPoll(5*time.Millisecond),
		WithManifestStall(200*time.Millisecond, 50*time.Millisecond, log))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	_, err = d.fetch(ctx, []WindowRef{{5, 0}})
	if !errors.Is(err, ErrShardMissing) {
		t.Fatalf("fetch of a shard nothing produces: %v, want ErrShardMissing", err)
	}
	if el := time.Since(start); el < 200*time.Millisecond || el > 10*time.Second {
		t.Errorf("gave up after %v, want about the 200ms stall limit", el)
	}
	if !strings.Contains(err.Error(), "shard 5") {
		t.Errorf("error %q does not name the shard", err)
	}
	if l := logs.String(); !strings.Contains(l, "waiting for a shard") || !strings.Contains(l, "shard=5") {
		t.Errorf("the wait was not logged: %q", l)
	}
	if _, err := NewShardData(fx.dir, fx.meta, []ShardSpec{{5, 3}}, nil, WithManifestStall(-time.Second, time.Second, nil)); !errors.Is(err, ErrOptions) {
		t.Errorf("negative stall limit: %v, want ErrOptions", err)
	}
}
