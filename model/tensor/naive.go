package tensor

import "math"

// The naive twins below define what the fast kernels compute. They favour obviousness
// over speed, accumulate in float64 and check no shapes: tests call them with shapes the
// fast kernels have accepted.

func naiveMulT(dst, a, b *Matrix) {
	for i := range dst.Rows {
		for j := range dst.Cols {
			var s float64
			for p := range a.Cols {
				s += float64(a.Data[i*a.Cols+p]) * float64(b.Data[j*b.Cols+p])
			}
			dst.Data[i*dst.Cols+j] = float32(s)
		}
	}
}

func naiveMul(dst, a, b *Matrix) {
	for i := range dst.Rows {
		for j := range dst.Cols {
			var s float64
			for p := range a.Cols {
				s += float64(a.Data[i*a.Cols+p]) * float64(b.Data[p*b.Cols+j])
			}
			dst.Data[i*dst.Cols+j] = float32(s)
		}
	}
}

func naiveRMSNorm(dst, x *Matrix, w []float32, eps float32) {
	for i := range x.Rows {
		var ss float64
		for j := range x.Cols {
			v := float64(x.Data[i*x.Cols+j])
			ss += v * v
		}
		inv := 1 / math.Sqrt(ss/float64(x.Cols)+float64(eps))
		for j := range x.Cols {
			dst.Data[i*x.Cols+j] = float32(float64(x.Data[i*x.Cols+j]) * inv * float64(w[j]))
		}
	}
}

func naiveAddBias(m *Matrix, b []float32) {
	for i := range m.Rows {
		for j := range m.Cols {
			m.Data[i*m.Cols+j] += b[j]
		}
	}
}

func naiveAdd(dst, x *Matrix) {
	for i := range dst.Data {
		dst.Data[i] += x.Data[i]
	}
}

func naiveSwiGLU(dst, gate, up *Matrix) {
	for i := range dst.Data {
		g := float64(gate.Data[i])
		dst.Data[i] = float32(g / (1 + math.Exp(-g)) * float64(up.Data[i]))
	}
}

func naiveSoftmax(x []float32) {
	mx := math.Inf(-1)
	for _, v := range x {
		mx = math.Max(mx, float64(v))
	}
	var sum float64
	for _, v := range x {
		sum += math.Exp(float64(v) - mx)
	}
	for i, v := range x {
		x[i] = float32(math.Exp(float64(v)-mx) / sum)
	}
}

func naiveLogSumExp(x []float32) float32 {
	var sum float64
	for _, v := range x {
		sum += math.Exp(float64(v))
	}
	return float32(math.Log(sum))
}

// naiveRope rotates x in place computing every angle on the fly.
func naiveRope(x *Matrix, invFreq []float32, heads, seqLen int) {
	half := len(invFreq)
	hd := 2 * half
	for i := range x.Rows {
		pos := i % seqLen
		for h := range heads {
			for j := range half {
				theta := float64(float32(pos) * invFreq[j])
				c, s := math.Cos(theta), math.Sin(theta)
				p0, p1 := i*x.Cols+h*hd+j, i*x.Cols+h*hd+j+half
				a, b := float64(x.Data[p0]), float64(x.Data[p1])
				x.Data[p0] = float32(a*c - b*s)
				x.Data[p1] = float32(b*c + a*s)
			}
		}
	}
}

// naiveAttention is causal grouped-query attention, one query row at a time; window > 0
// restricts query t to the keys s with t − window < s ≤ t.
func naiveAttention(dst, q, k, v *Matrix, seqLen, heads, kvHeads, window int) {
	hd := q.Cols / heads
	group := heads / kvHeads
	scores := make([]float64, seqLen)
	for i := range q.Rows {
		t := i % seqLen
		start := i - t // first row of this sequence
		j0 := 0        // first visible key
		if window > 0 {
			j0 = max(0, t-window+1)
		}
		for h := range heads {
			kh := h / group
			mx := math.Inf(-1)
			for j := j0; j <= t; j++ {
				var s float64
				for d := range hd {
					s += float64(q.Data[i*q.Cols+h*hd+d]) * float64(k.Data[(start+j)*k.Cols+kh*hd+d])
				}
				scores[j] = s / math.Sqrt(float64(hd))
				mx = math.Max(mx, scores[j])
			}
			var sum float64
			for j := j0; j <= t; j++ {
				scores[j] = math.Exp(scores[j] - mx)
				sum += scores[j]
			}
			for d := range hd {
				var o float64
				for j := j0; j <= t; j++ {
					o += scores[j] * float64(v.Data[(start+j)*v.Cols+kh*hd+d])
				}
				dst.Data[i*dst.Cols+h*hd+d] = float32(o / sum)
			}
		}
	}
}
