package studentnet

import (
	"errors"
	"math"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"linearpatch/student"
)

// TestFetchDeletedWhileRead: a gradient deleted while a student reads it (the students
// ahead checkpointed and pruned its step) fails the read at once, naming the deletion;
// before, the read waited for the client's 5 s timeout, and the student fell further
// behind.
func TestFetchDeletedWhileRead(t *testing.T) {
	x, _ := studentExchange(t, 1)
	ctx := t.Context()
	ref := student.WindowRef{Shard: 0, Index: 0}
	g := make([]float32, 2048*1024) // 8 MiB: 64 chunks, not all of them buffered by Get
	if _, err := x.CreateClaim(ctx, 0, 0, "a"); err != nil {
		t.Fatal(err)
	}
	if err := x.Publish(ctx, 0, 0, "a", student.WindowGrad{Ref: ref, Grad: g, Loss: math.Pi}); err != nil {
		t.Fatal(err)
	}
	r, err := x.obj.Get(ctx, gradObject(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := x.obj.Delete(ctx, gradObject(0, 0)); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	_, err = x.read(ctx, gradObject(0, 0), r, uint64(4*len(g)))
	took := time.Since(t0)
	if !errors.Is(err, jetstream.ErrObjectNotFound) {
		t.Fatalf("reading a deleted gradient: %v after %v, want an error naming its deletion", err, took)
	}
	if took > 2*time.Second {
		t.Errorf("reading a deleted gradient failed after %v, want about %v", took, deletedPoll)
	}
	t.Logf("%v after %v", err, took)
}
