package student

import (
	"math/rand/v2"
	"slices"
	"testing"

	"linearpatch/model/tensor"
)

// naiveGemm is psgemm's float64 twin: c = alpha·op(a)·op(b) + beta·c, row-major.
func naiveGemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int,
	b []float32, ldb int, beta float32, c []float32, ldc int) []float64 {
	out := make([]float64, len(c))
	for i, v := range c {
		out[i] = float64(v)
	}
	at := func(i, p int) float64 {
		if transA {
			return float64(a[p*lda+i])
		}
		return float64(a[i*lda+p])
	}
	bt := func(p, j int) float64 {
		if transB {
			return float64(b[j*ldb+p])
		}
		return float64(b[p*ldb+j])
	}
	for i := range m {
		for j := range n {
			var s float64
			for p := range k {
				s += at(i, p) * bt(p, j)
			}
			out[i*ldc+j] = float64(alpha)*s + float64(beta)*float64(c[i*ldc+j])
		}
	}
	return out
}

// TestPsgemm checks the column-blocked parallel product against its naive twin over random
// shapes (1×1, odd sizes, several column blocks, padded leading dimensions, transposes,
// beta 0 and 1), that the inputs are unchanged, and that the bits do not depend on the
// thread count.
func TestPsgemm(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	defer tensor.SetThreads(tensor.Threads())
	sizes := [][3]int{{1, 1, 1}, {1, 5, 3}, {3, 256, 4}, {7, 257, 3}, {5, 600, 17}, {1, 200, 9}}
	for range 10 {
		sizes = append(sizes, [3]int{1 + rng.IntN(20), 1 + rng.IntN(700), 1 + rng.IntN(40)})
	}
	for _, sz := range sizes {
		m, n, k := sz[0], sz[1], sz[2]
		for _, ta := range []bool{false, true} {
			for _, tb := range []bool{false, true} {
				for _, beta := range []float32{0, 1} {
					ar, ac := m, k
					if ta {
						ar, ac = k, m
					}
					br, bc := k, n
					if tb {
						br, bc = n, k
					}
					lda, ldb, ldc := ac+rng.IntN(3), bc+rng.IntN(3), n+rng.IntN(3)
					a, b := randSlice(rng, ar*lda, 1), randSlice(rng, br*ldb, 1)
					c0 := randSlice(rng, m*ldc, 1)
					a0, b0 := slices.Clone(a), slices.Clone(b)
					want := naiveGemm(ta, tb, m, n, k, 0.5, a, lda, b, ldb, beta, c0, ldc)
					var first []float32
					for _, threads := range []int{1, 3} {
						tensor.SetThreads(threads)
						c := slices.Clone(c0)
						psgemm(ta, tb, m, n, k, 0.5, a, lda, b, ldb, beta, c, ldc)
						if !slices.Equal(a, a0) || !slices.Equal(b, b0) {
							t.Fatalf("%v ta=%v tb=%v: inputs changed", sz, ta, tb)
						}
						for i := range m {
							for j := range ldc {
								got, w := float64(c[i*ldc+j]), want[i*ldc+j]
								if j >= n {
									w = float64(c0[i*ldc+j]) // padding untouched
								}
								if !near(got, w, 1e-4*float64(k+1)) {
									t.Fatalf("%v ta=%v tb=%v beta=%v threads=%d: c[%d,%d] = %v, want %v", sz, ta, tb, beta, threads, i, j, got, w)
								}
							}
						}
						if first == nil {
							first = c
						} else if !slices.Equal(bits32(c), bits32(first)) {
							t.Fatalf("%v ta=%v tb=%v: bits depend on the thread count", sz, ta, tb)
						}
					}
				}
			}
		}
	}
}

// TestForEachPanics: a panic on a worker goroutine comes back on the caller's.
func TestForEachPanics(t *testing.T) {
	defer tensor.SetThreads(tensor.Threads())
	tensor.SetThreads(4)
	defer func() {
		if r := recover(); r == nil {
			t.Fatal("no panic")
		}
	}()
	forEach(100, func(i int) {
		if i == 57 {
			panic("boom")
		}
	})
}
