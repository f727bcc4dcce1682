package coordinator

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"linearpatch/patch"
	"linearpatch/protocol"
	"linearpatch/worker"
)

// TestRunSeesDoneRecordedDuringRestore: a completion recorded after the coordinator read
// the bucket and before its watcher started (a resumed cache writer re-records the shards
// of its manifest at once, racing the coordinator's start) still completes the run. Before,
// the watcher saw only updates after its own start: the resumed run of
// TestRunStudentFailureOnce waited for that shard forever (cache done=21 of 22).
func TestRunSeesDoneRecordedDuringRestore(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	js := startJetStream(t)
	p := testPlan(t, 40, 100, 32)
	names, _, put := runBucket(t, ctx, js, p.RunID)
	// A run resumed in its cache phase: fitted, every stats shard done, every cache shard
	// but the last recorded done.
	put(protocol.KeyFit, protocol.FitResult{Start: 2, End: 4, Method: "none", Tokens: 1})
	for _, s := range p.Stats {
		put(protocol.DoneKey(protocol.PhaseStats, s.ID), protocol.ShardDone{Phase: protocol.PhaseStats, Shard: s.ID, Rows: s.Windows})
	}
	last := p.Cache[len(p.Cache)-1].ID
	for _, s := range p.Cache[:len(p.Cache)-1] {
		put(protocol.DoneKey(protocol.PhaseCache, s.ID), protocol.ShardDone{Phase: protocol.PhaseCache, Shard: s.ID, Rows: s.Windows})
	}
	c, err := New(Options{Plan: p, NC: js.Conn(), JS: js, Names: names, RunDir: t.TempDir(), Lease: 4 * time.Second}, 8, 32)
	if err != nil {
		t.Fatal(err)
	}
	c.afterRestore = func() {
		// The writer records the last shard between the coordinator's read and its watch.
		put(protocol.DoneKey(protocol.PhaseCache, last), protocol.ShardDone{Phase: protocol.PhaseCache, Shard: last, Rows: p.Cache[len(p.Cache)-1].Windows})
	}
	rctx, stop := context.WithTimeout(ctx, 15*time.Second)
	defer stop()
	if err := c.Run(rctx); err != nil {
		st := c.Status()
		t.Fatalf("the run did not finish: %v (cache done %d of %d, pending %v)", err, st.Done[protocol.PhaseCache], st.Total[protocol.PhaseCache], st.Pending[protocol.PhaseCache])
	}
}

// TestRunRepublishesMarkedShardMissingRecords: a resumed run whose data stream holds a
// shard's done marker but not all the records it counts (a server that lost messages it
// had acknowledged; the task itself was acked and is gone) publishes that shard's task
// again, so a teacher recomputes it; a shard whose marker and records are all there is
// left to the writer. Before, any marker kept the task from being published again, and the
// run waited for the shard forever.
func TestRunRepublishesMarkedShardMissingRecords(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	js := startJetStream(t)
	p := testPlan(t, 40, 100, 32)
	names, _, put := runBucket(t, ctx, js, p.RunID)
	publish := func(k worker.DataKey, data []byte) {
		t.Helper()
		if _, err := js.Publish(ctx, k.Subject(), data, jetstream.WithMsgID(worker.MsgID(k))); err != nil {
			t.Fatal(err)
		}
	}
	put(protocol.KeyFit, protocol.FitResult{Start: 2, End: 4, Method: "none", Tokens: 1})
	for _, s := range p.Stats {
		put(protocol.DoneKey(protocol.PhaseStats, s.ID), protocol.ShardDone{Phase: protocol.PhaseStats, Shard: s.ID, Rows: s.Windows})
	}
	// Shards 0 and 1 are not done; both markers count two records, and the stream holds both
	// of shard 0's but only one of shard 1's. The others are done.
	for _, s := range p.Cache[2:] {
		put(protocol.DoneKey(protocol.PhaseCache, s.ID), protocol.ShardDone{Phase: protocol.PhaseCache, Shard: s.ID, Rows: s.Windows})
	}
	for shard, records := range []int{2, 1} {
		first := p.Cache[shard].First
		for w := range records {
			publish(worker.DataKey{Run: p.RunID, Phase: string(protocol.PhaseCache), Shard: shard, Window: first + w}, []byte("record"))
		}
		b, _ := json.Marshal(protocol.DoneMarker{Phase: protocol.PhaseCache, Shard: shard, Messages: 2, Teacher: "t"})
		publish(worker.DataKey{Run: p.RunID, Phase: string(protocol.PhaseCache), Shard: shard, Done: true}, b)
	}
	var logs bytes.Buffer
	c, err := New(Options{Plan: p, NC: js.Conn(), JS: js, Names: names, RunDir: t.TempDir(), Lease: 4 * time.Second,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))}, 8, 32)
	if err != nil {
		t.Fatal(err)
	}
	rctx, stop := context.WithCancel(ctx)
	ran := make(chan error, 1)
	go func() { ran <- c.Run(rctx) }()
	tasks, err := js.Stream(ctx, names.TasksStream())
	if err != nil {
		t.Fatal(err)
	}
	var published []int
	deadline := time.Now().Add(10 * time.Second)
	for len(published) == 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
		info, err := tasks.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
			m, err := tasks.GetMsg(ctx, seq)
			if err != nil {
				continue
			}
			var task protocol.Task
			if json.Unmarshal(m.Data, &task) == nil && task.Phase == protocol.PhaseCache {
				published = append(published, task.Shard)
			}
		}
	}
	time.Sleep(200 * time.Millisecond) // nothing else comes
	stop()
	if err := <-ran; err != nil && !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	if !slices.Equal(published, []int{1}) {
		t.Fatalf("cache tasks published %v, want [1] (the marked shard missing a record)", published)
	}
	if !strings.Contains(logs.String(), "not all of its records") {
		t.Errorf("the republished task is not explained in the log:\n%s", logs.String())
	}
}

