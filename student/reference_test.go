package student

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"linearpatch/model"
	"linearpatch/model/tensor"
)

// The naive twins below define, in float64, what the kernels and the whole suffix compute.
// They favour obviousness over speed; finite differences of them are the reference for
// every gradient.

func to64(x []float32) []float64 {
	out := make([]float64, len(x))
	for i, v := range x {
		out[i] = float64(v)
	}
	return out
}

func refLinear(x []float64, ws []*tensor.Matrix, bias [][]float32) []float64 {
	in := ws[0].Cols
	n := len(x) / in
	out := 0
	for _, w := range ws {
		out += w.Rows
	}
	y := make([]float64, n*out)
	for r := range n {
		c := 0
		for j, w := range ws {
			w := w.F32() // a half weight, widened
			for o := range w.Rows {
				var s float64
				for i := range in {
					s += x[r*in+i] * float64(w.Data[o*in+i])
				}
				if j < len(bias) && bias[j] != nil {
					s += float64(bias[j][o])
				}
				y[r*out+c] = s
				c++
			}
		}
	}
	return y
}

func refRMSNorm(x []float64, w []float32, eps float32) []float64 {
	d := len(w)
	y := make([]float64, len(x))
	for r := range len(x) / d {
		var ss float64
		for j := range d {
			ss += x[r*d+j] * x[r*d+j]
		}
		inv := 1 / math.Sqrt(ss/float64(d)+float64(eps))
		for j := range d {
			y[r*d+j] = x[r*d+j] * inv * float64(w[j])
		}
	}
	return y
}

func refRope(x []float64, width, heads, T int, invFreq []float32) []float64 {
	half := len(invFreq)
	hd := 2 * half
	y := slices.Clone(x)
	for i := range len(x) / width {
		pos := i % T
		for h := range heads {
			for j := range half {
				theta := float64(float32(pos) * invFreq[j])
				c, s := math.Cos(theta), math.Sin(theta)
				p0, p1 := i*width+h*hd+j, i*width+h*hd+j+half
				y[p0] = x[p0]*c - x[p1]*s
				y[p1] = x[p1]*c + x[p0]*s
			}
		}
	}
	return y
}

func refAttention(qkv []float64, a attnShape) []float64 {
	W, OW, hd := a.width(), a.outWidth(), a.hd
	G := a.heads / a.kvHeads
	n := len(qkv) / W
	out := make([]float64, n*OW)
	sc := make([]float64, a.T)
	for i := range n {
		t := i % a.T
		start := i - t
		j0 := 0 // first visible key
		if a.window > 0 {
			j0 = max(0, t-a.window+1)
		}
		for h := range a.heads {
			kh := h / G
			mx := math.Inf(-1)
			for j := j0; j <= t; j++ {
				var s float64
				for c := range hd {
					s += qkv[i*W+h*hd+c] * qkv[(start+j)*W+(a.heads+kh)*hd+c]
				}
				sc[j] = s / math.Sqrt(float64(hd))
				mx = math.Max(mx, sc[j])
			}
			var sum float64
			for j := j0; j <= t; j++ {
				sc[j] = math.Exp(sc[j] - mx)
				sum += sc[j]
			}
			for c := range hd {
				var o float64
				for j := j0; j <= t; j++ {
					o += sc[j] * qkv[(start+j)*W+(a.heads+a.kvHeads+kh)*hd+c]
				}
				out[i*OW+h*hd+c] = o / sum
			}
		}
	}
	return out
}

// refHeadNorm applies RMSNorm to each of the first qHeads+kHeads heads of width len(wq) of
// every row (wq for the first qHeads, wk for the others) and copies the other columns.
func refHeadNorm(x []float64, width, qHeads, kHeads int, wq, wk []float32, eps float32) []float64 {
	hd := len(wq)
	y := slices.Clone(x)
	for i := range len(x) / width {
		for h := range qHeads + kHeads {
			w := wq
			if h >= qHeads {
				w = wk
			}
			off := i*width + h*hd
			copy(y[off:off+hd], refRMSNorm(x[off:off+hd], w, eps))
		}
	}
	return y
}

func refSwiGLU(gu []float64, f int) []float64 {
	n := len(gu) / (2 * f)
	y := make([]float64, n*f)
	for r := range n {
		for j := range f {
			g, u := gu[2*r*f+j], gu[(2*r+1)*f+j]
			y[r*f+j] = g / (1 + math.Exp(-g)) * u
		}
	}
	return y
}

func refGather(h []float64, idx []int32, w *tensor.Matrix, k int) []float64 {
	w = w.F32() // a half head, widened
	d := w.Cols
	n := len(h) / d
	z := make([]float64, n*k)
	for t := range n {
		for j := range k {
			row := w.Row(int(idx[t*k+j]))
			var s float64
			for c := range d {
				s += h[t*d+c] * float64(row[c])
			}
			z[t*k+j] = s
		}
	}
	return z
}

