package worker

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"
)

// The reliability feature "restart the nats-server mid-run: the run
// completes": a teacher loop and a cache consumer keep their connection while
// the server is stopped and a new one is started on the same store and port;
// every task is done, every record is stored once.
func TestServerRestartMidRun(t *testing.T) {
	if testing.Short() {
		t.Skip("restarts a server")
	}
	t.Parallel()
	const tasks, chunks = 20, 3
	dir := t.TempDir()
	cfg := StreamConfig{AckWait: time.Second, MaxDeliver: 10}
	a := startServerIn(t, dir)
	port := a.Port()
	nc, js := connect(t, a.URL())
	names := testNames(t)
	if err := Setup(t.Context(), js, names, cfg); err != nil {
		t.Fatal(err)
	}

	// Teacher: each task publishes its shard's chunks and acks once they are durable.
	rec := newRecorder()
	runLoops(t, newLoop(t, js, names, cfg, func(ctx context.Context, task Task) error {
		shard, err := strconv.Atoi(string(task.Payload))
		if err != nil {
			return err
		}
		p, err := NewPublisher(js, WithAckTimeout(time.Second), WithPublisherLogger(testLogger()))
		if err != nil {
			return err
		}
		for c := range chunks {
			k := DataKey{Run: names.Run(), Phase: task.Phase, Shard: shard, Chunk: c}
			if err := p.Publish(ctx, k.Subject(), MsgID(k), []byte(k.Subject()), nil); err != nil {
				return err
			}
			time.Sleep(5 * time.Millisecond)
		}
		if err := p.Flush(ctx); err != nil {
			return err
		}
		rec.add(task)
		return nil
	}))

	// Cache writer: keeps every subject once.
	var mu sync.Mutex
	seen := map[string]int{}
	stop := consumeUntil(t, func(ctx context.Context) error {
		return Consume(ctx, js, names, "cache", "", func(ctx context.Context, m Msg) error {
			mu.Lock()
			seen[m.Subject]++
			mu.Unlock()
			return m.Ack()
		}, WithConsumeAckWait(time.Second), WithConsumeLogger(testLogger()))
	})

	publish := func(from, to int) {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		for i := from; i < to; i++ {
			if err := PublishTask(ctx, js, names, "acts", fmt.Sprint("shard-", i), []byte(strconv.Itoa(i))); err != nil {
				t.Fatalf("PublishTask %d: %v", i, err)
			}
		}
	}
	publish(0, tasks/2)
	waitFor(t, 10*time.Second, "a few tasks before the restart", func() bool { _, ids := rec.total(); return ids >= 3 })

	a.Shutdown()
	waitFor(t, 5*time.Second, "client to notice", func() bool { return !nc.IsConnected() })
	time.Sleep(100 * time.Millisecond)
	b := startServerIn(t, dir, WithListen("127.0.0.1", port))
	if b.URL() != a.URL() {
		t.Fatalf("new server at %s, old at %s", b.URL(), a.URL())
	}
	publish(tasks/2, tasks) // retried until the client is back

	waitFor(t, 20*time.Second, "every task", func() bool { _, ids := rec.total(); return ids == tasks })
	waitFor(t, 10*time.Second, "every record at the cache", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(seen) == tasks*chunks
	})
	if err := stop(); err != nil {
		t.Fatalf("Consume: %v", err)
	}
	if nc.Stats().Reconnects == 0 {
		t.Fatal("client never reconnected")
	}
	if n := streamMsgs(t, js, names.DataStream()); n != tasks*chunks {
		t.Fatalf("data stream holds %d records, want %d (a redelivered shard doubled rows)", n, tasks*chunks)
	}
	waitFor(t, 5*time.Second, "empty work queue", func() bool { return streamMsgs(t, js, names.TasksStream()) == 0 })
	calls, _ := rec.total()
	t.Logf("%d tasks acked after %d successful handler runs, %d reconnects", tasks, calls, nc.Stats().Reconnects)
}
