package patch

import (
	"errors"
	"fmt"
	"math"

	"gonum.org/v1/gonum/mat"

	"linearpatch/model/tensor"
)

var (
	// ErrMethod is wrapped by the error for an unknown patch method.
	ErrMethod = errors.New("patch: unknown patch method")
	// ErrNoGram is wrapped when a least-squares fit finds no Gram sums for its start:
	// calibrate with GramCut at that start or GramAll.
	ErrNoGram = errors.New("patch: no Gram sums for the block")
	// ErrSingular is wrapped when the least-squares system cannot be solved: XᵢᵀXᵢ + λI is
	// singular or too ill-conditioned (condition number above 1e16).
	ErrSingular = errors.New("patch: singular least-squares system")
)

// Method is how the patch across the cut is fitted.
type Method string

const (
	MethodNone   Method = "none"   // plain pruning, no patch
	MethodDiag   Method = "diag"   // P = diag(s), s from channel magnitudes
	MethodRotate Method = "rotate" // P = H·diag(s)·Hᵀ, s from rotated channel magnitudes (the paper)
	MethodLstsq  Method = "lstsq"  // P = (XᵢᵀXᵢ + λI)⁻¹·XᵢᵀX_j (ridge least squares)
)

// Methods lists the valid methods.
var Methods = []Method{MethodNone, MethodDiag, MethodRotate, MethodLstsq}

// Fit returns the d×d patch P (float32, applied as x·P) for the block [start, start+n),
// n = st.NumPrune, j = start+n, and the scale vector s (nil for lstsq and none; P is nil
// for none). Everything is computed in float64 and rounded to float32 once.
//
//   - diag: s[c] = mean over windows w of AbsMean[w][j][c] / AbsMean[w][start][c], summed
//     in Index order; P = diag(s).
//   - rotate: s the same from RotAbsMean; P = H·diag(s)·Hᵀ, row a of P being
//     (H[a,:]∘s)·Hᵀ, by the fast transform (O(d² log d)). h must have order st.Dim.
//   - lstsq: P = A⁻¹·XᵢᵀX_j with A = XᵢᵀXᵢ + λI, λ = ridge·trace(XᵢᵀXᵢ)/d, by Cholesky
//     (LU when A is not numerically positive definite). Needs st.Gram[start] (ErrNoGram).
//
// A window's ratio for a channel whose denominator is zero, or whose ratio is not finite,
// counts as 1, so NaN and Inf never enter s or P.
//
// Errors: ErrMethod for an unknown method; ErrBlock for a start outside 0..L−n; ErrStats
// for malformed statistics, no windows (diag, rotate) or a Hadamard of the wrong order;
// ErrNoGram; ErrSingular when A cannot be solved (raise the ridge); a negative or
// non-finite ridge is an error.
func Fit(st *Stats, h *Hadamard, start int, method Method, ridge float64) (P *tensor.Matrix, s []float64, err error) {
	switch method {
	case MethodNone, MethodDiag, MethodRotate, MethodLstsq:
	default:
		return nil, nil, fmt.Errorf("%w: %q (want one of %v)", ErrMethod, method, Methods)
	}
	if err := st.Validate(); err != nil {
		return nil, nil, err
	}
	if start < 0 || start > st.Layers-st.NumPrune {
		return nil, nil, fmt.Errorf("%w: block [%d, %d) is not inside %d layers", ErrBlock, start, start+st.NumPrune, st.Layers)
	}
	d := st.Dim
	switch method {
	case MethodNone:
		return nil, nil, nil
	case MethodDiag:
		s, err := scales(st, start, false)
		if err != nil {
			return nil, nil, err
		}
		P := tensor.New(d, d)
		for c, v := range s {
			P.Data[c*d+c] = float32(v)
		}
		return P, s, nil
	case MethodRotate:
		if h == nil || h.Dim() != d {
			return nil, nil, fmt.Errorf("%w: Hadamard matrix of order %d, want %d", ErrStats, hadamardDim(h), d)
		}
		s, err := scales(st, start, true)
		if err != nil {
			return nil, nil, err
		}
		return rotatedDiag(h, s), s, nil
	}
	P, err = lstsq(st, start, ridge)
	return P, nil, err
}

