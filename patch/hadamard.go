package patch

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"strconv"
	"strings"
	"sync"
)

// ErrHadamardSize is wrapped by the error NewHadamard returns for an order it
// cannot build.
var ErrHadamardSize = errors.New("patch: unsupported Hadamard order")

// Hadamard is a normalized d×d Hadamard matrix H (HHᵀ = I), deterministic for
// each d. Activations are row vectors and are rotated as x·H.
//
// Construction. Every supported d is m·2^k, and
//
//	H = (H_m ⊗ S_(2^k)) / √d,   entry [i·2^k + a][j·2^k + b] = H_m[i][j]·S[a][b] / √d,
//
// where S is the Sylvester matrix in natural order (S_1 = [1],
// S_2n = [[S_n, S_n], [S_n, −S_n]], so S[a][b] = (−1)^popcount(a AND b)) and
// H_m is a fixed ±1 Hadamard matrix of order m (the factor is on the left of
// the Kronecker product). For d = 2^k, m = 1 and H is the plain normalized
// Sylvester matrix, with no random signs. The factors are:
// m = 12, 20, 44, 60, 108, 140 by Paley I; 28, 36, 52 by Paley II;
// 156, 172 by Williamson's construction (see hadamard_factors.go). A d with
// two readings (d = 40·2^k = 20·2^(k+1)) uses the smallest m: 40·2^k is
// H_20 ⊗ S_(2^(k+1)).
//
// A Hadamard is immutable and safe for concurrent use.
type Hadamard struct {
	d, m, n int       // d = m·n, n = 2^k
	factor  []int8    // H_m row-major, ±1; nil when m = 1
	fwd     []float64 // fwd[j·m+i] = H_m[i][j]: row j of H_mᵀ (Rotate)
	bwd     []float64 // bwd[j·m+i] = H_m[j][i]: row j of H_m (RotateBack)
	scale   float64   // 1/√d
	scratch sync.Pool // *[]float64 of length 2d
}

// hadamardSizeError is the error for an unsupported order; it wraps
// ErrHadamardSize.
type hadamardSizeError struct{ d int }

func (e *hadamardSizeError) Error() string {
	ms := make([]string, len(hadamardAdvertised))
	for i, m := range hadamardAdvertised {
		ms[i] = strconv.Itoa(m)
	}
	return fmt.Sprintf("patch: no Hadamard matrix of order %d: supported are 2^k and m·2^k for m in {%s}",
		e.d, strings.Join(ms, ", "))
}

func (e *hadamardSizeError) Unwrap() error { return ErrHadamardSize }

// splitHadamardOrder writes d = m·n with n a power of two and m = 1 or the order of a
// factor in hadamardFactors. Factor orders are 4·(odd), so the split, when it
// exists, is unique: m = 4·(odd part of d).
func splitHadamardOrder(d int) (m, n int, ok bool) {
	if d <= 0 {
		return 0, 0, false
	}
	t := bits.TrailingZeros(uint(d))
	odd := d >> t
	if odd == 1 {
		return 1, d, true
	}
	if t < 2 {
		return 0, 0, false
	}
	if _, ok := hadamardFactorFor(4 * odd); !ok {
		return 0, 0, false
	}
	return 4 * odd, 1 << (t - 2), true
}

// SupportedHadamard reports whether NewHadamard can build a matrix of order d.
func SupportedHadamard(d int) bool {
	_, _, ok := splitHadamardOrder(d)
	return ok
}

// NewHadamard returns the deterministic normalized Hadamard matrix of order d
// (see Hadamard for the construction). For an unsupported d (including d ≤ 0)
// it returns an error wrapping ErrHadamardSize that names the supported orders.
func NewHadamard(d int) (*Hadamard, error) {
	m, n, ok := splitHadamardOrder(d)
	if !ok {
		return nil, &hadamardSizeError{d: d}
	}
	h := &Hadamard{d: d, m: m, n: n, scale: 1 / math.Sqrt(float64(d))}
	if m > 1 {
		f, _ := hadamardFactorFor(m)
		h.factor = buildHadamardFactor(f)
		h.fwd = make([]float64, m*m)
		h.bwd = make([]float64, m*m)
		for i := 0; i < m; i++ {
			for j := 0; j < m; j++ {
				v := float64(h.factor[i*m+j])
				h.fwd[j*m+i] = v
				h.bwd[i*m+j] = v
			}
		}
	}
	h.scratch.New = func() any {
		s := make([]float64, 2*d)
		return &s
	}
	return h, nil
}

// Dim returns the order d.
func (h *Hadamard) Dim() int { return h.d }

// Dense returns H as a row-major d×d slice; the caller owns it (a fresh copy
// on every call).
func (h *Hadamard) Dense() []float64 {
	d, m, n := h.d, h.m, h.n
	out := make([]float64, d*d)
	for r := 0; r < d; r++ {
		i, a := r/n, r%n
		for c := 0; c < d; c++ {
			j, b := c/n, c%n
			v := h.scale
			if bits.OnesCount(uint(a&b))&1 == 1 {
				v = -v
			}
			if m > 1 && h.factor[i*m+j] < 0 {
				v = -v
			}
			out[r*d+c] = v
		}
	}
	return out
}

// Rotate computes x ← x·H in place. It panics if len(x) != Dim().
// Cost: a fast Walsh–Hadamard transform of each of the m blocks of length 2^k
// (O(d log 2^k)), then the order-m factor applied densely (O(d·m)).
func (h *Hadamard) Rotate(x []float64) {
	h.check("Rotate", len(x))
	h.apply(x, h.fwd)
}

