package cache

import (
	"context"
	"math/rand/v2"
	"os"
	"strings"
	"testing"
	"time"

	"linearpatch/protocol"
)

// TestWriterRefetchLostRecords: a shard to rebuild from the stream (its file is gone) whose
// records the stream no longer all holds fails the writer at once with an error that says
// so and how to recompute it; the writer used to wait 5 s on an ordered consumer per
// attempt, a kind of consumer that was seen to hang after a server's loss.
func TestWriterRefetchLostRecords(t *testing.T) {
	h := newHarness(t)
	rng := rand.New(rand.NewPCG(7, 8))
	e := h.writeOneShard(rng)
	if err := os.Remove(e.Path(h.dir)); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := h.js.Stream(ctx, h.names.DataStream())
	if err != nil {
		t.Fatal(err)
	}
	m, err := s.GetLastMsgForSubject(ctx, h.names.DataSubject("cache", 0, 1, 0))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteMsg(ctx, m.Sequence); err != nil {
		t.Fatal(err)
	}
	w, err := NewWriter(Options{JS: h.js, Names: h.names, Dir: h.dir, Dim: testDim, Vocab: testVocab})
	if err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	err = w.Run(ctx)
	took := time.Since(began)
	if err == nil || !strings.Contains(err.Error(), "no longer holds its records") ||
		!strings.Contains(err.Error(), protocol.DoneKey(protocol.PhaseCache, 0)) || ctx.Err() != nil {
		t.Fatalf("writer with a shard whose records are lost: %v", err)
	}
	if took > 3*time.Second {
		t.Errorf("the lost records took %v to notice", took)
	}
	t.Logf("%v (after %v)", err, took.Round(time.Millisecond))
}
