package tensor

import (
	"fmt"
	"math"
	"math/rand"
	"slices"
	"testing"
)

// elemShapes include 1×1, odd sizes and a size large enough to run in parallel.
var elemShapes = [][2]int{{1, 1}, {1, 5}, {7, 1}, {3, 3}, {13, 17}, {33, 1024}, {257, 129}, {100, 999}}

func TestRMSNormMatchesNaive(t *testing.T) {
	withThreads(t, func(t *testing.T) {
		rng := rand.New(rand.NewSource(4))
		for _, s := range elemShapes {
			for _, scale := range []float32{1e-3, 1, 50} {
				x := randMatrix(rng, s[0], s[1])
				for i := range x.Data {
					x.Data[i] *= scale
				}
				w := randSlice(rng, s[1], 2)
				x0, w0 := x.Clone(), slices.Clone(w)
				got, want := New(s[0], s[1]), New(s[0], s[1])
				RMSNorm(got, x, w, 1e-5)
				naiveRMSNorm(want, x, w, 1e-5)
				what := fmt.Sprintf("RMSNorm %dx%d scale %g", s[0], s[1], scale)
				checkClose(t, what, got.Data, want.Data)
				checkUnchanged(t, "x", x, x0)
				if !slices.Equal(w, w0) {
					t.Fatal("RMSNorm modified w")
				}
				RMSNorm(x, x, w, 1e-5) // in place
				checkClose(t, what+" in place", x.Data, got.Data)
			}
		}
	})
}

func TestAddBiasAndAddMatchNaive(t *testing.T) {
	withThreads(t, func(t *testing.T) {
		rng := rand.New(rand.NewSource(5))
		for _, s := range elemShapes {
			m := randMatrix(rng, s[0], s[1])
			b := randSlice(rng, s[1], 1)
			b0 := slices.Clone(b)
			got, want := m.Clone(), m.Clone()
			AddBias(got, b)
			naiveAddBias(want, b)
			checkClose(t, fmt.Sprintf("AddBias %dx%d", s[0], s[1]), got.Data, want.Data)
			if !slices.Equal(b, b0) {
				t.Fatal("AddBias modified b")
			}

			x := randMatrix(rng, s[0], s[1])
			x0 := x.Clone()
			got, want = m.Clone(), m.Clone()
			Add(got, x)
			naiveAdd(want, x)
			checkClose(t, fmt.Sprintf("Add %dx%d", s[0], s[1]), got.Data, want.Data)
			checkUnchanged(t, "x", x, x0)
		}
	})
}

func TestSwiGLUMatchesNaive(t *testing.T) {
	withThreads(t, func(t *testing.T) {
		rng := rand.New(rand.NewSource(6))
		for _, s := range elemShapes {
			gate, up := randMatrix(rng, s[0], s[1]), randMatrix(rng, s[0], s[1])
			for i := range gate.Data {
				gate.Data[i] *= 30 // reach saturation on both sides
			}
			g0, u0 := gate.Clone(), up.Clone()
			got, want := New(s[0], s[1]), New(s[0], s[1])
			SwiGLU(got, gate, up)
			naiveSwiGLU(want, gate, up)
			what := fmt.Sprintf("SwiGLU %dx%d", s[0], s[1])
			checkClose(t, what, got.Data, want.Data)
			checkUnchanged(t, "gate", gate, g0)
			checkUnchanged(t, "up", up, u0)
			SwiGLU(gate, gate, up) // dst aliasing gate
			checkClose(t, what+" in place", gate.Data, got.Data)
		}
	})
}

func TestExp32(t *testing.T) {
	worst := 0.0
	for x := float32(-87); x <= 88; x += 0.0137 {
		want := math.Exp(float64(x))
		rel := math.Abs(float64(exp32(x))-want) / want
		worst = math.Max(worst, rel)
	}
	if worst > 2e-7 {
		t.Fatalf("exp32 worst relative error %g", worst)
	}
	for _, x := range []float32{-1000, -104, -88, 89, 1000} {
		if got, want := exp32(x), float32(math.Exp(float64(x))); got != want {
			t.Fatalf("exp32(%g) = %g, want %g", x, got, want)
		}
	}
	if inf := float32(math.Inf(1)); exp32(-inf) != 0 || exp32(inf) != inf {
		t.Fatal("exp32 at ±Inf")
	}
	if v := exp32(float32(math.NaN())); v == v {
		t.Fatal("exp32(NaN) is not NaN")
	}
}