// refLogSoftmax returns log softmax of one row.
func refLogSoftmax(z []float64) []float64 {
	mx := math.Inf(-1)
	for _, v := range z {
		mx = math.Max(mx, v)
	}
	var s float64
	for _, v := range z {
		s += math.Exp(v - mx)
	}
	lse := mx + math.Log(s)
	out := make([]float64, len(z))
	for i, v := range z {
		out[i] = v - lse
	}
	return out
}

// refCE is −Σ_rows Σ_j p·log softmax(z)_j / rows.
func refCE(z, p []float64, k int) float64 {
	n := len(z) / k
	var s float64
	for r := range n {
		lq := refLogSoftmax(z[r*k : (r+1)*k])
		for j := range k {
			s -= p[r*k+j] * lq[j]
		}
	}
	return s / float64(n)
}

// refKL is Σ_rows Σ_j p·(log p − log softmax(z)_j) / rows.
func refKL(z, p []float64, k int) float64 {
	n := len(z) / k
	var s float64
	for r := range n {
		lq := refLogSoftmax(z[r*k : (r+1)*k])
		for j := range k {
			if pv := p[r*k+j]; pv > 0 {
				s += pv * (math.Log(pv) - lq[j])
			}
		}
	}
	return s / float64(n)
}

func refMSE(y, t []float64) float64 {
	var s float64
	for i := range y {
		s += (y[i] - t[i]) * (y[i] - t[i])
	}
	return s / float64(len(y))
}

func refAdd(a, b []float64) []float64 {
	out := make([]float64, len(a))
	for i := range a {
		out[i] = a[i] + b[i]
	}
	return out
}

// refHidden runs rows x (B·T×d, float64) through P (d×d) and layers end..L−1.
func refHidden(m *model.Model, end, T int, x, p []float64) []float64 {
	c := m.Config
	d := c.Dim
	n := len(x) / d
	h := make([]float64, n*d)
	for r := range n {
		for j := range d {
			var s float64
			for i := range d {
				s += x[r*d+i] * p[i*d+j]
			}
			h[r*d+j] = s
		}
	}
	a := attnShape{T: T, heads: c.Heads, kvHeads: c.KVHeads, hd: c.HeadDim, window: c.SlidingWindow}
	inv := ropeInvFreq(c)
	for l := end; l < c.Layers; l++ {
		ly := m.Layers[l]
		var bias [][]float32
		if ly.Bq != nil {
			bias = [][]float32{ly.Bq, ly.Bk, ly.Bv}
		}
		qkv := refLinear(refRMSNorm(h, ly.AttnNorm, c.NormEps), []*tensor.Matrix{ly.Wq, ly.Wk, ly.Wv}, bias)
		if ly.QNorm != nil {
			qkv = refHeadNorm(qkv, a.width(), c.Heads, c.KVHeads, ly.QNorm, ly.KNorm, c.NormEps)
		}
		qkv = refRope(qkv, a.width(), c.Heads+c.KVHeads, T, inv)
		h = refAdd(h, refLinear(refAttention(qkv, a), []*tensor.Matrix{ly.Wo}, nil))
		gu := refLinear(refRMSNorm(h, ly.MLPNorm, c.NormEps), []*tensor.Matrix{ly.Wgate, ly.Wup}, nil)
		h = refAdd(h, refLinear(refSwiGLU(gu, c.FFN), []*tensor.Matrix{ly.Wdown}, nil))
	}
	return h
}

// refLoss is the suffix's loss over a batch, in float64, straight from the definitions.
func refLoss(m *model.Model, end int, opts SuffixOptions, batch []Example, p []float64) float64 {
	c := m.Config
	T, K := opts.SeqLen, opts.K
	var x, xf, prob []float64
	var idx []int32
	for _, ex := range batch {
		x = append(x, to64(ex.XCut)...)
		xf = append(xf, to64(ex.XFinal)...)
		prob = append(prob, to64(ex.TopKProb)...)
		idx = append(idx, ex.TopKIdx...)
	}
	h := refHidden(m, end, T, x, p)
	switch opts.Loss {
	case LossMSE:
		return refMSE(h, xf)
	case LossTopKKL:
		z := refGather(refRMSNorm(h, m.Norm, c.NormEps), idx, m.Head, K)
		return refKL(z, prob, K)
	default: // full-kl
		z := refLinear(refRMSNorm(h, m.Norm, c.NormEps), []*tensor.Matrix{m.Head}, nil)
		zt := refLinear(refRMSNorm(xf, m.Norm, c.NormEps), []*tensor.Matrix{m.Head}, nil)
		V := c.Vocab
		pt := make([]float64, len(zt))
		for r := range len(zt) / V {
			for j, v := range refLogSoftmax(zt[r*V : (r+1)*V]) {
				pt[r*V+j] = math.Exp(v)
			}
		}
		return refKL(z, pt, V)
	}
}

