package tensor

import (
	"fmt"
	"math/rand"
	"os"
	"strings"
	"sync"
	"testing"
)

// mulShapes are (m, n, k) triples: 1×1, odd sizes, and sizes past BLAS blocking thresholds.
var mulShapes = [][3]int{
	{1, 1, 1}, {1, 7, 3}, {5, 1, 9}, {3, 3, 1}, {2, 5, 17}, {17, 13, 11},
	{31, 33, 65}, {64, 64, 64}, {65, 129, 63}, {127, 3, 257}, {200, 300, 100},
}

func TestMulTMatchesNaive(t *testing.T) {
	withThreads(t, func(t *testing.T) {
		rng := rand.New(rand.NewSource(1))
		shapes := append([][3]int(nil), mulShapes...)
		for range 20 {
			shapes = append(shapes, [3]int{1 + rng.Intn(90), 1 + rng.Intn(90), 1 + rng.Intn(90)})
		}
		for _, s := range shapes {
			m, n, k := s[0], s[1], s[2]
			a, b := randMatrix(rng, m, k), randMatrix(rng, n, k)
			a0, b0 := a.Clone(), b.Clone()
			got, want := randMatrix(rng, m, n), New(m, n) // got starts dirty: MulT overwrites
			MulT(got, a, b)
			naiveMulT(want, a, b)
			checkClose(t, fmt.Sprintf("MulT %dx%dx%d", m, n, k), got.Data, want.Data)
			checkUnchanged(t, "a", a, a0)
			checkUnchanged(t, "b", b, b0)
		}
	})
}

func TestMulMatchesNaive(t *testing.T) {
	withThreads(t, func(t *testing.T) {
		rng := rand.New(rand.NewSource(2))
		shapes := append([][3]int(nil), mulShapes...)
		for range 20 {
			shapes = append(shapes, [3]int{1 + rng.Intn(90), 1 + rng.Intn(90), 1 + rng.Intn(90)})
		}
		for _, s := range shapes {
			m, n, k := s[0], s[1], s[2]
			a, b := randMatrix(rng, m, k), randMatrix(rng, k, n)
			a0, b0 := a.Clone(), b.Clone()
			got, want := randMatrix(rng, m, n), New(m, n)
			Mul(got, a, b)
			naiveMul(want, a, b)
			checkClose(t, fmt.Sprintf("Mul %dx%dx%d", m, n, k), got.Data, want.Data)
			checkUnchanged(t, "a", a, a0)
			checkUnchanged(t, "b", b, b0)
		}
	})
}

func TestMulEmpty(t *testing.T) {
	// k = 0: the product of empty sums is zero, overwriting what dst held.
	dst := FromData(2, 2, []float32{1, 2, 3, 4})
	MulT(dst, New(2, 0), New(2, 0))
	for _, v := range dst.Data {
		if v != 0 {
			t.Fatalf("MulT with k=0 left %v", dst.Data)
		}
	}
	MulT(New(0, 3), New(0, 4), New(3, 4))
	Mul(New(3, 0), New(3, 4), New(4, 0))
}

