package shards

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/klauspost/compress/zstd"
)

func zsize(b []byte) int {
	enc, _ := zstd.NewWriter(nil)
	return len(enc.EncodeAll(b, nil))
}

type tok struct {
	idx  []int
	prob []float64
}

func synth(r *rand.Rand, V, K, T int) []tok {
	out := make([]tok, T)
	lg := make([]float64, V)
	for t := range out {
		for v := range lg {
			lg[v] = 3 * r.NormFloat64()
		}
		// sparse spikes
		for s := 0; s < 3; s++ {
			if r.Float64() < 0.5 {
				lg[r.IntN(V)] += 5 + 15*r.Float64()
			}
		}
		ord := make([]int, V)
		for i := range ord {
			ord[i] = i
		}
		slices.SortFunc(ord, func(a, b int) int {
			if lg[a] > lg[b] {
				return -1
			}
			if lg[a] < lg[b] {
				return 1
			}
			return 0
		})
		ord = ord[:K]
		p := make([]float64, K)
		var s float64
		for i, v := range ord {
			p[i] = math.Exp(lg[v] - lg[ord[0]])
			s += p[i]
		}
		for i := range p {
			p[i] /= s
		}
		out[t] = tok{ord, p}
	}
	return out
}

func kl(p, q []float64) float64 {
	var s float64
	for i := range p {
		if p[i] > 0 {
			s += p[i] * math.Log(p[i]/q[i])
		}
	}
	return s
}

func TestExp(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	V, K, T := 32000, 50, 1024
	toks := synth(r, V, K, T)
	// indices layouts
	var byProb16, gap16, gapLo, gapHi []byte
	var sqrtQ8, sqrtQ7, logQ8 []byte
	var klS8, klS7, klL8 float64
	for _, tk := range toks {
		for _, v := range tk.idx {
			byProb16 = append(byProb16, byte(v), byte(v>>8))
		}
		perm := make([]int, K)
		for i := range perm {
			perm[i] = i
		}
		slices.SortFunc(perm, func(a, b int) int { return tk.idx[a] - tk.idx[b] })
		prev := -1
		pq8 := make([]float64, K)
		pq7 := make([]float64, K)
		pl8 := make([]float64, K)
		ps := make([]float64, K)
		for j, i := range perm {
			g := tk.idx[i] - prev - 1
			prev = tk.idx[i]
			gap16 = append(gap16, byte(g), byte(g>>8))
			gapLo = append(gapLo, byte(g))
			gapHi = append(gapHi, byte(g>>8))
			p := tk.prob[i]
			ps[j] = p
			c8 := math.Round(math.Sqrt(p) * 255)
			c7 := math.Round(math.Sqrt(p) * 127)
			sqrtQ8 = append(sqrtQ8, byte(c8))
			sqrtQ7 = append(sqrtQ7, byte(c7))
			if c8 == 0 {
				c8 = 0.25
			}
			if c7 == 0 {
				c7 = 0.25
			}
			pq8[j] = c8 * c8
			pq7[j] = c7 * c7
			lq := math.Round(-math.Log(p/tk.prob[0]) * 16)
			if lq > 255 {
				lq = 255
			}
			logQ8 = append(logQ8, byte(lq))
			pl8[j] = math.Exp(-lq / 16)
		}
		norm := func(q []float64) {
			var s float64
			for _, v := range q {
				s += v
			}
			for i := range q {
				q[i] /= s
			}
		}
		norm(pq8)
		norm(pq7)
		norm(pl8)
		klS8 += kl(ps, pq8)
		klS7 += kl(ps, pq7)
		klL8 += kl(ps, pl8)
	}
	f := float64(T)
	t.Logf("idx byProb16 %.1f gap16 %.1f gapLo+Hi %.1f (lo %.1f hi %.1f)", float64(zsize(byProb16))/f, float64(zsize(gap16))/f, float64(zsize(gapLo)+zsize(gapHi))/f, float64(zsize(gapLo))/f, float64(zsize(gapHi))/f)
	t.Logf("prob sqrt8 %.1f B kl %.2e; sqrt7 %.1f B kl %.2e; log8/16 %.1f B kl %.2e", float64(zsize(sqrtQ8))/f, klS8/f, float64(zsize(sqrtQ7))/f, klS7/f, float64(zsize(logQ8))/f, klL8/f)
}
