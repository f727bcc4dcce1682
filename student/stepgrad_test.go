package student

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
)

// TestStepGradientOrder: windows added in any order sum, bit for bit, as in window order
// (the order matters: the values are chosen so that float64 addition is not associative on
// them); the bookkeeping errors are ErrStepGradient.
func TestStepGradientOrder(t *testing.T) {
	refs := []WindowRef{{0, 2}, {0, 0}, {1, 1}, {1, 0}}
	grads := [][]float32{{1e20, 1, -3}, {1, 1e-8, 5}, {-1e20, 3, 0.1}, {1, -1, 7}}
	inOrder := NewStepGradient(3, refs, 3)
	for i, r := range refs {
		if err := inOrder.Add(WindowGrad{Ref: r, Grad: grads[i], Loss: float64(i) + 0.1}); err != nil {
			t.Fatal(err)
		}
	}
	want, wantLoss, err := inOrder.mean()
	if err != nil {
		t.Fatal(err)
	}
	var ref [3]float64
	for _, g := range grads {
		for j, v := range g {
			ref[j] += float64(v)
		}
	}
	for j := range ref {
		if want[j] != ref[j]/4 {
			t.Fatalf("element %d: %v, want %v", j, want[j], ref[j]/4)
		}
	}
	if want[0] != 0.25 { // (1e20 + 1 − 1e20 + 1)/4 in window order; other orders give 0 or 0.5
		t.Fatalf("element 0: %v", want[0])
	}
	if wantLoss != (0.1+1.1+2.1+3.1)/4 {
		t.Fatalf("loss %v", wantLoss)
	}
	rng := rand.New(rand.NewPCG(4, 4))
	for trial := range 20 {
		perm := rng.Perm(len(refs))
		g := NewStepGradient(3, refs, 3)
		for k, i := range perm {
			if g.Complete() {
				t.Fatalf("trial %d: complete after %d windows", trial, k)
			}
			if err := g.Add(WindowGrad{Ref: refs[i], Grad: grads[i], Loss: float64(i) + 0.1}); err != nil {
				t.Fatal(err)
			}
		}
		got, loss, err := g.mean()
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, want) || loss != wantLoss {
			t.Fatalf("trial %d (order %v): %v, want %v", trial, perm, got, want)
		}
	}

	g := NewStepGradient(3, refs, 3)
	if err := g.Add(WindowGrad{Ref: refs[2], Grad: grads[2], ShardSHA256: "a"}); err != nil {
		t.Fatal(err)
	}
	if m := g.Missing(); !slices.Equal(m, []WindowRef{refs[0], refs[1], refs[3]}) {
		t.Fatalf("missing %v", m)
	}
	for name, w := range map[string]WindowGrad{
		"twice":        {Ref: refs[2], Grad: grads[2], ShardSHA256: "a"},
		"foreign":      {Ref: WindowRef{5, 0}, Grad: grads[0]},
		"size":         {Ref: refs[0], Grad: []float32{1}},
		"shard-sha256": {Ref: refs[3], Grad: grads[3], ShardSHA256: "b"},
	} {
		if err := g.Add(w); !errors.Is(err, ErrStepGradient) {
			t.Fatalf("%s: %v, want ErrStepGradient", name, err)
		}
	}
	if _, _, err := g.mean(); !errors.Is(err, ErrStepGradient) {
		t.Fatalf("incomplete: %v", err)
	}
}

// TestStepSplitBitIdentical distills with --batch 4 (several steps, steps spanning shards,
// a short last step) three ways: Run; and the step loop driven by hand with every step's
// windows split between 1, 2 or 3 trainers (each its own suffix and data, all on
// goroutines at once), their gradients summed in window order in whatever order they
// arrive. P, the AdamW moments and the loss curve agree bit for bit.
func TestStepSplitBitIdentical(t *testing.T) {
	fx := newFixture(t, t.TempDir(), defaultFixture())
	cfg := testConfig()
	cfg.Batch, cfg.Epochs, cfg.ValidEvery = 4, 2, 0 // 18 windows: steps of 4, 4, 4, 4, 2 per epoch
	ctx := context.Background()
	store := NewFileCheckpointStore(t.TempDir())
	want, err := fx.trainer(t, cfg, store).Run(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	wantCk, err := store.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if want.Steps != 10 {
		t.Fatalf("%d steps, want 10", want.Steps)
	}
	for _, workers := range []int{1, 2, 3} {
		t.Run(fmt.Sprint("students=", workers), func(t *testing.T) {
			trs := make([]*Trainer, workers)
			for i := range trs {
				trs[i] = fx.trainer(t, cfg, nil)
				defer trs[i].Release()
			}
			ck, err := trs[0].Start(ctx, false)
			if err != nil {
				t.Fatal(err)
			}
			for step := range trs[0].TotalSteps() {
				refs := trs[0].StepWindows(step)
				g := NewStepGradient(step, refs, len(ck.P))
				results := make(chan WindowGrad, len(refs))
				errs := make(chan error, len(refs))
				var wg sync.WaitGroup
				for w, tr := range trs {
					p := slices.Clone(ck.P) // what a remote student would receive
					wg.Add(1)
					go func() {
						defer wg.Done()
						for i := w; i < len(refs); i += workers {
							r, err := tr.WindowGradient(ctx, p, refs[i])
							if err != nil {
								errs <- err
								return
							}
							results <- r
						}
					}()
				}
				wg.Wait()
				close(results)
				close(errs)
				for err := range errs {
					t.Fatal(err)
				}
				for r := range results {
					if err := g.Add(r); err != nil {
						t.Fatal(err)
					}
				}
				if _, err := trs[0].ApplyStep(ck, g); err != nil {
					t.Fatal(err)
				}
				if _, err := trs[0].ApplyStep(ck, g); !errors.Is(err, ErrStepGradient) {
					t.Fatalf("a gradient applied twice: %v", err)
				}
			}
			switch {
			case !slices.Equal(bits32(ck.P), bits32(want.P)):
				t.Fatal("P differs from Run's")
			case !slices.Equal(bits64(ck.M), bits64(wantCk.M)) || !slices.Equal(bits64(ck.V), bits64(wantCk.V)):
				t.Fatal("AdamW moments differ from Run's")
			case !sameCurve(ck.TrainLoss, want.TrainLoss):
				t.Fatalf("train losses differ:\n%v\n%v", ck.TrainLoss, want.TrainLoss)
			}
		})
	}
}

func bits64(p []float64) []uint64 {
	out := make([]uint64, len(p))
	for i, v := range p {
		out[i] = math.Float64bits(v)
	}
	return out
}
