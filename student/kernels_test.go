package student

import (
	"math/rand/v2"
	"slices"
	"testing"

	"linearpatch/model/tensor"
)

// Every kernel: the forward against its float64 twin (inputs left unchanged), and the
// backward against central finite differences of the twin, for the scalar Σ r·f(x) with a
// random cotangent r, over several shapes including 1-row and odd ones.

const (
	fwdTol  = 2e-5 // float32 forward vs float64 twin, relative to 1 + |value|
	gradTol = 2e-4 // float32 backward vs float64 finite differences, relative to the largest entry
	fdEps   = 1e-6
)

func TestLinearKernel(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 1))
	for _, c := range []struct {
		n, in int
		outs  []int
		bias  bool
	}{
		{1, 1, []int{1}, false}, {3, 5, []int{7}, true}, {4, 6, []int{5, 3, 3}, true}, {9, 17, []int{8, 2}, false},
	} {
		var ws []*tensor.Matrix
		var bias [][]float32
		out := 0
		for _, o := range c.outs {
			ws = append(ws, randMatrix(rng, o, c.in, 1))
			if c.bias {
				bias = append(bias, randSlice(rng, o, 1))
			}
			out += o
		}
		x := randSlice(rng, c.n*c.in, 1)
		x0 := slices.Clone(x)
		y := randSlice(rng, c.n*out, 1) // dirty: must be overwritten
		linearForward(y, x, c.n, ws, bias)
		checkClose(t, caseName("linear %+v", c), y, refLinear(to64(x), ws, bias), fwdTol)
		r := randSlice(rng, c.n*out, 1)
		dx := randSlice(rng, len(x), 1)
		linearBackward(dx, r, c.n, ws)
		want := fdGrad(func(x []float64) float64 { return dot64(r, refLinear(x, ws, bias)) }, to64(x), fdEps)
		checkGrad(t, caseName("linear backward %+v", c), dx, want, gradTol)
		if !slices.Equal(x, x0) {
			t.Fatal("linear modified its input")
		}
	}
}

// TestLinearKernelHalf: frozen BF16 and F16 weights, widened block by block (shapes past
// one block of weightBlockRows rows), against the float64 twin of the widened weights.
func TestLinearKernelHalf(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, dt := range []tensor.DType{tensor.BF16, tensor.F16} {
		for _, c := range []struct {
			n, in int
			outs  []int
		}{{1, 1, []int{1}}, {3, 5, []int{300, 7}}, {2, 4, []int{9, weightBlockRows + 1, 513}}} {
			var ws []*tensor.Matrix
			var bias [][]float32
			out := 0
			for _, o := range c.outs {
				f := randMatrix(rng, o, c.in, 1)
				bits := make([]uint16, o*c.in)
				tensor.NarrowHalf(bits, f.Data, dt)
				ws = append(ws, tensor.FromHalf(o, c.in, dt, bits, nil))
				bias = append(bias, randSlice(rng, o, 1))
				out += o
			}
			x := randSlice(rng, c.n*c.in, 1)
			y := randSlice(rng, c.n*out, 1)
			linearForward(y, x, c.n, ws, bias)
			checkClose(t, caseName(dt.String()+" linear %+v", c), y, refLinear(to64(x), ws, bias), fwdTol)
			r := randSlice(rng, c.n*out, 1)
			dx := randSlice(rng, len(x), 1)
			linearBackward(dx, r, c.n, ws)
			want := fdGrad(func(x []float64) float64 { return dot64(r, refLinear(x, ws, bias)) }, to64(x), fdEps)
			checkGrad(t, caseName(dt.String()+" linear backward %+v", c), dx, want, gradTol)

			// The gather head kernel on the first (half) weight.
			w, k := ws[0], 3
			h := randSlice(rng, c.n*c.in, 1)
			idx := make([]int32, c.n*k)
			for i := range idx {
				idx[i] = int32(rng.IntN(w.Rows))
			}
			z := randSlice(rng, c.n*k, 1)
			gatherForward(z, h, idx, w, k)
			checkClose(t, caseName(dt.String()+" gather %+v", c), z, refGather(to64(h), idx, w, k), fwdTol)
			rz := randSlice(rng, len(z), 1)
			dh := randSlice(rng, len(h), 1)
			gatherBackward(dh, rz, idx, w, k)
			wantH := fdGrad(func(x []float64) float64 { return dot64(rz, refGather(x, idx, w, k)) }, to64(h), fdEps)
			checkGrad(t, caseName(dt.String()+" gather backward %+v", c), dh, wantH, gradTol)
		}
	}
}

