package tensor

import "math"

// elemGrain is the minimum number of elements per goroutine for the elementwise kernels;
// below it they run on the calling goroutine.
const elemGrain = 1 << 15

// RMSNorm sets each row of dst to x_row / sqrt(mean(x_row²) + eps) * w, as Hugging Face's
// LlamaRMSNorm does (normalize, then scale by w). The mean of squares is accumulated in
// float64; the scaling is float32. dst may alias x (in place). It panics unless dst and x
// have the same shape and len(w) == x.Cols.
func RMSNorm(dst, x *Matrix, w []float32, eps float32) {
	mustShape("RMSNorm", dst.SameShape(x) && len(w) == x.Cols,
		"dst %d×%d, x %d×%d, weight %d", dst.Rows, dst.Cols, x.Rows, x.Cols, len(w))
	n := x.Cols
	if n == 0 {
		return
	}
	parallelFor(x.Rows, max(1, elemGrain/n), func(lo, hi int) {
		for r := lo; r < hi; r++ {
			xr := x.Data[r*n : (r+1)*n]
			dr := dst.Data[r*n : (r+1)*n]
			scale := rmsScale(xr, eps)
			dr = dr[:len(xr)]
			w := w[:len(xr)]
			for j, v := range xr {
				dr[j] = (v * scale) * w[j]
			}
		}
	})
}

// rmsScale returns float32(1/sqrt(mean(x²)+eps)) with the sum of squares in float64.
func rmsScale(x []float32, eps float32) float32 {
	var s0, s1, s2, s3 float64
	i := 0
	for ; i+4 <= len(x); i += 4 {
		a, b, c, d := float64(x[i]), float64(x[i+1]), float64(x[i+2]), float64(x[i+3])
		s0 += a * a
		s1 += b * b
		s2 += c * c
		s3 += d * d
	}
	for ; i < len(x); i++ {
		a := float64(x[i])
		s0 += a * a
	}
	mean := (s0 + s1 + s2 + s3) / float64(len(x))
	return float32(1 / math.Sqrt(mean+float64(eps)))
}

// AddBias adds b to every row of m in place. It panics unless len(b) == m.Cols.
func AddBias(m *Matrix, b []float32) {
	mustShape("AddBias", len(b) == m.Cols, "matrix %d×%d, bias %d", m.Rows, m.Cols, len(b))
	n := m.Cols
	if n == 0 {
		return
	}
	parallelFor(m.Rows, max(1, elemGrain/n), func(lo, hi int) {
		for r := lo; r < hi; r++ {
			row := m.Data[r*n : (r+1)*n]
			b := b[:len(row)]
			for j := range row {
				row[j] += b[j]
			}
		}
	})
}

// Add sets dst += x elementwise. x may alias dst (doubling it). It panics unless dst and
// x have the same shape.
func Add(dst, x *Matrix) {
	mustShape("Add", dst.SameShape(x), "dst %d×%d, x %d×%d", dst.Rows, dst.Cols, x.Rows, x.Cols)
	parallelFor(len(dst.Data), elemGrain, func(lo, hi int) {
		d, s := dst.Data[lo:hi], x.Data[lo:hi]
		s = s[:len(d)]
		for i := range d {
			d[i] += s[i]
		}
	})
}

// SwiGLU sets dst = silu(gate) * up elementwise, with silu(g) = g / (1 + e^-g). dst may
// alias gate or up. It panics unless all three have the same shape.
func SwiGLU(dst, gate, up *Matrix) {
	mustShape("SwiGLU", dst.SameShape(gate) && dst.SameShape(up),
		"dst %d×%d, gate %d×%d, up %d×%d", dst.Rows, dst.Cols, gate.Rows, gate.Cols, up.Rows, up.Cols)
	parallelFor(len(dst.Data), elemGrain, func(lo, hi int) {
		d, g, u := dst.Data[lo:hi], gate.Data[lo:hi], up.Data[lo:hi]
		g, u = g[:len(d)], u[:len(d)]
		for i := range d {
			gi := g[i]
			d[i] = gi / (1 + exp32(-gi)) * u[i]
		}
	})
}

// Softmax replaces x by softmax(x) in place, subtracting the maximum first so that large
// inputs do not overflow; the normalizing sum is accumulated in float64. An empty x is
// left alone; -Inf entries get probability 0 (all -Inf gives NaN, as in PyTorch).
func Softmax(x []float32) {
	if len(x) == 0 {
		return
	}
	mx := x[0]
	for _, v := range x[1:] {
		if v > mx {
			mx = v
		}
	}
	sum := expShift(x, x, mx) // a NaN anywhere makes sum, and so every output, NaN
	inv := float32(1 / sum)
	for i := range x {
		x[i] *= inv
	}
}

// LogSumExp returns log(Σ e^x_i), computed stably as max + log(Σ e^(x_i - max)) with the
// sum in float64. It returns -Inf for an empty x or when every x_i is -Inf, +Inf if any
// x_i is +Inf, and NaN if any is NaN.
func LogSumExp(x []float32) float32 {
	if len(x) == 0 {
		return float32(math.Inf(-1))
	}
	mx := x[0]
	for _, v := range x[1:] {
		if v > mx || v != v {
			mx = v
		}
		if mx != mx {
			return mx
		}
	}
	if math.IsInf(float64(mx), 0) {
		return mx
	}
	var sum float64
	var buf [256]float32
	for len(x) > 0 {
		n := min(len(x), len(buf))
		sum += expShift(buf[:], x[:n], mx)
		x = x[n:]
	}
	return float32(float64(mx) + math.Log(sum))
}
