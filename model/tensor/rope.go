package tensor

import (
	"math"
	"sync"
	"sync/atomic"
)

// Rope applies rotary position embeddings in Hugging Face's "rotate half" convention.
// Within each head of width hd = 2·len(invFreq), element j < hd/2 is paired with j+hd/2:
//
//	out[j]      = x[j]·cos(θ) - x[j+hd/2]·sin(θ)
//	out[j+hd/2] = x[j+hd/2]·cos(θ) + x[j]·sin(θ),   θ = pos·invFreq[j]
//
// θ is computed in float32 as float32(pos)*invFreq[j] (as PyTorch does); its cosine and
// sine are computed in float64 and rounded to float32. The tables cover positions
// [0, maxPos) and grow on demand when Apply sees a longer sequence; a Rope is safe for
// concurrent use.
type Rope struct {
	invFreq []float32
	mu      sync.Mutex               // serializes growth
	tab     atomic.Pointer[ropeTabs] // replaced, never mutated, on growth
}

// ropeTabs holds cos and sin for positions [0, n): entry pos*half+j.
type ropeTabs struct {
	n        int
	cos, sin []float32
}

// NewRope precomputes the cos/sin tables for positions [0, maxPos). invFreq (copied) holds
// the hd/2 inverse frequencies. It panics if invFreq is empty or maxPos < 0.
func NewRope(invFreq []float32, maxPos int) *Rope {
	mustShape("NewRope", len(invFreq) > 0 && maxPos >= 0, "%d frequencies, maxPos %d", len(invFreq), maxPos)
	r := &Rope{invFreq: append([]float32(nil), invFreq...)}
	r.tab.Store(r.build(maxPos))
	return r
}

// HeadDim returns the head width hd = 2·len(invFreq) the Rope rotates.
func (r *Rope) HeadDim() int { return 2 * len(r.invFreq) }

func (r *Rope) build(n int) *ropeTabs {
	half := len(r.invFreq)
	t := &ropeTabs{n: n, cos: make([]float32, n*half), sin: make([]float32, n*half)}
	for pos := range n {
		for j, f := range r.invFreq {
			theta := float64(float32(pos) * f)
			t.cos[pos*half+j] = float32(math.Cos(theta))
			t.sin[pos*half+j] = float32(math.Sin(theta))
		}
	}
	return t
}

// tables returns tables covering at least positions [0, n), growing them if needed.
func (r *Rope) tables(n int) *ropeTabs {
	if t := r.tab.Load(); t.n >= n {
		return t
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	t := r.tab.Load()
	if t.n < n {
		t = r.build(max(n, 2*t.n))
		r.tab.Store(t)
	}
	return t
}

// Apply rotates x in place. x holds B sequences of seqLen rows each, stacked, so its row i
// is at position i % seqLen; each row is heads heads of width HeadDim(). It panics if
// seqLen < 1, x.Rows is not a multiple of seqLen, or x.Cols != heads·HeadDim().
func (r *Rope) Apply(x *Matrix, heads, seqLen int) {
	half := len(r.invFreq)
	hd := 2 * half
	mustShape("Rope.Apply", seqLen >= 1 && heads >= 1 && x.Rows%seqLen == 0 && x.Cols == heads*hd,
		"x %d×%d, %d heads of width %d, seqLen %d", x.Rows, x.Cols, heads, hd, seqLen)
	t := r.tables(seqLen)
	n := x.Cols
	parallelFor(x.Rows, max(1, elemGrain/n), func(lo, hi int) {
		for i := lo; i < hi; i++ {
			pos := i % seqLen
			cs := t.cos[pos*half : (pos+1)*half]
			sn := t.sin[pos*half : (pos+1)*half]
			row := x.Data[i*n : (i+1)*n]
			for h := range heads {
				x0 := row[h*hd : h*hd+half]
				x1 := row[h*hd+half : (h+1)*hd]
				x1 = x1[:len(x0)]
				cs, sn := cs[:len(x0)], sn[:len(x0)]
				for j, a := range x0 {
					b := x1[j]
					x0[j] = a*cs[j] - b*sn[j]
					x1[j] = b*cs[j] + a*sn[j]
				}
			}
		}
	})
}
