package worker

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"
)

func TestPublisherDeduplicates(t *testing.T) {
	_, _, js, names := setupRun(t, StreamConfig{})
	p, err := NewPublisher(js)
	if err != nil {
		t.Fatal(err)
	}
	key := DataKey{Run: names.Run(), Phase: "acts", Shard: 1, Window: 2, Chunk: 3}
	for range 2 {
		if err := p.Publish(t.Context(), key.Subject(), MsgID(key), []byte("rows"), map[string]string{"Lp-Rows": "4"}); err != nil {
			t.Fatal(err)
		}
		if err := p.Flush(t.Context()); err != nil { // two separate acks: the second is a duplicate
			t.Fatal(err)
		}
	}
	if got, want := p.Stats(), (PublisherStats{Stored: 1, Duplicates: 1}); got != want {
		t.Fatalf("stats %+v, want %+v", got, want)
	}
	if n := streamMsgs(t, js, names.DataStream()); n != 1 {
		t.Fatalf("data stream holds %d messages, want 1", n)
	}
	s, err := js.Stream(t.Context(), names.DataStream())
	if err != nil {
		t.Fatal(err)
	}
	raw, err := s.GetMsg(t.Context(), 1)
	if err != nil {
		t.Fatal(err)
	}
	if string(raw.Data) != "rows" || raw.Header.Get("Lp-Rows") != "4" || raw.Header.Get("Nats-Msg-Id") != MsgID(key) {
		t.Fatalf("stored %q with headers %v", raw.Data, raw.Header)
	}
}

func TestPublisherWindow(t *testing.T) {
	_, _, js, names := setupRun(t, StreamConfig{})
	p, err := NewPublisher(js, WithMaxPending(4))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		if err := p.Publish(t.Context(), names.DataSubject("acts", 0, 0, i), fmt.Sprint(i), make([]byte, 1000), nil); err != nil {
			t.Fatal(err)
		}
		if p.Pending() > 4 {
			t.Fatalf("%d pending, window is 4", p.Pending())
		}
	}
	if err := p.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	if p.Pending() != 0 || p.Stats().Stored != 50 {
		t.Fatalf("pending %d, stats %+v", p.Pending(), p.Stats())
	}
	if n := streamMsgs(t, js, names.DataStream()); n != 50 {
		t.Fatalf("data stream holds %d messages, want 50", n)
	}
}

func TestPublisherMaxPayload(t *testing.T) {
	for _, tc := range []struct {
		name       string
		serverMax  int
		size       int
		wantTooBig bool
	}{
		{"fits 1MiB", 0, DefaultMaxPayload - 200, false},
		{"payload alone 1MiB", 0, DefaultMaxPayload, true},
		{"2MiB on 1MiB server", 0, 2 << 20, true},
		{"2MiB on 8MiB server", 8 << 20, 2 << 20, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var opts []ServerOption
			if tc.serverMax > 0 {
				opts = append(opts, WithMaxPayload(tc.serverMax))
			}
			_, _, js, names := setupRun(t, StreamConfig{}, opts...)
			p, err := NewPublisher(js)
			if err != nil {
				t.Fatal(err)
			}
			subj := names.DataSubject("acts", 0, 0, 0)
			err = p.Publish(t.Context(), subj, "id", make([]byte, tc.size), nil)
			if tc.wantTooBig {
				var tl *TooLargeError
				if !errors.Is(err, ErrTooLarge) || !errors.As(err, &tl) || tl.Size <= tl.Limit || tl.Limit != MaxPayload(js.Conn()) {
					t.Fatalf("err = %v, want *TooLargeError", err)
				}
				// Not sticky: the caller chunks and goes on.
				if err := p.Publish(t.Context(), subj, "id", []byte("small"), nil); err != nil {
					t.Fatalf("publish after ErrTooLarge: %v", err)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			if err := p.Flush(t.Context()); err != nil {
				t.Fatal(err)
			}
			if n := streamMsgs(t, js, names.DataStream()); n != 1 {
				t.Fatalf("data stream holds %d messages, want 1", n)
			}
		})
	}
}

func TestPublisherErrors(t *testing.T) {
	_, _, js, names := setupRun(t, StreamConfig{})
	p, err := NewPublisher(js, WithAckTimeout(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	subj := names.DataSubject("acts", 0, 0, 0)
	if err := p.Publish(t.Context(), subj, "", nil, nil); !errors.Is(err, ErrInvalidOption) {
		t.Fatalf("empty id: %v", err)
	}
	if err := p.Publish(t.Context(), subj, "a", nil, map[string]string{"Nats-Msg-Id": "b"}); !errors.Is(err, ErrInvalidOption) {
		t.Fatalf("msg id header: %v", err)
	}
	// No stream listens here. That looks like a stream not up yet, so it is
	// retried until ctx ends; the failure is then sticky.
	ctx, cancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
	defer cancel()
	err = p.Publish(ctx, "lp.nowhere.data.x", "a", []byte("x"), nil)
	if err == nil {
		err = p.Flush(ctx)
	}
	if err == nil {
		t.Fatal("publish to a subject without stream succeeded")
	}
	if err2 := p.Flush(ctx); err2 == nil {
		t.Fatal("failure is not sticky")
	}
	for _, opt := range []PublisherOption{WithMaxPending(0), WithAckTimeout(0), WithPublisherLogger(nil)} {
		if _, err := NewPublisher(js, opt); !errors.Is(err, ErrInvalidOption) {
			t.Fatalf("bad option: %v", err)
		}
	}
}

// TestStoredShardAndMarkedShards: the data stream tells which shards carry a done marker and
// how many records each holds, phase by phase.
func TestStoredShardAndMarkedShards(t *testing.T) {
	_, _, js, names := setupRun(t, StreamConfig{})
	p, err := NewPublisher(js)
	if err != nil {
		t.Fatal(err)
	}
	publish := func(k DataKey, data string) {
		t.Helper()
		if err := p.Publish(t.Context(), k.Subject(), MsgID(k), []byte(data), nil); err != nil {
			t.Fatal(err)
		}
	}
	run := names.Run()
	// cache shard 3: three records and a marker; shard 4: one record, no marker yet;
	// stats shard 3: a marker only.
	for w := range 3 {
		publish(DataKey{Run: run, Phase: "cache", Shard: 3, Window: w}, "rec")
	}
	publish(DataKey{Run: run, Phase: "cache", Shard: 3, Done: true}, "marker-3")
	publish(DataKey{Run: run, Phase: "cache", Shard: 4, Window: 9, Chunk: 1}, "rec")
	publish(DataKey{Run: run, Phase: "stats", Shard: 3, Done: true}, "marker-s3")
	if err := p.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		phase   string
		shard   int
		marker  string
		records int
	}{{"cache", 3, "marker-3", 3}, {"cache", 4, "", 0}, {"cache", 30, "", 0}, {"stats", 3, "marker-s3", 0}} {
		m, n, err := StoredShard(t.Context(), js, names, c.phase, c.shard)
		if err != nil {
			t.Fatal(err)
		}
		if string(m) != c.marker || n != c.records {
			t.Errorf("%s shard %d: marker %q, %d records; want %q, %d", c.phase, c.shard, m, n, c.marker, c.records)
		}
	}
	for phase, want := range map[string]map[int]bool{"cache": {3: true}, "stats": {3: true}} {
		got, err := MarkedShards(t.Context(), js, names, phase)
		if err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("%s: marked %v, want %v", phase, got, want)
		}
	}
	if _, _, err := StoredShard(t.Context(), js, names, "bad phase", 1); err == nil {
		t.Error("a bad phase was accepted")
	}
}
