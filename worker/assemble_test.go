package worker

import (
	"errors"
	"fmt"
	"testing"
)

func TestAssembler(t *testing.T) {
	names := testNames(t)
	run := names.Run()
	msg := func(k DataKey, data string) Msg { return Msg{Subject: k.Subject(), Data: []byte(data)} }
	rec := func(shard, window, chunk int) Msg {
		return msg(DataKey{Run: run, Phase: "cache", Shard: shard, Window: window, Chunk: chunk}, "rec")
	}
	marker := func(shard, n int) Msg {
		return msg(DataKey{Run: run, Phase: "cache", Shard: shard, Done: true}, fmt.Sprintf(`{"messages":%d}`, n))
	}
	a := NewAssembler(names, "cache")
	steps := []struct {
		m    Msg
		want Outcome
	}{
		{rec(0, 1, 0), Held},
		{marker(0, 3), Held},
		{rec(0, 1, 0), Duplicate}, // a redelivery
		{rec(0, 0, 1), Held},
		{rec(1, 0, 0), Held}, // another shard, interleaved
		{rec(0, 0, 0), Completed},
		{rec(0, 0, 1), Stale},
	}
	var done *Assembled
	for i, s := range steps {
		got, as, err := a.Add(s.m)
		if err != nil || got != s.want {
			t.Fatalf("step %d (%s): %v, %v; want %v", i, s.m.Subject, got, err, s.want)
		}
		if as != nil {
			done = as
		}
	}
	if done == nil || done.Shard != 0 || len(done.Parts) != 3 || len(done.Acks) != 5 {
		t.Fatalf("assembled %+v", done)
	}
	for i, want := range [][2]int{{0, 0}, {0, 1}, {1, 0}} {
		if k := done.Parts[i].Key; k.Window != want[0] || k.Chunk != want[1] || string(done.Parts[i].Data) != "rec" {
			t.Fatalf("part %d is %+v, want window %d chunk %d", i, k, want[0], want[1])
		}
	}
	if dup := done.Acks[2]; dup.Subject != rec(0, 1, 0).Subject || dup.Data != nil {
		t.Fatalf("a duplicate is held with its bytes (%d) or is the wrong message: %s", len(dup.Data), dup.Subject)
	}
	if a.Pending() != 1 {
		t.Fatalf("%d shards pending, want 1", a.Pending())
	}
	// more distinct messages than the marker counts: the shard is dropped with an error
	if _, _, err := a.Add(marker(1, 0)); err == nil {
		t.Fatal("a marker counting fewer messages than held was accepted")
	}
	a.MarkComplete(7)
	if got, _, err := a.Add(rec(7, 0, 0)); err != nil || got != Stale {
		t.Fatalf("a message of a shard marked complete: %v, %v", got, err)
	}
	if _, _, err := a.Add(msg(DataKey{Run: run, Phase: "stats", Shard: 0, Window: 0}, "x")); !errors.Is(err, ErrInvalidSubject) {
		t.Fatalf("a message of another phase: %v", err)
	}
	if _, _, err := a.Add(Msg{Subject: "lp." + run + ".data.cache.5.done", Data: []byte("not json")}); err == nil {
		t.Fatal("a bad marker was accepted")
	}
}
