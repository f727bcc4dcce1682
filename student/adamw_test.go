package student

import (
	"math"
	"testing"
)

// TestAdamWTwoSteps checks two updates against values worked out by hand (in Python, from
// torch.optim.AdamW's definition: decay, moments, bias-corrected step).
func TestAdamWTwoSteps(t *testing.T) {
	a := &AdamW{LR: 0.1, WeightDecay: 0.01, Beta1: 0.9, Beta2: 0.999, Eps: 1e-8}
	p := []float32{1, -2}
	a.Update(p, []float32{0.5, -0.1}, 0.1)
	want1 := []float64{0.899000002, -1.898000009999999}
	for i := range p {
		if math.Abs(float64(p[i])-want1[i]) > 1e-6 {
			t.Fatalf("after one step p = %v, want %v", p, want1)
		}
	}
	if a.Step != 1 {
		t.Fatalf("Step = %d after one update, want 1", a.Step)
	}
	a.Update(p, []float32{0.2, 0.3}, 0.1)
	want2 := []float64{0.8082434839009282, -1.9455209911100655}
	for i := range p {
		if math.Abs(float64(p[i])-want2[i]) > 1e-6 {
			t.Fatalf("after two steps p = %v, want %v (after one: %v)", p, want2, want1)
		}
	}
	if a.Step != 2 {
		t.Fatalf("Step = %d, want 2", a.Step)
	}
	// The moments after two steps (the gradients are float32: 0.2 is 0.2000000030).
	if math.Abs(a.M[0]-0.065) > 1e-9 || math.Abs(a.V[1]-0.00009999) > 1e-10 {
		t.Fatalf("moments M=%v V=%v", a.M, a.V)
	}
}

func TestAdamWDefaultsAndPanics(t *testing.T) {
	a := NewAdamW()
	if a.LR != 1e-4 || a.WeightDecay != 1e-4 || a.Beta1 != 0.9 || a.Beta2 != 0.999 || a.Eps != 1e-8 {
		t.Fatalf("defaults %+v", a)
	}
	// A zero gradient only decays: p·(1 − lr·wd).
	p := []float32{2}
	a.Update(p, []float32{0}, 0.5)
	if want := float32(2 * (1 - 0.5*1e-4)); p[0] != want {
		t.Fatalf("zero-gradient step gave %v, want %v", p[0], want)
	}
	for _, f := range []func(){
		func() { a.Update(p, []float32{1, 2}, 0.1) },               // length mismatch
		func() { a.Update([]float32{1, 2}, []float32{1, 2}, 0.1) }, // moments sized for 1
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Fatal("no panic")
				}
			}()
			f()
		}()
	}
}

func TestCosineLR(t *testing.T) {
	const base, total = 1e-4, 2510
	for _, c := range []struct {
		step int
		want float64
	}{
		{0, base},
		{total, base / 20},
		{total / 2, base/20 + (base-base/20)/2},
		{total + 7, base / 20}, // stays at the floor
		{-3, base},
	} {
		if got := CosineLR(base, c.step, total, 1.0/20); math.Abs(got-c.want) > 1e-15 {
			t.Fatalf("CosineLR(step %d) = %g, want %g", c.step, got, c.want)
		}
	}
	// Monotone decreasing over the run.
	prev := math.Inf(1)
	for s := 0; s <= total; s += 10 {
		lr := CosineLR(base, s, total, 1.0/20)
		if lr > prev {
			t.Fatalf("CosineLR rose at step %d", s)
		}
		prev = lr
	}
	if got := CosineLR(base, 5, 0, 0.05); got != base {
		t.Fatalf("total 0: %g, want the base", got)
	}
}
