package tensor

import (
	"fmt"
	"math"
	"math/rand"
	"sync"
	"testing"
)

// llamaInvFreq returns 1/base^(2j/hd) for j < hd/2, as Hugging Face computes it.
func llamaInvFreq(hd int, base float64) []float32 {
	f := make([]float32, hd/2)
	for j := range f {
		f[j] = float32(1 / math.Pow(base, float64(2*j)/float64(hd)))
	}
	return f
}

func TestRopeMatchesNaive(t *testing.T) {
	withThreads(t, func(t *testing.T) {
		rng := rand.New(rand.NewSource(8))
		cases := []struct{ batch, seqLen, heads, hd, maxPos int }{
			{1, 1, 1, 2, 1}, {1, 5, 3, 6, 8}, {3, 7, 2, 10, 2}, {2, 1, 4, 4, 0},
			{1, 64, 16, 64, 64}, {2, 300, 3, 64, 128}, {4, 33, 5, 18, 40},
		}
		for _, c := range cases {
			inv := llamaInvFreq(c.hd, 10000)
			r := NewRope(inv, c.maxPos)
			x := randMatrix(rng, c.batch*c.seqLen, c.heads*c.hd)
			want := x.Clone()
			r.Apply(x, c.heads, c.seqLen) // grows the tables when seqLen > maxPos
			naiveRope(want, inv, c.heads, c.seqLen)
			checkClose(t, fmt.Sprintf("Rope %+v", c), x.Data, want.Data)
		}
	})
}

func TestRopeRotationAndInverse(t *testing.T) {
	// Position 0 is the identity; rotating by θ then -θ (negated frequencies) restores x.
	rng := rand.New(rand.NewSource(9))
	inv := llamaInvFreq(8, 10000)
	neg := make([]float32, len(inv))
	for i, f := range inv {
		neg[i] = -f
	}
	x := randMatrix(rng, 20, 16)
	y := x.Clone()
	NewRope(inv, 20).Apply(y, 2, 20)
	checkClose(t, "position 0", y.Row(0), x.Row(0))
	NewRope(neg, 20).Apply(y, 2, 20)
	checkClose(t, "inverse", y.Data, x.Data)
	// A specific value: hd 2, invFreq 1, position 1 rotates (1, 0) by 1 radian.
	p := FromData(2, 2, []float32{1, 0, 1, 0})
	NewRope([]float32{1}, 2).Apply(p, 1, 2)
	checkClose(t, "rotation", p.Row(1), []float32{float32(math.Cos(1)), float32(math.Sin(1))})
}

func TestRopeConcurrentGrowth(t *testing.T) {
	inv := llamaInvFreq(16, 10000)
	r := NewRope(inv, 1)
	var wg sync.WaitGroup
	bad := make([]bool, 8)
	for g := range bad {
		wg.Add(1)
		go func() {
			defer wg.Done()
			seq := 10 + 37*g
			x := New(seq, 32)
			for i := range x.Data {
				x.Data[i] = float32(i%7) - 3
			}
			want := x.Clone()
			r.Apply(x, 2, seq)
			naiveRope(want, inv, 2, seq)
			for i := range x.Data {
				if !near(x.Data[i], want.Data[i], 0) {
					bad[g] = true
					return
				}
			}
		}()
	}
	wg.Wait()
	for g, b := range bad {
		if b {
			t.Fatalf("goroutine %d got wrong rotations", g)
		}
	}
}

func TestRopeShapePanics(t *testing.T) {
	r := NewRope(llamaInvFreq(4, 10000), 8)
	mustPanic(t, "Rope.Apply", func() { r.Apply(New(4, 12), 2, 4) })
	mustPanic(t, "Rope.Apply", func() { r.Apply(New(5, 8), 2, 2) })
	mustPanic(t, "Rope.Apply", func() { r.Apply(New(4, 8), 2, 0) })
	mustPanic(t, "NewRope", func() { NewRope(nil, 8) })
	mustPanic(t, "NewRope", func() { NewRope([]float32{1}, -1) })
	if r.HeadDim() != 4 {
		t.Fatalf("HeadDim = %d", r.HeadDim())
	}
}
