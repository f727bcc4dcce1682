package coordinator

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"linearpatch/protocol"
	"linearpatch/worker"
)

// TestReadDeadStream: every record of the dead-letter stream reaches fn once, in order,
// those published while it runs included; it returns as soon as its context ends.
func TestReadDeadStream(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	js := startJetStream(t)
	names, err := worker.NewNames("r0123456789ab")
	if err != nil {
		t.Fatal(err)
	}
	if err := worker.Setup(ctx, js, names, worker.StreamConfig{}); err != nil {
		t.Fatal(err)
	}
	publish := func(i int) {
		if _, err := js.Publish(ctx, names.DeadLetterSubject(), []byte(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 3 {
		publish(i)
	}
	c := &Coordinator{o: Options{JS: js, Names: names}}
	var mu sync.Mutex
	var got []string
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- c.readDeadStream(rctx, 20*time.Millisecond, func(b []byte) {
			mu.Lock()
			got = append(got, string(b))
			mu.Unlock()
		})
	}()
	want := []string{"0", "1", "2", "3", "4"}
	time.Sleep(100 * time.Millisecond)
	publish(3)
	publish(4)
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		n := len(got)
		mu.Unlock()
		if n >= len(want) || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // nothing read twice
	stop()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("readDeadStream did not return after its context ended")
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(got, want) {
		t.Fatalf("read %v, want %v", got, want)
	}
}

// TestWatchDoneSeesEarlierRecords: a completion record put before the coordinator's watch
// began (after restore listed the bucket: a cache writer re-recording the shards of its
// manifest as the coordinator starts) still reaches the main loop; watching for updates
// only lost it, and a resumed run then waited for that shard forever.
func TestWatchDoneSeesEarlierRecords(t *testing.T) {
	ctx := t.Context()
	c, put := doneRecorder(t)
	put(7) // before the watch
	events := make(chan Event, 8)
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	go func() { _ = c.watchDone(wctx, events) }()
	time.Sleep(50 * time.Millisecond)
	put(8) // during it
	got := map[int]bool{}
	timeout := time.After(10 * time.Second)
	for len(got) < 2 {
		select {
		case ev := <-events:
			d, ok := ev.(EvShardDone)
			if !ok || d.Phase != protocol.PhaseCache {
				t.Fatalf("unexpected event %#v", ev)
			}
			got[d.Shard] = true
		case <-timeout:
			t.Fatalf("completion records seen: %v, want shards 7 (put before the watch) and 8", got)
		}
	}
}

// startJetStream starts an embedded server that takes anonymous clients, until the test
// ends, and returns a JetStream client of it.
func startJetStream(t *testing.T) jetstream.JetStream {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	srv, err := worker.StartEmbedded(ctx, t.TempDir(), worker.WithAllowAnonymous())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Shutdown)
	nc, err := worker.Connect(ctx, worker.ConnOptions{URL: srv.URL()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

// TestPollDone: the listing that backs the completion watch feeds each record once, those
// put before it started and after, without a watch.
func TestPollDone(t *testing.T) {
	ctx := t.Context()
	c, put := doneRecorder(t)
	put(3)
	events := make(chan Event, 8)
	pctx, stop := context.WithCancel(ctx)
	defer stop()
	go func() { _ = c.pollDone(pctx, events, 50*time.Millisecond) }()
	time.Sleep(120 * time.Millisecond)
	put(4)
	got := map[int]int{}
	timeout := time.After(5 * time.Second)
	for len(got) < 2 {
		select {
		case ev := <-events:
			got[ev.(EvShardDone).Shard]++
		case <-timeout:
			t.Fatalf("completions fed: %v, want shards 3 and 4", got)
		}
	}
	time.Sleep(200 * time.Millisecond) // several more polls: nothing fed twice
	select {
	case ev := <-events:
		t.Errorf("fed again: %#v", ev)
	default:
	}
}

// doneRecorder returns a coordinator of a fresh run (its bucket only, no loop running) and
// a function that records a cache shard done in that run's bucket.
func doneRecorder(t *testing.T) (*Coordinator, func(shard int)) {
	t.Helper()
	js := startJetStream(t)
	names, kv, put := runBucket(t, t.Context(), js, "r0123456789ab")
	c := &Coordinator{o: Options{JS: js, Names: names}, kv: kv, log: slog.New(slog.DiscardHandler)}
	return c, func(shard int) {
		t.Helper()
		put(protocol.DoneKey(protocol.PhaseCache, shard), protocol.ShardDone{Phase: protocol.PhaseCache, Shard: shard, Rows: 2})
	}
}