// RotateBack computes x ← x·Hᵀ in place, the inverse of Rotate. It panics if
// len(x) != Dim().
func (h *Hadamard) RotateBack(x []float64) {
	h.check("RotateBack", len(x))
	h.apply(x, h.bwd)
}

// Rotate32 computes x ← x·H in place for a float32 row. The transform runs in
// float64 and each entry is rounded to float32 once at the end. It panics if
// len(x) != Dim().
func (h *Hadamard) Rotate32(x []float32) {
	h.check("Rotate32", len(x))
	h.apply32(x, h.fwd)
}

// RotateBack32 computes x ← x·Hᵀ in place for a float32 row, in float64
// internally like Rotate32. It panics if len(x) != Dim().
func (h *Hadamard) RotateBack32(x []float32) {
	h.check("RotateBack32", len(x))
	h.apply32(x, h.bwd)
}

func (h *Hadamard) check(op string, n int) {
	if n != h.d {
		panic(fmt.Sprintf("patch: Hadamard.%s: len(x) = %d, want %d", op, n, h.d))
	}
}

func (h *Hadamard) apply32(x []float32, sign []float64) {
	bp := h.scratch.Get().(*[]float64)
	buf := (*bp)[:h.d]
	for i, v := range x {
		buf[i] = float64(v)
	}
	h.applyWith(buf, sign, (*bp)[h.d:])
	for i, v := range buf {
		x[i] = float32(v)
	}
	h.scratch.Put(bp)
}

func (h *Hadamard) apply(x, sign []float64) {
	if h.m == 1 {
		h.applyWith(x, nil, nil)
		return
	}
	bp := h.scratch.Get().(*[]float64)
	h.applyWith(x, sign, (*bp)[:h.d])
	h.scratch.Put(bp)
}

// applyWith computes x ← x·(M ⊗ S_n)/√d where sign holds the rows of Mᵀ
// (sign[j·m+i] = M[i][j]); tmp has length d when m > 1.
//
// Viewing x as the m×n matrix X (row i = x[i·n:(i+1)·n]),
// x·(M ⊗ S) = Mᵀ·X·S: each row goes through the Walsh–Hadamard transform, then
// output row j = Σ_i M[i][j]·row i.
func (h *Hadamard) applyWith(x, sign, tmp []float64) {
	m, n := h.m, h.n
	for i := 0; i < m; i++ {
		hadamardFWHT(x[i*n : (i+1)*n])
	}
	if m == 1 {
		for i := range x {
			x[i] *= h.scale
		}
		return
	}
	tmp = tmp[:len(x)]
	for j := 0; j < m; j++ {
		hadamardMixRow(tmp[j*n:(j+1)*n], x, sign[j*m:(j+1)*m], h.scale)
	}
	copy(x, tmp)
}

// hadamardMixRow sets out = scale·Σ_i row[i]·z_i, where z_i = x[i·n:(i+1)·n] and
// n = len(out). Four source rows are folded per pass over out.
func hadamardMixRow(out, x, row []float64, scale float64) {
	n := len(out)
	clear(out)
	i := 0
	for ; i+4 <= len(row); i += 4 {
		s0, s1, s2, s3 := row[i]*scale, row[i+1]*scale, row[i+2]*scale, row[i+3]*scale
		z0 := x[i*n : (i+1)*n]
		z1 := x[(i+1)*n : (i+2)*n]
		z2 := x[(i+2)*n : (i+3)*n]
		z3 := x[(i+3)*n : (i+4)*n]
		for b := range out {
			out[b] += s0*z0[b] + s1*z1[b] + s2*z2[b] + s3*z3[b]
		}
	}
	for ; i < len(row); i++ {
		s := row[i] * scale
		z := x[i*n : (i+1)*n]
		for b := range out {
			out[b] += s * z[b]
		}
	}
}

// hadamardFWHT computes x ← x·S_n in place (unnormalized), n = len(x) a power of two,
// S_n the natural-order Sylvester matrix.
func hadamardFWHT(x []float64) {
	n := len(x)
	for h := 1; h < n; h *= 2 {
		for i := 0; i < n; i += 2 * h {
			a := x[i : i+h]
			b := x[i+h : i+2*h]
			for j := range a {
				u, v := a[j], b[j]
				a[j], b[j] = u+v, u-v
			}
		}
	}
}

// Construction names how H is built, for records and reports: "(H_m ⊗ S_n)/√d" with the
// factor H_m on the left of the Kronecker product (so entry [i·n + a][j·n + b] is
// H_m[i][j]·S_n[a][b]/√d), or "S_d/√d" when d is a power of two.
func (h *Hadamard) Construction() string {
	if h.m == 1 {
		return fmt.Sprintf("S_%d/√%d: the Sylvester matrix in natural order, normalized", h.n, h.d)
	}
	f, _ := hadamardFactorFor(h.m)
	kind := map[hadamardFactorKind]string{factorPaleyI: "Paley I", factorPaleyII: "Paley II", factorWilliamson: "Williamson"}[f.kind]
	return fmt.Sprintf("(H_%d ⊗ S_%d)/√%d: the order-%d factor (%s) on the left of the Kronecker product, S_%d the Sylvester matrix in natural order, normalized",
		h.m, h.n, h.d, h.m, kind, h.n)
}
