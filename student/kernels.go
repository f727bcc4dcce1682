package student

import (
	"math"
	"sync"

	"gonum.org/v1/gonum/blas"
	gonumblas "gonum.org/v1/gonum/blas/gonum"
	"gorgonia.org/gorgonia"

	"linearpatch/model/tensor"
)

// The kernels below are the forward and backward passes of the custom gorgonia ops, over
// row-major float32 slices. Each writes into its first argument (which must not alias an
// input unless said otherwise) and trusts the shapes its op has checked; kernels_test.go
// holds float64 naive twins and finite-difference checks of every one.

// rowGrain is the minimum number of elements a goroutine of the row-parallel kernels gets.
const rowGrain = 1 << 14

// parallelRows runs fn over [0, n) rows split into contiguous chunks on up to
// tensor.Threads() goroutines, each chunk holding at least rowGrain/width rows.
func parallelRows(n, width int, fn func(lo, hi int)) {
	if n <= 0 {
		return
	}
	per := max(1, rowGrain/max(width, 1))
	w := min(tensor.Threads(), (n+per-1)/per)
	if w <= 1 {
		fn(0, n)
		return
	}
	chunk := (n + w - 1) / w
	var wg sync.WaitGroup
	for lo := chunk; lo < n; lo += chunk {
		wg.Add(1)
		go func(lo, hi int) {
			defer wg.Done()
			fn(lo, hi)
		}(lo, min(lo+chunk, n))
	}
	fn(0, min(chunk, n))
	wg.Wait()
}

