package tensor

import (
	"fmt"
	"math"
	"math/rand"
	"slices"
	"strings"
	"testing"
)

// tol is the relative tolerance of fast kernels against their naive twins.
const tol = 1e-4

func randMatrix(rng *rand.Rand, rows, cols int) *Matrix {
	m := New(rows, cols)
	for i := range m.Data {
		m.Data[i] = rng.Float32()*2 - 1
	}
	return m
}

func randSlice(rng *rand.Rand, n int, scale float32) []float32 {
	s := make([]float32, n)
	for i := range s {
		s[i] = (rng.Float32()*2 - 1) * scale
	}
	return s
}

// near reports whether got is within tol of want, relative to max(1, |want|, scale).
func near(got, want, scale float32) bool {
	d := math.Abs(float64(got) - float64(want))
	ref := math.Max(1, math.Max(math.Abs(float64(want)), float64(scale)))
	return d <= tol*ref
}

// checkClose fails t at the first element of got that is not near want.
func checkClose(t *testing.T, what string, got, want []float32) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d values, want %d", what, len(got), len(want))
	}
	for i := range got {
		if !near(got[i], want[i], 0) {
			t.Fatalf("%s: [%d] = %g, want %g", what, i, got[i], want[i])
		}
	}
}

// checkUnchanged fails t if m differs from its earlier copy orig.
func checkUnchanged(t *testing.T, what string, m, orig *Matrix) {
	t.Helper()
	if !m.SameShape(orig) || !slices.Equal(m.Data, orig.Data) {
		t.Fatalf("%s was modified", what)
	}
}

// mustPanic fails t unless f panics with a "tensor: "-prefixed message containing substr.
func mustPanic(t *testing.T, substr string, f func()) {
	t.Helper()
	var msg string
	func() {
		defer func() {
			if r := recover(); r != nil {
				msg = fmt.Sprint(r)
			}
		}()
		f()
	}()
	if msg == "" {
		t.Fatalf("no panic, want one mentioning %q", substr)
	}
	if !strings.HasPrefix(msg, "tensor: ") || !strings.Contains(msg, substr) {
		t.Fatalf("panic %q, want a \"tensor: \" message mentioning %q", msg, substr)
	}
}

// withThreads runs f under each thread count, restoring the previous setting afterwards.
func withThreads(t *testing.T, f func(t *testing.T)) {
	prev := Threads()
	defer SetThreads(prev)
	for _, n := range []int{1, 3} {
		SetThreads(n)
		t.Run(fmt.Sprintf("threads=%d", n), f)
	}
}
