package worker

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// consumeUntil runs Consume in the background; the returned stop cancels it
// and returns its error.
func consumeUntil(t *testing.T, run func(ctx context.Context) error) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- run(ctx) }()
	var once sync.Once
	var err error
	stop = func() error {
		once.Do(func() { cancel(); err = <-done })
		return err
	}
	t.Cleanup(func() { _ = stop() })
	return stop
}

func publishData(t *testing.T, p *Publisher, names Names, phase string, shard, n int) {
	t.Helper()
	for i := range n {
		k := DataKey{Run: names.Run(), Phase: phase, Shard: shard, Chunk: i}
		if err := p.Publish(t.Context(), k.Subject(), MsgID(k), []byte(k.Subject()), nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
}

func TestConsumeFilterAndAck(t *testing.T) {
	_, _, js, names := setupRun(t, StreamConfig{})
	p, err := NewPublisher(js)
	if err != nil {
		t.Fatal(err)
	}
	publishData(t, p, names, "acts", 0, 5)
	publishData(t, p, names, "stats", 0, 3)

	var mu sync.Mutex
	got := map[string]int{}
	stop := consumeUntil(t, func(ctx context.Context) error {
		return Consume(ctx, js, names, "cache", names.DataFilter("acts"), func(ctx context.Context, m Msg) error {
			k, err := names.ParseDataSubject(m.Subject)
			if err != nil || k.Phase != "acts" || string(m.Data) != m.Subject {
				t.Errorf("unexpected message %s: %v", m.Subject, err)
			}
			if err := m.AckSync(ctx); err != nil {
				return err
			}
			mu.Lock() // counted once acked: the stop below never cuts an ack short
			got[m.Subject]++
			mu.Unlock()
			return nil
		}, WithConsumeAckWait(time.Second), WithConsumeLogger(testLogger()))
	})
	count := func() int { mu.Lock(); defer mu.Unlock(); return len(got) }
	waitFor(t, 5*time.Second, "5 acts messages", func() bool { return count() == 5 })
	if err := stop(); err != nil {
		t.Fatalf("Consume: %v", err)
	}
	c, err := js.Consumer(t.Context(), names.DataStream(), "cache")
	if err != nil {
		t.Fatal(err)
	}
	ci, err := c.Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if ci.NumAckPending != 0 || ci.NumPending != 0 || ci.AckFloor.Stream != 5 {
		t.Fatalf("consumer state %+v", ci)
	}
	for s, n := range got {
		if n != 1 {
			t.Fatalf("%s delivered %d times", s, n)
		}
	}
}

// An unacked message comes back after AckWait; an error from fn stops Consume
// and naks the message, which the next Consume gets again.
func TestConsumeRedelivery(t *testing.T) {
	_, _, js, names := setupRun(t, StreamConfig{})
	p, err := NewPublisher(js)
	if err != nil {
		t.Fatal(err)
	}
	publishData(t, p, names, "acts", 0, 1)
	opts := []ConsumeOption{WithConsumeAckWait(300 * time.Millisecond), WithConsumeLogger(testLogger())}

	deliveries := make(chan int, 10)
	boom := errors.New("disk full")
	stop := consumeUntil(t, func(ctx context.Context) error {
		return Consume(ctx, js, names, "cache", "", func(ctx context.Context, m Msg) error {
			deliveries <- m.Delivered
			switch m.Delivered {
			case 1:
				return nil // forgot to ack: AckWait brings it back
			case 2:
				return boom
			}
			return m.Ack()
		}, opts...)
	})
	for want := 1; want <= 2; want++ {
		select {
		case d := <-deliveries:
			if d != want {
				t.Fatalf("delivery %d reported as %d", want, d)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no delivery %d", want)
		}
	}
	if err := stop(); !errors.Is(err, boom) {
		t.Fatalf("Consume = %v, want %v", err, boom)
	}
	stop = consumeUntil(t, func(ctx context.Context) error {
		return Consume(ctx, js, names, "cache", "", func(ctx context.Context, m Msg) error {
			deliveries <- m.Delivered
			return m.Ack()
		}, opts...)
	})
	select {
	case d := <-deliveries:
		// At least the third delivery: a pull the stopped consumer left pending may have
		// taken one more delivery that then ran out its AckWait.
		if d < 3 {
			t.Fatalf("delivery after the nak reported as %d, want ≥ 3", d)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("nak'd message not redelivered")
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}

func TestConsumeErrors(t *testing.T) {
	_, _, js, names := setupRun(t, StreamConfig{})
	fn := func(context.Context, Msg) error { return nil }
	for _, tc := range []struct {
		name, consumer, filter string
		opts                   []ConsumeOption
		want                   error
	}{
		{"bad name", "a.b", "", nil, ErrInvalidName},
		{"foreign filter", "c", "lp.other.data.>", nil, ErrInvalidOption},
		{"task filter", "c", names.TaskSubject("acts"), nil, ErrInvalidOption},
		{"prefix only", "c", "lp.run-1.data.", nil, ErrInvalidOption},
		{"bad ack wait", "c", "", []ConsumeOption{WithConsumeAckWait(time.Millisecond)}, ErrInvalidOption},
		{"bad max deliver", "c", "", []ConsumeOption{WithConsumeMaxDeliver(0)}, ErrInvalidOption},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := Consume(t.Context(), js, names, tc.consumer, tc.filter, fn, tc.opts...); !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
	// A fn cut short by the caller's shutdown is a stop, not a failure.
	pp, err := NewPublisher(js)
	if err != nil {
		t.Fatal(err)
	}
	publishData(t, pp, names, "acts", 1, 1)
	stopCtx, stopNow := context.WithCancel(t.Context())
	started := make(chan struct{})
	go func() { <-started; stopNow() }()
	var once sync.Once
	err = Consume(stopCtx, js, names, "stopped", "", func(ctx context.Context, m Msg) error {
		once.Do(func() { close(started) })
		<-ctx.Done()
		return m.AckSync(ctx)
	})
	if err != nil {
		t.Fatalf("fn stopped by the shutdown: Consume returned %v, want nil", err)
	}
	// A panicking fn is an error, not a crash.
	publishData(t, pp, names, "acts", 0, 1)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	err = Consume(ctx, js, names, "c", "", func(context.Context, Msg) error { panic("bad row") })
	if !errors.Is(err, ErrHandlerPanic) {
		t.Fatalf("panicking fn: %v", err)
	}
}

// TestConsumeSoleClientReplaysUnacked: messages a dead client left delivered but unacked come
// back at once to a sole client, long before AckWait; a later sole client with nothing pending
// reuses the consumer as it is.
func TestConsumeSoleClientReplaysUnacked(t *testing.T) {
	_, _, js, names := setupRun(t, StreamConfig{})
	p, err := NewPublisher(js)
	if err != nil {
		t.Fatal(err)
	}
	publishData(t, p, names, "acts", 0, 6)
	ackWait := WithConsumeAckWait(time.Minute)
	var mu sync.Mutex
	got := map[string]int{}
	count := func() int { mu.Lock(); defer mu.Unlock(); return len(got) }
	consume := func(ack func(m Msg) bool, opts ...ConsumeOption) func() error {
		return consumeUntil(t, func(ctx context.Context) error {
			return Consume(ctx, js, names, "cache", "", func(ctx context.Context, m Msg) error {
				// a message counts once handled (acked when asked), so stopping a client
				// right after the count it waits for never interrupts an ack
				if ack(m) {
					if err := m.AckSync(ctx); err != nil {
						return err
					}
				}
				mu.Lock()
				got[m.Subject]++
				mu.Unlock()
				return nil
			}, append([]ConsumeOption{ackWait, WithConsumeLogger(testLogger())}, opts...)...)
		})
	}
	// the first client acks chunks 0 and 1, holds the rest unacked, and dies
	stop := consume(func(m Msg) bool { k, _ := names.ParseDataSubject(m.Subject); return k.Chunk < 2 })
	waitFor(t, 5*time.Second, "6 deliveries", func() bool { return count() == 6 })
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	// a plain client does not see them before AckWait
	got = map[string]int{}
	stop = consume(func(Msg) bool { return true })
	time.Sleep(time.Second)
	if n := count(); n != 0 {
		t.Fatalf("a plain client got %d pending messages before AckWait", n)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	// a sole client gets the 4 unacked ones at once
	stop = consume(func(Msg) bool { return true }, WithSoleClient())
	waitFor(t, 5*time.Second, "the 4 unacked messages", func() bool { return count() == 4 })
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	for s := range got {
		if k, _ := names.ParseDataSubject(s); k.Chunk < 2 {
			t.Fatalf("acked message %s delivered again", s)
		}
	}
	// nothing pending now: the next sole client keeps the consumer (its start sequence) and
	// gets nothing
	got = map[string]int{}
	stop = consume(func(Msg) bool { return true }, WithSoleClient())
	time.Sleep(time.Second)
	if err := stop(); err != nil || count() != 0 {
		t.Fatalf("idle sole client: err %v, %d deliveries", err, count())
	}
}

// TestConsumeConsumerAheadOfStream: a durable consumer whose delivered sequence is past the
// stream's last one (a server that lost the last messages it had stored but kept the
// consumer state that counted them) is re-created, so the messages stored next — which
// take those sequences again — are delivered, not skipped.
func TestConsumeConsumerAheadOfStream(t *testing.T) {
	_, _, js, names := setupRun(t, StreamConfig{})
	p, err := NewPublisher(js)
	if err != nil {
		t.Fatal(err)
	}
	publishData(t, p, names, "acts", 0, 3) // sequences 1..3
	// The state a consumer has after the stream lost sequences 4..9 it had delivered and acked.
	if _, err := js.CreateOrUpdateConsumer(t.Context(), names.DataStream(), jetstream.ConsumerConfig{Durable: "cache",
		DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: 10, AckPolicy: jetstream.AckExplicitPolicy,
		FilterSubject: names.DataSubjects()}); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var got []string
	stop := consumeUntil(t, func(ctx context.Context) error {
		return Consume(ctx, js, names, "cache", "", func(ctx context.Context, m Msg) error {
			mu.Lock()
			got = append(got, m.Subject)
			mu.Unlock()
			return m.AckSync(ctx)
		}, WithSoleClient(), WithConsumeLogger(testLogger()))
	})
	waitFor(t, 5*time.Second, "the consumer re-created from the stream's end", func() bool {
		c, err := js.Consumer(t.Context(), names.DataStream(), "cache")
		return err == nil && c.CachedInfo().Config.OptStartSeq == 4
	})
	publishData(t, p, names, "acts", 1, 2) // republished records: sequences 4 and 5
	waitFor(t, 5*time.Second, "the 2 messages stored after the loss", func() bool { mu.Lock(); defer mu.Unlock(); return len(got) == 2 })
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	for _, s := range got {
		if k, _ := names.ParseDataSubject(s); k.Shard != 1 {
			t.Fatalf("delivered %s, stored before the loss and acked", s)
		}
	}
}
