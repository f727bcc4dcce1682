package worker

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// TestReadShard: ReadShard hands over exactly one shard's messages, in stream order,
// duplicates included, stops when fn says so, and reports a shard whose messages ran out.
func TestReadShard(t *testing.T) {
	_, _, js, names := setupRun(t, StreamConfig{})
	ctx := t.Context()
	var want []string
	publish := func(shard, window int, id string, done bool) {
		t.Helper()
		k := DataKey{Run: names.Run(), Phase: "cache", Shard: shard, Window: window, Done: done}
		if id == "" {
			id = MsgID(k)
		}
		if _, err := js.Publish(ctx, k.Subject(), []byte(id), jetstream.WithMsgID(id)); err != nil {
			t.Fatal(err)
		}
		if shard == 1 {
			want = append(want, k.Subject()+"="+id)
		}
	}
	for w := range 3 {
		publish(0, w, "", false)
		publish(1, w, "", false)
		publish(10, w, "", false) // "10" is not shard 1
	}
	publish(1, 1, "copy", false) // stored a second time (another id)
	publish(1, 0, "", true)
	publish(0, 0, "", true)
	publish(1, 3, "after", false) // after the marker

	var got []string
	read := func(stopAtDone bool) error {
		got = nil
		return ReadShard(ctx, js, names, "cache", 1, func(m Msg) (bool, error) {
			if err := m.Ack(); err != nil { // a stored message has nothing to settle
				t.Fatal(err)
			}
			got = append(got, m.Subject+"="+string(m.Data))
			return stopAtDone && m.Subject == names.DoneSubject("cache", 1), nil
		})
	}
	if err := read(true); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, want[:len(want)-1]) {
		t.Fatalf("read %q, want %q", got, want[:len(want)-1])
	}
	if err := read(false); !errors.Is(err, ErrShardNotInStream) || !slices.Equal(got, want) {
		t.Fatalf("read to the end: %v, %q; want ErrShardNotInStream after %q", err, got, want)
	}
	boom := errors.New("boom")
	if err := ReadShard(ctx, js, names, "cache", 1, func(Msg) (bool, error) { return false, boom }); !errors.Is(err, boom) {
		t.Fatalf("fn's error: got %v", err)
	}
	if err := ReadShard(ctx, js, names, "cache", 7, func(Msg) (bool, error) { return true, nil }); !errors.Is(err, ErrShardNotInStream) {
		t.Fatalf("a shard with no messages: %v, want ErrShardNotInStream", err)
	}
}

// TestReadShardBounded: with the server gone in the middle, ReadShard gives up after its
// stall bound with the failure, and a cancelled context ends it at once.
func TestReadShardBounded(t *testing.T) {
	defer func(r, s time.Duration) { readShardRequest, readShardStall = r, s }(readShardRequest, readShardStall)
	readShardRequest, readShardStall = 200*time.Millisecond, time.Second
	e, _, js, names := setupRun(t, StreamConfig{})
	for w := range 3 {
		k := DataKey{Run: names.Run(), Phase: "cache", Shard: 0, Window: w}
		if _, err := js.Publish(t.Context(), k.Subject(), []byte("x"), jetstream.WithMsgID(MsgID(k))); err != nil {
			t.Fatal(err)
		}
	}
	began := time.Now()
	n := 0
	err := ReadShard(t.Context(), js, names, "cache", 0, func(Msg) (bool, error) {
		n++
		e.Shutdown()
		return false, nil
	})
	took := time.Since(began)
	if err == nil || errors.Is(err, ErrShardNotInStream) || n != 1 || took > 10*time.Second {
		t.Fatalf("server gone after 1 message: %v after %d messages in %v; want a failure within the bound", err, n, took)
	}
	t.Logf("server gone: %v after %v", err, took.Round(time.Millisecond))

	ctx, cancel := context.WithCancel(t.Context())
	time.AfterFunc(300*time.Millisecond, cancel)
	readShardStall = time.Hour
	began = time.Now()
	err = ReadShard(ctx, js, names, "cache", 0, func(Msg) (bool, error) { return false, nil })
	if !errors.Is(err, context.Canceled) || time.Since(began) > 5*time.Second {
		t.Fatalf("cancelled: %v after %v", err, time.Since(began))
	}
}
