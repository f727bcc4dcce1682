package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// recorder counts handler calls per task id.
type recorder struct {
	mu    sync.Mutex
	calls map[string][]Task
}

func newRecorder() *recorder { return &recorder{calls: map[string][]Task{}} }

func (r *recorder) add(t Task) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls[t.ID] = append(r.calls[t.ID], t)
	return len(r.calls[t.ID])
}

func (r *recorder) get(id string) []Task {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Task(nil), r.calls[id]...)
}

func (r *recorder) total() (calls, ids int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range r.calls {
		calls += len(c)
	}
	return calls, len(r.calls)
}

var fastLoop = []LoopOption{WithNakBackoff(10*time.Millisecond, 50*time.Millisecond), WithFetchWait(200 * time.Millisecond)}

func newLoop(t *testing.T, js jetstream.JetStream, names Names, cfg StreamConfig, h Handler) *TaskLoop {
	t.Helper()
	opts := append([]LoopOption{WithLoopConfig(cfg), WithLoopLogger(testLogger())}, fastLoop...)
	l, err := NewTaskLoop(js, names, "teachers", []string{"acts", "stats"}, h, opts...)
	if err != nil {
		t.Fatalf("NewTaskLoop: %v", err)
	}
	return l
}

func publishTasks(t *testing.T, js jetstream.JetStream, names Names, phase string, n int) {
	t.Helper()
	for i := range n {
		id := fmt.Sprintf("%s-%d", phase, i)
		if err := PublishTask(t.Context(), js, names, phase, id, []byte("payload "+id)); err != nil {
			t.Fatalf("PublishTask %s: %v", id, err)
		}
	}
}