func TestRMSNormKernel(t *testing.T) {
	rng := rand.New(rand.NewPCG(2, 1))
	for _, c := range []struct{ n, d int }{{1, 1}, {1, 7}, {5, 16}, {3, 33}} {
		w := randSlice(rng, c.d, 1)
		x := randSlice(rng, c.n*c.d, 2)
		x0 := slices.Clone(x)
		y := make([]float32, len(x))
		rmsNormForward(y, x, w, 1e-5)
		checkClose(t, caseName("rmsnorm %+v", c), y, refRMSNorm(to64(x), w, 1e-5), fwdTol)
		// Bit-identical to the engine's kernel.
		e := tensor.New(c.n, c.d)
		tensor.RMSNorm(e, tensor.FromData(c.n, c.d, x), w, 1e-5)
		if !slices.Equal(e.Data, y) {
			t.Fatalf("rmsnorm %+v differs from the engine", c)
		}
		r := randSlice(rng, len(x), 1)
		dx := make([]float32, len(x))
		rmsNormBackward(dx, x, r, w, 1e-5)
		want := fdGrad(func(x []float64) float64 { return dot64(r, refRMSNorm(x, w, 1e-5)) }, to64(x), fdEps)
		checkGrad(t, caseName("rmsnorm backward %+v", c), dx, want, gradTol)
		if !slices.Equal(x, x0) {
			t.Fatal("rmsnorm modified its input")
		}
	}
}

func TestRopeKernel(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 1))
	for _, c := range []struct{ B, T, heads, rest, hd int }{{1, 1, 1, 0, 2}, {2, 3, 2, 2, 4}, {1, 9, 3, 6, 8}, {3, 5, 6, 4, 6}} {
		inv := make([]float32, c.hd/2)
		for i := range inv {
			inv[i] = float32(1 / (1 + 3*float64(i)))
		}
		tab := newRopeTables(inv, c.T)
		width := c.heads*c.hd + c.rest
		n := c.B * c.T
		x := randSlice(rng, n*width, 1)
		x0 := slices.Clone(x)
		y := make([]float32, len(x))
		ropeForward(y, x, width, c.heads, c.T, tab)
		checkClose(t, caseName("rope %+v", c), y, refRope(to64(x), width, c.heads, c.T, inv), fwdTol)
		// The engine's rotation of the same heads gives the same values.
		e := tensor.New(n, c.heads*c.hd)
		for i := range n {
			copy(e.Row(i), x[i*width:i*width+c.heads*c.hd])
		}
		tensor.NewRope(inv, c.T).Apply(e, c.heads, c.T)
		for i := range n {
			if !slices.Equal(e.Row(i), y[i*width:i*width+c.heads*c.hd]) {
				t.Fatalf("rope %+v row %d differs from the engine", c, i)
			}
		}
		r := randSlice(rng, len(x), 1)
		dx := make([]float32, len(x))
		ropeBackward(dx, r, width, c.heads, c.T, tab)
		want := fdGrad(func(x []float64) float64 {
			return dot64(r, refRope(x, width, c.heads, c.T, inv))
		}, to64(x), fdEps)
		checkGrad(t, caseName("rope backward %+v", c), dx, want, gradTol)
		if !slices.Equal(x, x0) {
			t.Fatal("rope modified its input")
		}
	}
}

