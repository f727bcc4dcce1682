package tensor

import (
	"fmt"
	"math"
	"math/rand"
	"slices"
	"testing"
)

// randHalf returns a rows×cols half matrix of dtype dt with values uniform in [-1, 1).
func randHalf(rng *rand.Rand, rows, cols int, dt DType) *Matrix {
	f := randMatrix(rng, rows, cols)
	h := make([]uint16, len(f.Data))
	NarrowHalf(h, f.Data, dt)
	return FromHalf(rows, cols, dt, h, nil)
}

func TestMulTHalfMatchesNaive(t *testing.T) {
	withThreads(t, func(t *testing.T) {
		rng := rand.New(rand.NewSource(11))
		shapes := append([][3]int(nil), mulShapes...)
		// Past one widened block (halfBlockRows) and one row group (halfRowGroup).
		shapes = append(shapes, [3]int{300, 260, 33}, [3]int{257, 129, 5}, [3]int{1, 385, 40})
		for range 10 {
			shapes = append(shapes, [3]int{1 + rng.Intn(300), 1 + rng.Intn(300), 1 + rng.Intn(90)})
		}
		for _, dt := range []DType{BF16, F16} {
			for _, s := range shapes {
				m, n, k := s[0], s[1], s[2]
				a, b := randMatrix(rng, m, k), randHalf(rng, n, k, dt)
				a0, bits := a.Clone(), slices.Clone(b.Half)
				got, want := randMatrix(rng, m, n), New(m, n) // got starts dirty
				MulT(got, a, b)
				naiveMulT(want, a, b.F32())
				checkClose(t, fmt.Sprintf("%v MulT %dx%dx%d", dt, m, n, k), got.Data, want.Data)
				checkUnchanged(t, "a", a, a0)
				if !slices.Equal(b.Half, bits) || b.Data != nil {
					t.Fatalf("%v b was modified", dt)
				}
			}
		}
	})
}

// TestMulTHalfSeqIndependentOfBatch: as for float32 weights (TestMulSeqIndependentOfBatch),
// a sequence's rows of a product with a half weight have the same bits whether the sequence
// is multiplied alone or at any index of a batch, with any thread count (which changes how
// rows are grouped into work items). Sizes cover several weight blocks and a partial one,
// sequences shorter and longer than a row block, and a one-row sequence.
func TestMulTHalfSeqIndependentOfBatch(t *testing.T) {
	defer SetThreads(0)
	rng := rand.New(rand.NewSource(12))
	for _, sh := range []struct{ n, k, seq int }{{128, 128, 24}, {352, 96, 100}, {7, 33, 1}, {300, 40, 256}} {
		b := randHalf(rng, sh.n, sh.k, BF16)
		const batch = 5
		a := randMatrix(rng, batch*sh.seq, sh.k)
		var first []float32
		for _, th := range []int{1, 2, 3} {
			SetThreads(th)
			full := New(a.Rows, sh.n)
			MulTSeq(full, a, b, sh.seq)
			if first == nil {
				first = full.Data
			} else if !slices.Equal(first, full.Data) {
				t.Fatalf("n=%d k=%d seq %d: the product with %d threads differs from 1 thread", sh.n, sh.k, sh.seq, th)
			}
			for _, part := range [][2]int{{0, 1}, {3, 4}, {1, 3}, {2, 5}} {
				lo, hi := part[0]*sh.seq, part[1]*sh.seq
				sub := &Matrix{Rows: hi - lo, Cols: sh.k, Data: a.Data[lo*sh.k : hi*sh.k]}
				got := New(hi-lo, sh.n)
				MulTSeq(got, sub, b, sh.seq)
				if part[1]-part[0] == 1 {
					MulT(got, sub, b)
				}
				for i := range got.Data {
					if got.Data[i] != full.Data[lo*sh.n+i] {
						t.Fatalf("n=%d k=%d seq %d threads %d sequences [%d,%d): element %d is %v, %v in the batch of %d",
							sh.n, sh.k, sh.seq, th, part[0], part[1], i, got.Data[i], full.Data[lo*sh.n+i], batch)
					}
				}
			}
		}
	}
}