func TestMulConcurrent(t *testing.T) {
	// Several goroutines calling BLAS at once (as concurrent forward passes do) must each
	// get correct results.
	rng := rand.New(rand.NewSource(3))
	a, b := randMatrix(rng, 150, 120), randMatrix(rng, 130, 120)
	want := New(150, 130)
	naiveMulT(want, a, b)
	var wg sync.WaitGroup
	errs := make([]string, 6)
	for g := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got := New(150, 130)
			for range 5 {
				MulT(got, a, b)
				for i := range got.Data {
					if !near(got.Data[i], want.Data[i], 0) {
						errs[g] = fmt.Sprintf("goroutine %d: [%d] = %g, want %g", g, i, got.Data[i], want.Data[i])
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	for _, e := range errs {
		if e != "" {
			t.Fatal(e)
		}
	}
}

func TestMulShapePanics(t *testing.T) {
	a := New(2, 3)
	mustPanic(t, "MulT", func() { MulT(New(2, 4), a, New(4, 2)) })
	mustPanic(t, "MulT", func() { MulT(New(3, 4), a, New(4, 3)) })
	mustPanic(t, "Mul", func() { Mul(New(2, 4), a, New(4, 4)) })
	mustPanic(t, "Mul", func() { Mul(New(2, 5), a, New(3, 4)) })
	sq := New(3, 3)
	mustPanic(t, "alias", func() { MulT(sq, sq, New(3, 3)) })
	mustPanic(t, "alias", func() { Mul(sq, New(3, 3), sq) })
	mustPanic(t, "MeasureSgemm", func() { MeasureSgemm(0, 1) })
}

func TestThreadsAndBackend(t *testing.T) {
	prev := Threads()
	defer SetThreads(prev)
	SetThreads(3)
	if Threads() != 3 {
		t.Fatalf("Threads() = %d after SetThreads(3)", Threads())
	}
	SetThreads(0)
	if Threads() < 1 {
		t.Fatalf("Threads() = %d after SetThreads(0)", Threads())
	}
	if b := Backend(); b != "openblas" && b != "gonum (pure Go)" {
		t.Fatalf("Backend() = %q", b)
	}
	t.Logf("backend %s", Backend())
}

func TestMeasureSgemm(t *testing.T) {
	if g := MeasureSgemm(64, 2); !(g > 0) {
		t.Fatalf("MeasureSgemm = %v", g)
	}
}

// TestMulTBitIdenticalAcrossThreads: a row's result must not depend on the thread count
// (teachers on different machines must produce identical activations).
func TestMulTBitIdenticalAcrossThreads(t *testing.T) {
	defer SetThreads(0)
	a, b := randMatrixForThreads(300, 257, 1), randMatrixForThreads(129, 257, 2)
	var ref *Matrix
	for _, th := range []int{1, 2, 3, 5} {
		SetThreads(th)
		c := New(300, 129)
		MulT(c, a, b)
		if ref == nil {
			ref = c
			continue
		}
		for i := range c.Data {
			if c.Data[i] != ref.Data[i] {
				t.Fatalf("threads %d: element %d differs (%v vs %v)", th, i, c.Data[i], ref.Data[i])
			}
		}
	}
}

func randMatrixForThreads(r, c int, seed int64) *Matrix {
	m := New(r, c)
	x := uint64(seed)*0x9E3779B97F4A7C15 + 1
	for i := range m.Data {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		m.Data[i] = float32(int64(x%2001)-1000) / 1000
	}
	return m
}

// TestMulSeqIndependentOfBatch: a sequence's rows must have the same bits whether it is
// multiplied alone or at any index of a batch, with any thread count: per-window
// statistics merged from parts equal one pass only if this holds. It failed under
// OpenBLAS's Haswell, SkylakeX and Cooperlake kernels when small products went to BLAS
// whole and when blocks ignored sequence boundaries. The sizes cover partial last blocks,
// sequences shorter and longer than a block, and a one-row sequence.
func TestMulSeqIndependentOfBatch(t *testing.T) {
	defer SetThreads(0)
	for _, sh := range []struct{ n, k, seq int }{{128, 128, 24}, {352, 128, 100}, {1024, 96, 64}, {7, 33, 1}, {128, 128, 256}} {
		b := randMatrixForThreads(sh.n, sh.k, 3)
		bt := randMatrixForThreads(sh.k, sh.n, 4) // for MulSeq
		const batch = 5
		a := randMatrixForThreads(batch*sh.seq, sh.k, 5)
		for _, th := range []int{1, 2} {
			SetThreads(th)
			full, fullN := New(a.Rows, sh.n), New(a.Rows, sh.n)
			MulTSeq(full, a, b, sh.seq)
			MulSeq(fullN, a, bt, sh.seq)
			for _, part := range [][2]int{{0, 1}, {3, 4}, {1, 3}, {2, 5}} {
				lo, hi := part[0]*sh.seq, part[1]*sh.seq
				sub := &Matrix{Rows: hi - lo, Cols: sh.k, Data: a.Data[lo*sh.k : hi*sh.k]}
				got, gotN := New(hi-lo, sh.n), New(hi-lo, sh.n)
				MulTSeq(got, sub, b, sh.seq)
				MulSeq(gotN, sub, bt, sh.seq)
				if part[1]-part[0] == 1 { // one sequence: MulT and Mul are MulTSeq and MulSeq
					MulT(got, sub, b)
					Mul(gotN, sub, bt)
				}
				for i := range got.Data {
					if got.Data[i] != full.Data[lo*sh.n+i] || gotN.Data[i] != fullN.Data[lo*sh.n+i] {
						t.Fatalf("n=%d k=%d seq %d threads %d sequences [%d,%d): element %d is %v/%v, %v/%v in the batch of %d",
							sh.n, sh.k, sh.seq, th, part[0], part[1], i, got.Data[i], gotN.Data[i],
							full.Data[lo*sh.n+i], fullN.Data[lo*sh.n+i], batch)
					}
				}
			}
		}
	}
	mustPanic(t, "MulT", func() { MulTSeq(New(5, 2), New(5, 3), New(2, 3), 2) })
	mustPanic(t, "Mul", func() { MulSeq(New(4, 2), New(4, 3), New(3, 2), 0) })
}

// TestBLASCore logs the BLAS kernel in use and, when OPENBLAS_CORETYPE names one, checks
// that OpenBLAS honoured it (make test-coretypes relies on this to know what it tested).
func TestBLASCore(t *testing.T) {
	core := BLASCore()
	t.Logf("backend %s, core %s", Backend(), core)
	if want := os.Getenv("OPENBLAS_CORETYPE"); want != "" && Backend() == "openblas" && !strings.EqualFold(core, want) {
		t.Fatalf("OPENBLAS_CORETYPE=%s but OpenBLAS runs its %s kernels", want, core)
	}
}