func TestAttentionKernel(t *testing.T) {
	defer func(b int) { attnRowsPerBlock = b }(attnRowsPerBlock)
	rng := rand.New(rand.NewPCG(4, 1))
	cases := []struct {
		B int
		a attnShape
	}{
		{1, attnShape{T: 1, heads: 1, kvHeads: 1, hd: 1}},
		{2, attnShape{T: 3, heads: 2, kvHeads: 1, hd: 3}},
		{1, attnShape{T: 7, heads: 4, kvHeads: 2, hd: 4}},
		{2, attnShape{T: 5, heads: 4, kvHeads: 4, hd: 2}},
		{1, attnShape{T: 11, heads: 6, kvHeads: 2, hd: 5}},
		// sliding windows (Mistral): shorter than, equal to and longer than T
		{1, attnShape{T: 9, heads: 2, kvHeads: 1, hd: 3, window: 1}},
		{2, attnShape{T: 8, heads: 4, kvHeads: 2, hd: 4, window: 3}},
		{1, attnShape{T: 11, heads: 6, kvHeads: 2, hd: 5, window: 11}},
		{1, attnShape{T: 6, heads: 2, kvHeads: 2, hd: 2, window: 50}},
	}
	for _, block := range []int{64, 4, 1} { // blocking must not change results
		attnRowsPerBlock = block
		for _, c := range cases {
			a := c.a
			n := c.B * a.T
			qkv := randSlice(rng, n*a.width(), 1.5)
			q0 := slices.Clone(qkv)
			out := randSlice(rng, n*a.outWidth(), 1)
			attentionForward(out, qkv, a)
			checkClose(t, caseName("attention %+v block %d", c, block), out, refAttention(to64(qkv), a), fwdTol)
			// Against the engine's attention on the split q, k, v.
			q, k, v := tensor.New(n, a.heads*a.hd), tensor.New(n, a.kvHeads*a.hd), tensor.New(n, a.kvHeads*a.hd)
			for i := range n {
				row := qkv[i*a.width():]
				copy(q.Row(i), row[:q.Cols])
				copy(k.Row(i), row[q.Cols:q.Cols+k.Cols])
				copy(v.Row(i), row[q.Cols+k.Cols:a.width()])
			}
			e := tensor.New(n, a.outWidth())
			tensor.AttentionWindow(e, q, k, v, a.T, a.heads, a.kvHeads, a.window)
			checkClose(t, caseName("attention %+v vs engine", c), out, to64(e.Data), fwdTol)

			r := randSlice(rng, len(out), 1)
			dqkv := randSlice(rng, len(qkv), 1)
			attentionBackward(dqkv, qkv, out, r, a)
			want := fdGrad(func(x []float64) float64 { return dot64(r, refAttention(x, a)) }, to64(qkv), fdEps)
			checkGrad(t, caseName("attention backward %+v block %d", c, block), dqkv, want, gradTol)
			if !slices.Equal(qkv, q0) {
				t.Fatal("attention modified its input")
			}
		}
	}
}

func TestHeadNormKernel(t *testing.T) {
	rng := rand.New(rand.NewPCG(8, 1))
	for _, c := range []struct{ n, qh, kh, rest, hd int }{{1, 1, 1, 0, 2}, {1, 1, 1, 3, 2}, {3, 4, 2, 4, 6}, {5, 2, 2, 10, 5}, {2, 6, 2, 16, 8}} {
		width := (c.qh+c.kh)*c.hd + c.rest
		wq, wk := randSlice(rng, c.hd, 1), randSlice(rng, c.hd, 1)
		x := randSlice(rng, c.n*width, 2)
		x0 := slices.Clone(x)
		y := randSlice(rng, len(x), 1) // dirty: must be overwritten
		headNormForward(y, x, width, c.qh, c.kh, wq, wk, 1e-5)
		checkClose(t, caseName("headnorm %+v", c), y, refHeadNorm(to64(x), width, c.qh, c.kh, wq, wk, 1e-5), fwdTol)
		// Each head equals the engine's RMSNorm of that head, as model's forward applies it.
		for i := range c.n {
			for h := range c.qh + c.kh {
				w := wq
				if h >= c.qh {
					w = wk
				}
				off := i*width + h*c.hd
				e := tensor.New(1, c.hd)
				tensor.RMSNorm(e, tensor.FromData(1, c.hd, x[off:off+c.hd]), w, 1e-5)
				if !slices.Equal(e.Data, y[off:off+c.hd]) {
					t.Fatalf("headnorm %+v row %d head %d differs from the engine", c, i, h)
				}
			}
		}
		r := randSlice(rng, len(x), 1)
		dx := randSlice(rng, len(x), 1)
		headNormBackward(dx, x, r, width, c.qh, c.kh, wq, wk, 1e-5)
		want := fdGrad(func(x []float64) float64 {
			return dot64(r, refHeadNorm(x, width, c.qh, c.kh, wq, wk, 1e-5))
		}, to64(x), fdEps)
		checkGrad(t, caseName("headnorm backward %+v", c), dx, want, gradTol)
		if !slices.Equal(x, x0) {
			t.Fatal("headnorm modified its input")
		}
	}
}