func TestWidenHalfExact(t *testing.T) {
	src := make([]uint16, 1<<16)
	for i := range src {
		src[i] = uint16(i)
	}
	got := make([]float32, len(src))
	for _, c := range []struct {
		dt   DType
		want func(uint16) float32
	}{{F16, Float16ToFloat32}, {BF16, BFloat16ToFloat32}} {
		WidenHalf(got, src, c.dt)
		for i, h := range src {
			if w := c.want(h); math.Float32bits(got[i]) != math.Float32bits(w) {
				t.Fatalf("%v %#04x: %v, want %v", c.dt, h, got[i], w)
			}
		}
		// Narrowing a widened value gives the same bits back (NaNs are only quieted).
		back := make([]uint16, len(src))
		NarrowHalf(back, got, c.dt)
		for i, h := range src {
			if back[i] != h && !math.IsNaN(float64(got[i])) {
				t.Fatalf("%v %#04x: round trip gives %#04x", c.dt, h, back[i])
			}
		}
	}
}

func TestHalfMatrix(t *testing.T) {
	rng := rand.New(rand.NewSource(13))
	h := randHalf(rng, 3, 5, F16)
	f := h.F32()
	if f.IsHalf() || !h.IsHalf() || f.Rows != 3 || f.Cols != 5 {
		t.Fatalf("F32 of a 3×5 F16 matrix: %d×%d half=%v", f.Rows, f.Cols, f.IsHalf())
	}
	buf := make([]float32, 10)
	if got := h.RowsF32(1, 3, buf); !slices.Equal(got, f.Data[5:15]) {
		t.Fatalf("RowsF32(1, 3) = %v, want %v", got, f.Data[5:15])
	}
	if got := h.RowF32(2, buf); !slices.Equal(got, f.Row(2)) {
		t.Fatalf("RowF32(2) = %v, want %v", got, f.Row(2))
	}
	if got := f.RowF32(1, nil); &got[0] != &f.Data[5] {
		t.Fatal("RowF32 of a float32 matrix copied the row")
	}
	c := h.Clone()
	c.Half[0]++
	if h.Half[0] == c.Half[0] || c.DType != F16 {
		t.Fatal("Clone of a half matrix shares its storage or lost its dtype")
	}
	if f.F32() != f {
		t.Fatal("F32 of a float32 matrix is not the matrix itself")
	}
	mustPanic(t, "RowF32", func() { h.Row(0) })
	mustPanic(t, "buffer", func() { h.RowsF32(0, 3, buf) })
	mustPanic(t, "rows [2, 4)", func() { h.RowsF32(2, 4, buf) })
	mustPanic(t, "float32 is needed", func() { MulT(New(3, 3), h, f) })
	mustPanic(t, "float32 is needed", func() { Mul(New(3, 3), f, FromHalf(5, 3, BF16, make([]uint16, 15), nil)) })
	mustPanic(t, "not a half-precision", func() { FromHalf(1, 1, F32, []uint16{0}, nil) })
	mustPanic(t, "2 values", func() { FromHalf(1, 1, BF16, []uint16{0, 0}, nil) })
}

func BenchmarkMulTHalf(b *testing.B) {
	const m, n, k = 512, 1024, 1024
	rng := rand.New(rand.NewSource(1))
	a, w := randMatrix(rng, m, k), randHalf(rng, n, k, BF16)
	w32 := w.F32()
	c := New(m, n)
	b.Run("bf16", func(b *testing.B) {
		for b.Loop() {
			MulT(c, a, w)
		}
		reportGFLOPS(b, 2*float64(m)*float64(n)*float64(k))
	})
	b.Run("f32", func(b *testing.B) {
		for b.Loop() {
			MulT(c, a, w32)
		}
		reportGFLOPS(b, 2*float64(m)*float64(n)*float64(k))
	})
}