// TestRunRecordsStatsFileNotRecordedDone: a coordinator killed after writing a stats
// shard's file and before recording it done resumes and completes: the file is verified and
// recorded. Before, the file alone marked the shard complete, its redelivered records were
// acked as stale, nothing recorded it, and the stats phase waited for it forever. A file
// that does not verify is removed (and the shard rebuilt from the stream).
func TestRunRecordsStatsFileNotRecordedDone(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	js := startJetStream(t)
	p := testPlan(t, 40, 100, 32)
	names, kv, put := runBucket(t, ctx, js, p.RunID)
	put(protocol.KeyFit, protocol.FitResult{Start: 2, End: 4, Method: "none", Tokens: 1})
	for _, s := range p.Cache {
		put(protocol.DoneKey(protocol.PhaseCache, s.ID), protocol.ShardDone{Phase: protocol.PhaseCache, Shard: s.ID, Rows: s.Windows})
	}
	if len(p.Stats) < 2 {
		t.Fatalf("the plan has %d stats shards, the test needs 2", len(p.Stats))
	}
	for _, s := range p.Stats[2:] {
		put(protocol.DoneKey(protocol.PhaseStats, s.ID), protocol.ShardDone{Phase: protocol.PhaseStats, Shard: s.ID, Rows: s.Windows})
	}
	runDir := t.TempDir()
	c, err := New(Options{Plan: p, NC: js.Conn(), JS: js, Names: names, RunDir: runDir, Lease: 4 * time.Second}, 8, 32)
	if err != nil {
		t.Fatal(err)
	}
	// Shard 0's file is whole; shard 1's holds the wrong windows.
	const layers, dim = 4, 3
	for shard, offset := range []int{0, 1} {
		s := p.Stats[shard]
		st := patch.NewStats(layers, dim, p.Settings.NumPrune, p.Settings.SeqLen)
		for w := range s.Windows {
			ws := patch.WindowStats{Index: s.First + w + offset, Tokens: p.Settings.SeqLen, CosSum: make([]float64, layers-p.Settings.NumPrune+1)}
			for range layers + 1 {
				ws.AbsMean, ws.RotAbsMean = append(ws.AbsMean, make([]float64, dim)), append(ws.RotAbsMean, make([]float64, dim))
			}
			st.Windows = append(st.Windows, ws)
		}
		b, err := json.Marshal(st)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Dir(c.statsPath(shard)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(c.statsPath(shard), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	rctx, stop := context.WithCancel(ctx)
	ran := make(chan error, 1)
	go func() { ran <- c.Run(rctx) }()
	deadline := time.Now().Add(15 * time.Second)
	for {
		_, err := kv.Get(ctx, protocol.DoneKey(protocol.PhaseStats, 0))
		_, gone := os.Stat(c.statsPath(1))
		if err == nil && gone != nil {
			break
		}
		if time.Now().After(deadline) {
			stop()
			<-ran
			t.Fatalf("after 15 s: shard 0 recorded done: %v; shard 1's bad file removed: %v", err, gone)
		}
		time.Sleep(50 * time.Millisecond)
	}
	stop()
	<-ran
	var d protocol.ShardDone
	e, err := kv.Get(ctx, protocol.DoneKey(protocol.PhaseStats, 0))
	if err != nil || json.Unmarshal(e.Value(), &d) != nil || d.Rows != p.Stats[0].Windows || d.Tokens != int64(p.Stats[0].Windows*p.Settings.SeqLen) {
		t.Fatalf("shard 0 recorded as %s (%v)", e.Value(), err)
	}
	if _, err := kv.Get(ctx, protocol.DoneKey(protocol.PhaseStats, 1)); err == nil {
		t.Fatal("shard 1, whose file holds the wrong windows, was recorded done")
	}
	if st := c.Status(); st.Done[protocol.PhaseStats] != len(p.Stats)-1 {
		t.Errorf("the coordinator counts %d stats shards done, want %d", st.Done[protocol.PhaseStats], len(p.Stats)-1)
	}
}

// runBucket sets up run's streams and bucket on js and returns its names, its bucket and a
// function that stores v as JSON under key.
func runBucket(t *testing.T, ctx context.Context, js jetstream.JetStream, run string) (worker.Names, jetstream.KeyValue, func(key string, v any)) {
	t.Helper()
	names, err := worker.NewNames(run)
	if err != nil {
		t.Fatal(err)
	}
	if err := worker.Setup(ctx, js, names, worker.StreamConfig{}); err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(ctx, names.KVBucket())
	if err != nil {
		t.Fatal(err)
	}
	return names, kv, func(key string, v any) {
		t.Helper()
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := kv.Put(ctx, key, b); err != nil {
			t.Fatal(err)
		}
	}
}