func TestSwiGLUKernel(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 1))
	for _, c := range []struct{ n, f int }{{1, 1}, {3, 5}, {4, 32}} {
		gu := randSlice(rng, c.n*2*c.f, 2)
		g0 := slices.Clone(gu)
		y := randSlice(rng, c.n*c.f, 1)
		swigluForward(y, gu, c.f)
		checkClose(t, caseName("swiglu %+v", c), y, refSwiGLU(to64(gu), c.f), fwdTol)
		r := randSlice(rng, len(y), 1)
		dgu := randSlice(rng, len(gu), 1)
		swigluBackward(dgu, gu, r, c.f)
		want := fdGrad(func(x []float64) float64 { return dot64(r, refSwiGLU(x, c.f)) }, to64(gu), fdEps)
		checkGrad(t, caseName("swiglu backward %+v", c), dgu, want, gradTol)
		if !slices.Equal(gu, g0) {
			t.Fatal("swiglu modified its input")
		}
	}
}

func TestGatherKernel(t *testing.T) {
	rng := rand.New(rand.NewPCG(6, 1))
	for _, c := range []struct{ n, d, V, k int }{{1, 1, 1, 1}, {3, 4, 9, 2}, {5, 16, 50, 7}} {
		w := randMatrix(rng, c.V, c.d, 1)
		h := randSlice(rng, c.n*c.d, 1)
		idx := make([]int32, c.n*c.k)
		for i := range idx {
			idx[i] = int32(rng.IntN(c.V))
		}
		z := randSlice(rng, c.n*c.k, 1)
		gatherForward(z, h, idx, w, c.k)
		checkClose(t, caseName("gather %+v", c), z, refGather(to64(h), idx, w, c.k), fwdTol)
		r := randSlice(rng, len(z), 1)
		dh := randSlice(rng, len(h), 1)
		gatherBackward(dh, r, idx, w, c.k)
		want := fdGrad(func(x []float64) float64 { return dot64(r, refGather(x, idx, w, c.k)) }, to64(h), fdEps)
		checkGrad(t, caseName("gather backward %+v", c), dh, want, gradTol)
	}
}

func TestLossKernels(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 1))
	for _, c := range []struct{ n, k int }{{1, 1}, {1, 5}, {6, 7}, {4, 50}} {
		z := randSlice(rng, c.n*c.k, 3)
		p := make([]float32, len(z))
		for r := range c.n {
			row := randSlice(rng, c.k, 2)
			tensor.Softmax(row)
			copy(p[r*c.k:], row)
		}
		p[0] = 0 // a zero probability (0·log 0 = 0)
		g := float32(0.5 + rng.Float64())

		ce := crossEntropyForward(z, p, c.k)
		if want := refCE(to64(z), to64(p), c.k); !near(ce, want, 1e-5) {
			t.Fatalf("cross-entropy %+v = %g, want %g", c, ce, want)
		}
		if kl, want := ce+negEntropy(p, c.k), refKL(to64(z), to64(p), c.k); !near(kl, want, 1e-5) {
			t.Fatalf("KL %+v = %g, want %g", c, kl, want)
		}
		dz := make([]float32, len(z))
		crossEntropyBackward(dz, z, p, c.k, g)
		pp := to64(p)
		want := fdGrad(func(x []float64) float64 { return float64(g) * refCE(x, pp, c.k) }, to64(z), fdEps)
		checkGrad(t, caseName("cross-entropy backward %+v", c), dz, want, gradTol)

		y := randSlice(rng, c.n*c.k, 1)
		mse := mseForward(y, z)
		if want := refMSE(to64(y), to64(z)); !near(mse, want, 1e-6) {
			t.Fatalf("mse %+v = %g, want %g", c, mse, want)
		}
		dy := make([]float32, len(y))
		mseBackward(dy, y, z, g)
		zz := to64(z)
		want = fdGrad(func(x []float64) float64 { return float64(g) * refMSE(x, zz) }, to64(y), fdEps)
		checkGrad(t, caseName("mse backward %+v", c), dy, want, gradTol)
	}
}

func near(a, b, tol float64) bool { return a-b <= tol*(1+abs(b)) && b-a <= tol*(1+abs(b)) }

func abs(x float64) float64 {
	if x < 0 {
		return -x
	}
	return x
}