// sgemm is c = alpha·op(a)·op(b) + beta·c in row-major order through the BLAS gorgonia
// uses (OpenBLAS via netlib in cgo builds, gonum otherwise). It returns at once when the
// product is empty.
func sgemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int,
	b []float32, ldb int, beta float32, c []float32, ldc int) {
	if m == 0 || n == 0 {
		return
	}
	ta, tb := blas.NoTrans, blas.NoTrans
	if transA {
		ta = blas.Trans
	}
	if transB {
		tb = blas.Trans
	}
	gorgonia.WhichBLAS().Sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

// vec is gonum's pure-Go BLAS, used for the level-1 routines (assembly dot and axpy).
var vec gonumblas.Implementation

// linearForward sets y = x·[W_0; W_1; …]ᵀ (+ bias) for frozen weights W_j stored [out_j,
// in]: x is n×in and y is n×Σout_j, block j filling columns [off_j, off_j+out_j). bias[j]
// may be nil.
func linearForward(y, x []float32, n int, ws []*tensor.Matrix, bias [][]float32) {
	in := ws[0].Cols
	out := 0
	for _, w := range ws {
		out += w.Rows
	}
	off := 0
	for j, w := range ws {
		forWeightBlocks(w, func(lo, hi int, wf []float32) {
			psgemm(false, true, n, hi-lo, in, 1, x, in, wf, in, 0, y[off+lo:], out)
		})
		if j < len(bias) && bias[j] != nil {
			b := bias[j]
			for r := range n {
				row := y[r*out+off : r*out+off+w.Rows]
				for c := range row {
					row[c] += b[c]
				}
			}
		}
		off += w.Rows
	}
}

// linearBackward sets dx = Σ_j dy[:, block j]·W_j, the input gradient of linearForward
// (the weights and biases are frozen and get none).
func linearBackward(dx, dy []float32, n int, ws []*tensor.Matrix) {
	in := ws[0].Cols
	out := 0
	for _, w := range ws {
		out += w.Rows
	}
	off := 0
	for j, w := range ws {
		forWeightBlocks(w, func(lo, hi int, wf []float32) {
			beta := float32(1)
			if j == 0 && lo == 0 {
				beta = 0
			}
			psgemm(false, false, n, in, hi-lo, 1, dy[off+lo:], out, wf, in, beta, dx, in)
		})
		off += w.Rows
	}
}

// weightBlockRows is the number of rows of a half-precision (BF16/F16) frozen weight the
// linear kernels widen to float32 at a time.
const weightBlockRows = 256

// weightScratch holds widened weight blocks (*[]float32) between calls.
var weightScratch sync.Pool

// forWeightBlocks calls fn, in order, for row blocks [lo, hi) covering w with their float32
// values (row-major, width w.Cols): once with w.Data for a float32 w; for a half w, per block
// of weightBlockRows rows widened into a scratch that fn must not keep.
func forWeightBlocks(w *tensor.Matrix, fn func(lo, hi int, wf []float32)) {
	if !w.IsHalf() {
		fn(0, w.Rows, w.Data)
		return
	}
	need := min(weightBlockRows, w.Rows) * w.Cols
	var buf []float32
	if p, ok := weightScratch.Get().(*[]float32); ok && cap(*p) >= need {
		buf = (*p)[:need]
	} else {
		buf = make([]float32, need)
	}
	for lo := 0; lo < w.Rows; lo += weightBlockRows {
		hi := min(lo+weightBlockRows, w.Rows)
		fn(lo, hi, w.RowsF32(lo, hi, buf))
	}
	weightScratch.Put(&buf)
}

// rmsInv returns float32(1/sqrt(mean(x²)+eps)) with the sum in float64, as the engine's
// tensor.RMSNorm computes it.
func rmsInv(x []float32, eps float32) float32 {
	var s float64
	for _, v := range x {
		s += float64(v) * float64(v)
	}
	return float32(1 / math.Sqrt(s/float64(len(x))+float64(eps)))
}

// rmsNormForward sets y = x·inv(x)·w row by row (n rows of width len(w)), rounding as the
// engine's tensor.RMSNorm does.
func rmsNormForward(y, x []float32, w []float32, eps float32) {
	d := len(w)
	parallelRows(len(x)/d, d, func(lo, hi int) {
		for r := lo; r < hi; r++ {
			xr, yr := x[r*d:(r+1)*d], y[r*d:(r+1)*d]
			inv := rmsInv(xr, eps)
			for j, v := range xr {
				yr[j] = (v * inv) * w[j]
			}
		}
	})
}

// rmsNormBackward sets dx, the input gradient of rmsNormForward for output gradient dy:
// dx_j = inv·w_j·dy_j − x_j·inv³·Σ_k(w_k·dy_k·x_k)/d.
func rmsNormBackward(dx, x, dy []float32, w []float32, eps float32) {
	d := len(w)
	parallelRows(len(x)/d, d, func(lo, hi int) {
		for r := lo; r < hi; r++ {
			xr, gr, dr := x[r*d:(r+1)*d], dy[r*d:(r+1)*d], dx[r*d:(r+1)*d]
			var ss, dot float64
			for j, v := range xr {
				ss += float64(v) * float64(v)
				dot += float64(w[j]) * float64(gr[j]) * float64(v)
			}
			inv := 1 / math.Sqrt(ss/float64(d)+float64(eps))
			a := float32(inv)
			c := float32(inv * inv * inv * dot / float64(d))
			for j, v := range xr {
				dr[j] = a*w[j]*gr[j] - c*v
			}
		}
	})
}

// headNormForward sets y to x with per-head RMSNorm (Qwen3's q_norm and k_norm) applied to
// the first qHeads+kHeads heads of width hd of every row: heads [0, qHeads) scaled by wq,
// the next kHeads by wk, the remaining columns copied. Rows are width wide. Each head rounds
// as the engine's tensor.RMSNorm does.
func headNormForward(y, x []float32, width, qHeads, kHeads int, wq, wk []float32, eps float32) {
	hd := len(wq)
	parallelRows(len(x)/width, width, func(lo, hi int) {
		for i := lo; i < hi; i++ {
			xr, yr := x[i*width:(i+1)*width], y[i*width:(i+1)*width]
			for h := range qHeads + kHeads {
				w := wq
				if h >= qHeads {
					w = wk
				}
				xs, ys := xr[h*hd:(h+1)*hd], yr[h*hd:(h+1)*hd]
				inv := rmsInv(xs, eps)
				for j, v := range xs {
					ys[j] = (v * inv) * w[j]
				}
			}
			copy(yr[(qHeads+kHeads)*hd:], xr[(qHeads+kHeads)*hd:])
		}
	})
}

// headNormBackward sets dx, the input gradient of headNormForward for output gradient dy:
// each normed head as rmsNormBackward, the copied columns passing dy through.
func headNormBackward(dx, x, dy []float32, width, qHeads, kHeads int, wq, wk []float32, eps float32) {
	hd := len(wq)
	parallelRows(len(x)/width, width, func(lo, hi int) {
		for i := lo; i < hi; i++ {
			xr, gr, dr := x[i*width:(i+1)*width], dy[i*width:(i+1)*width], dx[i*width:(i+1)*width]
			for h := range qHeads + kHeads {
				w := wq
				if h >= qHeads {
					w = wk
				}
				xs, gs, ds := xr[h*hd:(h+1)*hd], gr[h*hd:(h+1)*hd], dr[h*hd:(h+1)*hd]
				var ss, dot float64
				for j, v := range xs {
					ss += float64(v) * float64(v)
					dot += float64(w[j]) * float64(gs[j]) * float64(v)
				}
				inv := 1 / math.Sqrt(ss/float64(hd)+float64(eps))
				a := float32(inv)
				c := float32(inv * inv * inv * dot / float64(hd))
				for j, v := range xs {
					ds[j] = a*w[j]*gs[j] - c*v
				}
			}
			copy(dr[(qHeads+kHeads)*hd:], gr[(qHeads+kHeads)*hd:])
		}
	})
}

// ropeTables holds cos and sin of the rotary angles for positions [0, T): entry pos·half+j,
// computed as the engine's tensor.Rope does (angle float32(pos)·invFreq[j] in float32,
// cosine and sine in float64 rounded to float32).
type ropeTables struct {
	half     int
	cos, sin []float32
}

func newRopeTables(invFreq []float32, T int) *ropeTables {
	half := len(invFreq)
	t := &ropeTables{half: half, cos: make([]float32, T*half), sin: make([]float32, T*half)}
	for pos := range T {
		for j, f := range invFreq {
			theta := float64(float32(pos) * f)
			t.cos[pos*half+j] = float32(math.Cos(theta))
			t.sin[pos*half+j] = float32(math.Sin(theta))
		}
	}
	return t
}

// ropeForward sets y to x with the first `heads` heads of every row rotated (rotate-half
// convention, position = row % T) and the remaining columns copied. Rows are width wide;
// T is the number of positions the tables cover.
func ropeForward(y, x []float32, width, heads, T int, tab *ropeTables) {
	ropeApply(y, x, width, heads, T, tab, 1)
}

// ropeBackward sets dx = Rᵀ·dy, the input gradient of ropeForward (the inverse rotation).
func ropeBackward(dx, dy []float32, width, heads, T int, tab *ropeTables) {
	ropeApply(dx, dy, width, heads, T, tab, -1)
}

func ropeApply(y, x []float32, width, heads, T int, tab *ropeTables, sign float32) {
	half := tab.half
	hd := 2 * half
	parallelRows(len(x)/width, width, func(lo, hi int) {
		for i := lo; i < hi; i++ {
			pos := i % T
			cs := tab.cos[pos*half : (pos+1)*half]
			sn := tab.sin[pos*half : (pos+1)*half]
			xr, yr := x[i*width:(i+1)*width], y[i*width:(i+1)*width]
			for h := range heads {
				x0, x1 := xr[h*hd:h*hd+half], xr[h*hd+half:(h+1)*hd]
				y0, y1 := yr[h*hd:h*hd+half], yr[h*hd+half:(h+1)*hd]
				for j, a := range x0 {
					b := x1[j]
					s := sign * sn[j]
					y0[j] = a*cs[j] - b*s
					y1[j] = b*cs[j] + a*s
				}
			}
			copy(yr[heads*hd:], xr[heads*hd:])
		}
	})
}

// swigluForward sets y = silu(gate)·up for gu rows laid out [gate | up] (width 2f), y rows of
// width f, with the engine's tensor.SwiGLU (bit-identical to the engine's forward).
func swigluForward(y, gu []float32, f int) {
	parallelRows(len(y)/f, 2*f, func(lo, hi int) {
		for r := lo; r < hi; r++ {
			dst := tensor.FromData(1, f, y[r*f:(r+1)*f])
			gate := tensor.FromData(1, f, gu[2*r*f:(2*r+1)*f])
			up := tensor.FromData(1, f, gu[(2*r+1)*f:(2*r+2)*f])
			tensor.SwiGLU(dst, gate, up)
		}
	})
}

// swigluBackward sets dgu = [dgate | dup], the input gradient of swigluForward:
// dup = dy·silu(g), dgate = dy·up·σ(g)·(1 + g·(1 − σ(g))).
func swigluBackward(dgu, gu, dy []float32, f int) {
	parallelRows(len(dy)/f, 2*f, func(lo, hi int) {
		for r := lo; r < hi; r++ {
			g, u := gu[2*r*f:(2*r+1)*f], gu[(2*r+1)*f:(2*r+2)*f]
			dg, du := dgu[2*r*f:(2*r+1)*f], dgu[(2*r+1)*f:(2*r+2)*f]
			dyr := dy[r*f : (r+1)*f]
			for j, gv := range g {
				sig := float32(1 / (1 + math.Exp(-float64(gv))))
				silu := gv * sig
				du[j] = dyr[j] * silu
				dg[j] = dyr[j] * u[j] * sig * (1 + gv*(1-sig))
			}
		}
	})
}

// gatherForward sets z[t,k] = h_t·W[idx[t,k]]: for each of the n rows of h (width d) the
// logits of the k head rows named by idx, never the full vocabulary.
func gatherForward(z, h []float32, idx []int32, w *tensor.Matrix, k int) {
	d := w.Cols
	parallelRows(len(h)/d, k*d, func(lo, hi int) {
		buf := make([]float32, d) // a half head's row, widened
		for t := lo; t < hi; t++ {
			ht := h[t*d : (t+1)*d]
			for j := range k {
				z[t*k+j] = vec.Sdot(d, ht, 1, w.RowF32(int(idx[t*k+j]), buf), 1)
			}
		}
	})
}

// gatherBackward sets dh_t = Σ_k dz[t,k]·W[idx[t,k]], the gradient of gatherForward with
// respect to h (W is frozen).
func gatherBackward(dh, dz []float32, idx []int32, w *tensor.Matrix, k int) {
	d := w.Cols
	parallelRows(len(dh)/d, k*d, func(lo, hi int) {
		buf := make([]float32, d) // a half head's row, widened
		for t := lo; t < hi; t++ {
			dt := dh[t*d : (t+1)*d]
			clear(dt)
			for j := range k {
				if g := dz[t*k+j]; g != 0 {
					vec.Saxpy(d, g, w.RowF32(int(idx[t*k+j]), buf), 1, dt, 1)
				}
			}
		}
	})
}

// crossEntropyForward returns −Σ_rows Σ_j p[r,j]·log softmax(z_r)_j / n for n rows of
// width k, accumulated in float64. Rows whose probabilities are all zero contribute 0.
func crossEntropyForward(z, p []float32, k int) float64 {
	n := len(z) / k
	parts := make([]float64, n)
	parallelRows(n, k, func(lo, hi int) {
		for r := lo; r < hi; r++ {
			zr, pr := z[r*k:(r+1)*k], p[r*k:(r+1)*k]
			lse := float64(tensor.LogSumExp(zr))
			var s float64
			for j, pv := range pr {
				if pv != 0 {
					s += float64(pv) * (lse - float64(zr[j]))
				}
			}
			parts[r] = s
		}
	})
	var sum float64
	for _, v := range parts {
		sum += v
	}
	return sum / float64(n)
}

// crossEntropyBackward sets dz = g·(softmax(z_r)·Σ_j p[r,j] − p_r)/n, the gradient of
// crossEntropyForward scaled by the incoming gradient g.
func crossEntropyBackward(dz, z, p []float32, k int, g float32) {
	n := len(z) / k
	scale := g / float32(n)
	parallelRows(n, k, func(lo, hi int) {
		for r := lo; r < hi; r++ {
			zr, pr, dr := z[r*k:(r+1)*k], p[r*k:(r+1)*k], dz[r*k:(r+1)*k]
			var mass float64
			for _, pv := range pr {
				mass += float64(pv)
			}
			copy(dr, zr)
			tensor.Softmax(dr)
			m := float32(mass)
			for j := range dr {
				dr[j] = scale * (dr[j]*m - pr[j])
			}
		}
	})
}

// negEntropy returns Σ_rows Σ_j p·log p / n (0·log 0 = 0), the constant that turns the
// cross-entropy into the KL divergence.
func negEntropy(p []float32, k int) float64 {
	var s float64
	for _, v := range p {
		if v > 0 {
			s += float64(v) * math.Log(float64(v))
		}
	}
	return s / float64(len(p)/k)
}

// mseForward returns Σ (y − t)² / len(y), accumulated in float64.
func mseForward(y, t []float32) float64 {
	var s float64
	for i, v := range y {
		e := float64(v) - float64(t[i])
		s += e * e
	}
	return s / float64(len(y))
}

// mseBackward sets dy = g·2(y − t)/len(y).
func mseBackward(dy, y, t []float32, g float32) {
	scale := 2 * g / float32(len(y))
	for i, v := range y {
		dy[i] = scale * (v - t[i])
	}
}