// fdGrad returns the central finite-difference gradient of f at x (x is restored).
func fdGrad(f func([]float64) float64, x []float64, eps float64) []float64 {
	g := make([]float64, len(x))
	for i := range x {
		v := x[i]
		h := eps * max(1, math.Abs(v))
		x[i] = v + h
		fp := f(x)
		x[i] = v - h
		fm := f(x)
		x[i] = v
		g[i] = (fp - fm) / (2 * h)
	}
	return g
}

// dot64 is Σ r·y, the scalar objective whose gradient is the backward pass for cotangent r.
func dot64(r []float32, y []float64) float64 {
	var s float64
	for i, v := range y {
		s += float64(r[i]) * v
	}
	return s
}

// checkGrad fails t unless got matches want within tol relative to want's largest entry
// (floored at 1e-4: float32 cancellation leaves ~1e-8 absolute noise).
func checkGrad(t *testing.T, what string, got []float32, want []float64, tol float64) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d values, want %d", what, len(got), len(want))
	}
	var scale, worst float64
	at := 0
	for _, w := range want {
		scale = math.Max(scale, math.Abs(w))
	}
	for i, w := range want {
		if e := math.Abs(float64(got[i]) - w); e > worst {
			worst, at = e, i
		}
	}
	if worst > tol*math.Max(scale, 1e-4) || math.IsNaN(worst) {
		t.Fatalf("%s: [%d] = %g, want %g (max error %.3g, scale %.3g)", what, at, got[at], want[at], worst, scale)
	}
	t.Logf("%s: max error %.2g of scale %.2g", what, worst, scale)
}

// checkClose fails t unless |got − want| ≤ tol·(1 + |want|) everywhere.
func checkClose(t *testing.T, what string, got []float32, want []float64, tol float64) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d values, want %d", what, len(got), len(want))
	}
	for i, w := range want {
		if e := math.Abs(float64(got[i]) - w); !(e <= tol*(1+math.Abs(w))) {
			t.Fatalf("%s: [%d] = %g, want %g", what, i, got[i], w)
		}
	}
}

func randSlice(rng *rand.Rand, n int, std float64) []float32 {
	x := make([]float32, n)
	for i := range x {
		x[i] = float32(rng.NormFloat64() * std)
	}
	return x
}

func randMatrix(rng *rand.Rand, rows, cols int, std float64) *tensor.Matrix {
	return tensor.FromData(rows, cols, randSlice(rng, rows*cols, std))
}

// tinyModel is the small synthetic model of the gradient tests.
func tinyModel(t testing.TB, bias bool) *model.Model {
	t.Helper()
	return tinyArch(t, model.Config{QKVBias: bias})
}

// tinyArch is tinyModel with the architecture features of feat (QKVBias, QKNorm and
// HeadDim, SlidingWindow) switched on.
func tinyArch(t testing.TB, feat model.Config) *model.Model {
	t.Helper()
	cfg := model.Config{Dim: 16, Layers: 4, Heads: 4, KVHeads: 2, FFN: 32, Vocab: 50,
		QKVBias: feat.QKVBias, QKNorm: feat.QKNorm, HeadDim: feat.HeadDim, SlidingWindow: feat.SlidingWindow}
	m, err := model.Synthetic(cfg, 7)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// randBatch returns B windows of T tokens with inputs X_i of the model's scale, teacher
// top-k distributions (distinct ids, softmax over random logits) and X_L.
func randBatch(rng *rand.Rand, m *model.Model, B, T, K int) []Example {
	d, V := m.Dim, m.Vocab
	batch := make([]Example, B)
	for b := range batch {
		ex := Example{XCut: randSlice(rng, T*d, 1), XFinal: randSlice(rng, T*d, 1.5)}
		for range T {
			ids := rng.Perm(V)[:K]
			z := randSlice(rng, K, 2)
			tensor.Softmax(z)
			for j := range K {
				ex.TopKIdx = append(ex.TopKIdx, int32(ids[j]))
			}
			ex.TopKProb = append(ex.TopKProb, z...)
		}
		batch[b] = ex
	}
	return batch
}

// randPatch returns identity + noise, d×d.
func randPatch(rng *rand.Rand, d int, noise float64) *tensor.Matrix {
	p := randMatrix(rng, d, d, noise)
	for i := range d {
		p.Data[i*d+i] += 1
	}
	return p
}

func caseName(format string, args ...any) string { return fmt.Sprintf(format, args...) }

// featName names the architecture feature switched on in feat (see tinyArch).
func featName(feat model.Config) string {
	switch {
	case feat.QKVBias:
		return "qwen2-bias"
	case feat.QKNorm:
		return "qwen3-qknorm"
	case feat.SlidingWindow > 0:
		return "mistral-window"
	}
	return "llama"
}