func TestSoftmaxAndLogSumExpMatchNaive(t *testing.T) {
	rng := rand.New(rand.NewSource(7))
	for _, n := range []int{1, 2, 3, 7, 64, 513, 32000} {
		for _, scale := range []float32{0.1, 10, 1000} {
			x := randSlice(rng, n, scale)
			x0 := slices.Clone(x)
			want := slices.Clone(x)
			naiveSoftmax(want)
			got := slices.Clone(x)
			Softmax(got)
			checkClose(t, fmt.Sprintf("Softmax n=%d scale %g", n, scale), got, want)

			l, lw := LogSumExp(x), naiveLogSumExpShifted(x)
			if !near(l, lw, 0) {
				t.Fatalf("LogSumExp n=%d scale %g = %g, want %g", n, scale, l, lw)
			}
			if !slices.Equal(x, x0) {
				t.Fatal("LogSumExp modified x")
			}
		}
	}
	// The plain naive form agrees where it does not overflow.
	x := randSlice(rng, 100, 5)
	if l, lw := LogSumExp(x), naiveLogSumExp(x); !near(l, lw, 0) {
		t.Fatalf("LogSumExp = %g, naive %g", l, lw)
	}
}

// naiveLogSumExpShifted is naiveLogSumExp with the maximum taken out, for inputs that
// would overflow the plain form.
func naiveLogSumExpShifted(x []float32) float32 {
	mx := slices.Max(x)
	y := make([]float32, len(x))
	for i, v := range x {
		y[i] = v - mx
	}
	return float32(float64(mx) + float64(naiveLogSumExp(y)))
}

func TestSoftmaxLogSumExpEdges(t *testing.T) {
	Softmax(nil)
	inf := float32(math.Inf(1))
	if v := LogSumExp(nil); !math.IsInf(float64(v), -1) {
		t.Fatalf("LogSumExp(nil) = %g", v)
	}
	if v := LogSumExp([]float32{-inf, -inf}); !math.IsInf(float64(v), -1) {
		t.Fatalf("LogSumExp(-Inf, -Inf) = %g", v)
	}
	if v := LogSumExp([]float32{1, inf}); !math.IsInf(float64(v), 1) {
		t.Fatalf("LogSumExp(1, +Inf) = %g", v)
	}
	if v := LogSumExp([]float32{1, float32(math.NaN()), 2}); v == v {
		t.Fatalf("LogSumExp with NaN = %g", v)
	}
	x := []float32{-inf, 0, 0}
	Softmax(x)
	if x[0] != 0 || x[1] != 0.5 || x[2] != 0.5 {
		t.Fatalf("Softmax(-Inf, 0, 0) = %v", x)
	}
	big := []float32{1e30, 1e30}
	Softmax(big)
	if big[0] != 0.5 || big[1] != 0.5 {
		t.Fatalf("Softmax(1e30, 1e30) = %v", big)
	}
}

func TestElementwiseShapePanics(t *testing.T) {
	a := New(2, 3)
	mustPanic(t, "RMSNorm", func() { RMSNorm(New(3, 2), a, make([]float32, 3), 1e-5) })
	mustPanic(t, "RMSNorm", func() { RMSNorm(a, a, make([]float32, 2), 1e-5) })
	mustPanic(t, "AddBias", func() { AddBias(a, make([]float32, 2)) })
	mustPanic(t, "Add", func() { Add(a, New(2, 4)) })
	mustPanic(t, "SwiGLU", func() { SwiGLU(a, New(2, 3), New(3, 2)) })
	mustPanic(t, "SwiGLU", func() { SwiGLU(New(1, 3), a, a) })
}