func TestNewTaskLoopErrors(t *testing.T) {
	_, _, js, names := setupRun(t, StreamConfig{})
	h := func(context.Context, Task) error { return nil }
	for _, tc := range []struct {
		name     string
		consumer string
		phases   []string
		h        Handler
		opts     []LoopOption
		want     error
	}{
		{"bad consumer", "a.b", []string{"acts"}, h, nil, ErrInvalidName},
		{"no phases", "c", nil, h, nil, ErrInvalidOption},
		{"bad phase", "c", []string{"a*"}, h, nil, ErrInvalidPhase},
		{"dup phase", "c", []string{"a", "a"}, h, nil, ErrInvalidOption},
		{"nil handler", "c", []string{"a"}, nil, nil, ErrInvalidOption},
		{"bad backoff", "c", []string{"a"}, h, []LoopOption{WithNakBackoff(time.Second, time.Millisecond)}, ErrInvalidOption},
		{"bad config", "c", []string{"a"}, h, []LoopOption{WithLoopConfig(StreamConfig{MaxDeliver: -1})}, ErrInvalidOption},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := NewTaskLoop(js, names, tc.consumer, tc.phases, tc.h, tc.opts...); !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
}

func TestPublishTaskDeduplicated(t *testing.T) {
	_, _, js, names := setupRun(t, StreamConfig{})
	for range 3 {
		if err := PublishTask(t.Context(), js, names, "acts", "shard-7", []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	if n := streamMsgs(t, js, names.TasksStream()); n != 1 {
		t.Fatalf("tasks stream holds %d messages, want 1", n)
	}
	if err := PublishTask(t.Context(), js, names, "a.b", "x", nil); !errors.Is(err, ErrInvalidPhase) {
		t.Fatalf("bad phase: %v", err)
	}
	if err := PublishTask(t.Context(), js, names, "acts", "", nil); !errors.Is(err, ErrInvalidOption) {
		t.Fatalf("empty id: %v", err)
	}
}

// Two competing loops: every task is handled exactly once and acked.
func TestTaskLoopCompeting(t *testing.T) {
	cfg := StreamConfig{AckWait: time.Second, MaxDeliver: 3}
	_, _, js, names := setupRun(t, cfg)
	rec := newRecorder()
	var byLoop [2]atomic.Int32
	mk := func(i int) *TaskLoop {
		return newLoop(t, js, names, cfg, func(ctx context.Context, task Task) error {
			rec.add(task)
			byLoop[i].Add(1)
			time.Sleep(5 * time.Millisecond)
			return nil
		})
	}
	runLoops(t, mk(0), mk(1))
	publishTasks(t, js, names, "acts", 15)
	publishTasks(t, js, names, "stats", 5)
	waitFor(t, 10*time.Second, "20 tasks", func() bool { _, ids := rec.total(); return ids == 20 })
	waitFor(t, 5*time.Second, "empty work queue", func() bool { return streamMsgs(t, js, names.TasksStream()) == 0 })
	time.Sleep(200 * time.Millisecond)
	if calls, ids := rec.total(); calls != 20 || ids != 20 {
		t.Fatalf("%d calls for %d tasks, want 20 each", calls, ids)
	}
	if byLoop[0].Load() == 0 || byLoop[1].Load() == 0 {
		t.Logf("one loop got every task: %d / %d", byLoop[0].Load(), byLoop[1].Load())
	}
	for _, id := range []string{"acts-0", "stats-4"} {
		c := rec.get(id)
		if c[0].Delivered != 1 || string(c[0].Payload) != "payload "+id || c[0].Phase != id[:len(id)-2] {
			t.Fatalf("task %s delivered as %+v", id, c[0])
		}
	}
}

// A failing handler naks: the task comes back and succeeds; a panic is
// recovered the same way and the loop keeps running.
func TestTaskLoopErrorAndPanicRedelivered(t *testing.T) {
	for _, tc := range []struct {
		name string
		fail func()
	}{
		{"error", nil},
		{"panic", func() { panic("boom") }},
		{"nil deref", func() {
			var m map[string]*int
			_ = *m["x"]
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := StreamConfig{AckWait: time.Second, MaxDeliver: 3}
			_, _, js, names := setupRun(t, cfg)
			rec := newRecorder()
			runLoops(t, newLoop(t, js, names, cfg, func(ctx context.Context, task Task) error {
				if rec.add(task) == 1 {
					if tc.fail != nil {
						tc.fail()
					}
					return errors.New("transient")
				}
				return nil
			}))
			publishTasks(t, js, names, "acts", 2)
			waitFor(t, 5*time.Second, "both tasks twice", func() bool { calls, _ := rec.total(); return calls == 4 })
			waitFor(t, 5*time.Second, "empty work queue", func() bool { return streamMsgs(t, js, names.TasksStream()) == 0 })
			for _, id := range []string{"acts-0", "acts-1"} {
				c := rec.get(id)
				if len(c) != 2 || c[0].Delivered != 1 || c[1].Delivered != 2 {
					t.Fatalf("task %s: %+v", id, c)
				}
			}
			if n := streamMsgs(t, js, names.DeadStream()); n != 0 {
				t.Fatalf("%d dead letters", n)
			}
		})
	}
}

// A handler running 3× AckWait is kept alive by in-progress acks: it completes
// once and is never redelivered to the competing loop.
func TestTaskLoopLongHandlerInProgress(t *testing.T) {
	if testing.Short() {
		t.Skip("runs 4s")
	}
	t.Parallel()
	cfg := StreamConfig{AckWait: time.Second, MaxDeliver: 5}
	_, _, js, names := setupRun(t, cfg)
	rec := newRecorder()
	h := func(ctx context.Context, task Task) error {
		rec.add(task)
		select {
		case <-time.After(3 * time.Second):
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	runLoops(t, newLoop(t, js, names, cfg, h), newLoop(t, js, names, cfg, h))
	publishTasks(t, js, names, "acts", 1)
	waitFor(t, 10*time.Second, "task acked", func() bool {
		_, ids := rec.total()
		return ids == 1 && streamMsgs(t, js, names.TasksStream()) == 0
	})
	time.Sleep(1500 * time.Millisecond) // > AckWait: a lost in-progress would show now
	if c := rec.get("acts-0"); len(c) != 1 {
		t.Fatalf("long task handled %d times, want 1", len(c))
	}
	info, err := js.Consumer(t.Context(), names.TasksStream(), "teachers")
	if err != nil {
		t.Fatal(err)
	}
	ci, err := info.Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if ci.NumRedelivered != 0 || ci.NumAckPending != 0 {
		t.Fatalf("consumer redelivered %d, ack pending %d", ci.NumRedelivered, ci.NumAckPending)
	}
}

// A task failing on every delivery becomes a dead-letter record and leaves the
// work queue.
func TestTaskLoopDeadLetter(t *testing.T) {
	cfg := StreamConfig{AckWait: time.Second, MaxDeliver: 3}
	_, _, js, names := setupRun(t, cfg)
	rec := newRecorder()
	clock := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	opts := append([]LoopOption{WithLoopConfig(cfg), WithLoopLogger(testLogger()), WithClock(func() time.Time { return clock })}, fastLoop...)
	l, err := NewTaskLoop(js, names, "teachers", []string{"acts"}, func(ctx context.Context, task Task) error {
		n := rec.add(task)
		if n == 2 {
			panic("second delivery panics")
		}
		return fmt.Errorf("attempt %d failed", n)
	}, opts...)
	if err != nil {
		t.Fatal(err)
	}
	runLoops(t, l)
	publishTasks(t, js, names, "acts", 1)
	waitFor(t, 10*time.Second, "dead letter", func() bool { return streamMsgs(t, js, names.DeadStream()) == 1 })
	waitFor(t, 5*time.Second, "empty work queue", func() bool { return streamMsgs(t, js, names.TasksStream()) == 0 })
	if c := rec.get("acts-0"); len(c) != 3 {
		t.Fatalf("handled %d times, want MaxDeliver=3", len(c))
	}
	s, err := js.Stream(t.Context(), names.DeadStream())
	if err != nil {
		t.Fatal(err)
	}
	raw, err := s.GetLastMsgForSubject(t.Context(), names.DeadLetterSubject())
	if err != nil {
		t.Fatal(err)
	}
	var d DeadLetter
	if err := json.Unmarshal(raw.Data, &d); err != nil {
		t.Fatal(err)
	}
	want := DeadLetter{TaskID: "acts-0", Phase: "acts", Payload: []byte("payload acts-0"), Error: "attempt 3 failed",
		Deliveries: 3, Consumer: "teachers", StreamSeq: 1, Time: clock}
	if fmt.Sprint(d) != fmt.Sprint(want) {
		t.Fatalf("dead letter %+v, want %+v", d, want)
	}
}

// A consumer that never acks exhausts MaxDeliver on the server; the advisory
// becomes a dead letter with the task's payload.
func TestWatchDeadLetters(t *testing.T) {
	_, _, js, names := setupRun(t, StreamConfig{})
	ctx, cancel := context.WithCancel(t.Context())
	got := make(chan DeadLetter, 1)
	done := make(chan error, 1)
	go func() {
		done <- WatchDeadLetters(ctx, js, names, "teachers", func(d DeadLetter) { got <- d }, testLogger())
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("WatchDeadLetters: %v", err)
		}
	}()

	cons, err := js.CreateOrUpdateConsumer(t.Context(), names.TasksStream(), jetstream.ConsumerConfig{
		Durable: "teachers", AckPolicy: jetstream.AckExplicitPolicy, AckWait: 200 * time.Millisecond,
		MaxDeliver: 2, FilterSubject: names.TaskSubject("acts"),
	})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // let the watcher subscribe
	publishTasks(t, js, names, "acts", 1)
	for range 2 { // receive and drop on the floor
		if _, err := cons.Next(jetstream.FetchMaxWait(2 * time.Second)); err != nil {
			t.Fatalf("fetch: %v", err)
		}
	}
	// The server notices the exhausted message only when the consumer is
	// touched again (a pull, as the loops of live workers do, or an info).
	if _, err := cons.Next(jetstream.FetchMaxWait(500 * time.Millisecond)); !errors.Is(err, nats.ErrTimeout) {
		t.Fatalf("third fetch: %v, want timeout", err)
	}
	select {
	case d := <-got:
		if d.TaskID != "acts-0" || d.Phase != "acts" || string(d.Payload) != "payload acts-0" || d.Deliveries != 2 {
			t.Fatalf("dead letter %+v", d)
		}
	case err := <-done:
		t.Fatalf("WatchDeadLetters returned early: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("no dead letter from the advisory")
	}
	if n := streamMsgs(t, js, names.DeadStream()); n != 1 {
		t.Fatalf("dead stream holds %d records, want 1", n)
	}
}

// Loops and consumers stop with an error when their connection is closed
// instead of waiting for a reconnect that cannot come.
func TestClosedConnectionEndsRun(t *testing.T) {
	e, _, _, names := setupRun(t, StreamConfig{})
	nc, js := connect(t, e.URL())
	l := newLoop(t, js, names, StreamConfig{}, func(context.Context, Task) error { return nil })
	errs := make(chan error, 2)
	go func() { errs <- l.Run(t.Context()) }()
	go func() {
		errs <- Consume(t.Context(), js, names, "cache", "", func(context.Context, Msg) error { return nil })
	}()
	time.Sleep(300 * time.Millisecond)
	nc.Close()
	for range 2 {
		select {
		case err := <-errs:
			if !errors.Is(err, nats.ErrConnectionClosed) {
				t.Fatalf("err = %v, want ErrConnectionClosed", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("still running on a closed connection")
		}
	}
}