// scales returns s[c] = mean over windows of the ratio of the channel means of X_j and
// X_start (rotated ones when rotated), windows in Index order; see Fit for the guard.
func scales(st *Stats, start int, rotated bool) ([]float64, error) {
	if len(st.Windows) == 0 {
		return nil, fmt.Errorf("%w: no calibration windows", ErrStats)
	}
	j := start + st.NumPrune
	s := make([]float64, st.Dim)
	for w := range st.Windows {
		means := st.Windows[w].AbsMean
		if rotated {
			means = st.Windows[w].RotAbsMean
		}
		num, den := means[j], means[start]
		for c := range s {
			r := 1.0
			if den[c] != 0 {
				if q := num[c] / den[c]; !math.IsNaN(q) && !math.IsInf(q, 0) {
					r = q
				}
			}
			s[c] += r
		}
	}
	for c := range s {
		s[c] /= float64(len(st.Windows))
	}
	return s, nil
}

// rotatedDiag returns H·diag(s)·Hᵀ in float32: row a is (H[a,:]∘s)·Hᵀ, H[a,:] = e_a·H.
func rotatedDiag(h *Hadamard, s []float64) *tensor.Matrix {
	d := len(s)
	P := tensor.New(d, d)
	v := make([]float64, d)
	for a := range d {
		clear(v)
		v[a] = 1
		h.Rotate(v)
		for c := range v {
			v[c] *= s[c]
		}
		h.RotateBack(v)
		row := P.Row(a)
		for c, x := range v {
			row[c] = float32(x)
		}
	}
	return P
}

// lstsq solves (XᵢᵀXᵢ + λI)·P = XᵢᵀX_j.
func lstsq(st *Stats, start int, ridge float64) (*tensor.Matrix, error) {
	if ridge < 0 || math.IsNaN(ridge) || math.IsInf(ridge, 0) {
		return nil, fmt.Errorf("patch: lstsq ridge %v must be finite and non-negative", ridge)
	}
	g := st.Gram[start]
	if g == nil || g.Tokens == 0 {
		return nil, fmt.Errorf("%w: start %d (calibrate with Gram sums for this start)", ErrNoGram, start)
	}
	d := st.Dim
	var trace float64
	for c := range d {
		trace += g.XtX[c*d+c]
	}
	lambda := ridge * trace / float64(d)
	a := make([]float64, d*d)
	copy(a, g.XtX)
	for c := range d {
		a[c*d+c] += lambda
	}
	A := mat.NewSymDense(d, a)
	B := mat.NewDense(d, d, append([]float64(nil), g.XtY...))
	var X mat.Dense
	var solveErr error
	var chol mat.Cholesky
	if chol.Factorize(A) {
		solveErr = chol.SolveTo(&X, B)
	} else {
		var lu mat.LU
		lu.Factorize(A)
		solveErr = lu.SolveTo(&X, false, B)
	}
	if solveErr != nil {
		return nil, fmt.Errorf("%w: block [%d, %d), λ = %g: %w; raise the ridge (--ridge)", ErrSingular, start, start+st.NumPrune, lambda, solveErr)
	}
	P := tensor.New(d, d)
	for r := range d {
		for c := range d {
			v := X.At(r, c)
			if math.IsNaN(v) || math.IsInf(v, 0) {
				return nil, fmt.Errorf("%w: block [%d, %d), λ = %g: non-finite solution; raise the ridge (--ridge)", ErrSingular, start, start+st.NumPrune, lambda)
			}
			P.Data[r*d+c] = float32(v)
		}
	}
	return P, nil
}
