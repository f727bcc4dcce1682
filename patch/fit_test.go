package patch

import (
	"errors"
	"math"
	"math/rand/v2"
	"testing"

	"linearpatch/model/tensor"
)

// handStats returns statistics with random positive channel means for every window and
// layer, and no Gram sums.
func handStats(rng *rand.Rand, layers, dim, numPrune, windows int) *Stats {
	st := NewStats(layers, dim, numPrune, 4)
	for w := range windows {
		ws := WindowStats{Index: 3 * w, Tokens: 4, CosSum: make([]float64, layers-numPrune+1)}
		for range layers + 1 {
			a, r := make([]float64, dim), make([]float64, dim)
			for c := range dim {
				a[c] = 0.1 + rng.Float64()
				r[c] = 0.1 + rng.Float64()
			}
			ws.AbsMean = append(ws.AbsMean, a)
			ws.RotAbsMean = append(ws.RotAbsMean, r)
		}
		st.Windows = append(st.Windows, ws)
	}
	return st
}

// denseRotated returns H·diag(s)·Hᵀ by the dense triple product.
func denseRotated(H, s []float64) []float64 {
	d := len(s)
	P := make([]float64, d*d)
	for a := range d {
		for b := range d {
			var v float64
			for c := range d {
				v += H[a*d+c] * s[c] * H[b*d+c]
			}
			P[a*d+b] = v
		}
	}
	return P
}

func TestFitScalesByConstruction(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	const L, d, n, W, start = 6, 24, 2, 5, 2 // d = 24 = 12·2: a Hadamard with a Paley factor
	j := start + n
	h, err := NewHadamard(d)
	if err != nil {
		t.Fatal(err)
	}
	for _, method := range []Method{MethodDiag, MethodRotate} {
		t.Run(string(method), func(t *testing.T) {
			st := handStats(rng, L, d, n, W)
			// Per-window factors: s must be the mean of the ratios, not the ratio of the means.
			want := make([]float64, d)
			for w := range st.Windows {
				ws := &st.Windows[w]
				means := ws.AbsMean
				if method == MethodRotate {
					means = ws.RotAbsMean
				}
				for c := range d {
					f := 0.5 + rng.Float64()
					means[j][c] = means[start][c] * f
					want[c] += f / W
				}
			}
			// A dead channel in one window counts as ratio 1 there.
			dead := 7
			means := st.Windows[1].AbsMean
			if method == MethodRotate {
				means = st.Windows[1].RotAbsMean
			}
			want[dead] += (1 - means[j][dead]/means[start][dead]) / W
			means[start][dead] = 0

			P, s, err := Fit(st, h, start, method, 0)
			if err != nil {
				t.Fatal(err)
			}
			for c := range d {
				if math.Abs(s[c]-want[c]) > 1e-12 {
					t.Fatalf("s[%d] = %.15g, want %.15g", c, s[c], want[c])
				}
			}
			if P.Rows != d || P.Cols != d {
				t.Fatalf("P is %d×%d", P.Rows, P.Cols)
			}
			wantP := make([]float64, d*d)
			if method == MethodDiag {
				for c := range d {
					wantP[c*d+c] = want[c]
				}
			} else {
				wantP = denseRotated(h.Dense(), want)
			}
			for k, v := range P.Data {
				if math.IsNaN(float64(v)) || math.Abs(float64(v)-wantP[k]) > 1e-6 {
					t.Fatalf("P[%d][%d] = %g, want %g", k/d, k%d, v, wantP[k])
				}
			}
		})
	}
}

// TestRotatedDiagDense compares the fast H·diag(s)·Hᵀ with the dense product over many
// orders, powers of two and not.
func TestRotatedDiagDense(t *testing.T) {
	rng := rand.New(rand.NewPCG(13, 14))
	for _, d := range []int{1, 2, 4, 12, 16, 20, 28, 40, 64, 96} {
		h, err := NewHadamard(d)
		if err != nil {
			t.Fatal(err)
		}
		s := make([]float64, d)
		for c := range s {
			s[c] = rng.Float64()*2 - 0.5
		}
		orig := append([]float64(nil), s...)
		P := rotatedDiag(h, s)
		want := denseRotated(h.Dense(), s)
		for k, v := range P.Data {
			if math.Abs(float64(v)-want[k]) > 1e-6 {
				t.Fatalf("d=%d: P[%d][%d] = %g, want %g", d, k/d, k%d, v, want[k])
			}
		}
		for c := range s {
			if s[c] != orig[c] {
				t.Fatalf("d=%d: rotatedDiag changed s", d)
			}
		}
	}
}

// gramStats returns statistics whose Gram sums at start are those of x (tokens×d) and
// x·M, computed naively in float64, with one window of tokens tokens.
func gramStats(x, M []float64, tokens, d, start int) *Stats {
	const L, n = 4, 1
	st := NewStats(L, d, n, tokens)
	ws := WindowStats{Index: 0, Tokens: tokens, CosSum: make([]float64, L-n+1)}
	for range L + 1 {
		ws.AbsMean = append(ws.AbsMean, make([]float64, d))
		ws.RotAbsMean = append(ws.RotAbsMean, make([]float64, d))
	}
	st.Windows = []WindowStats{ws}
	y := make([]float64, tokens*d)
	for t := range tokens {
		for c := range d {
			var v float64
			for k := range d {
				v += x[t*d+k] * M[k*d+c]
			}
			y[t*d+c] = v
		}
	}
	g := &GramSum{Start: start, Tokens: int64(tokens), XtX: make([]float64, d*d), XtY: make([]float64, d*d)}
	for t := range tokens {
		for r := range d {
			for c := range d {
				g.XtX[r*d+c] += x[t*d+r] * x[t*d+c]
				g.XtY[r*d+c] += x[t*d+r] * y[t*d+c]
			}
		}
	}
	st.Gram = map[int]*GramSum{start: g}
	return st
}

func randomMatrix(rng *rand.Rand, rows, cols int) []float64 {
	a := make([]float64, rows*cols)
	for k := range a {
		a[k] = rng.NormFloat64()
	}
	return a
}

func TestFitLstsqRecoversMap(t *testing.T) {
	rng := rand.New(rand.NewPCG(15, 16))
	const d, tokens, start = 16, 200, 2
	x := randomMatrix(rng, tokens, d)
	M := randomMatrix(rng, d, d)
	st := gramStats(x, M, tokens, d, start)
	P, s, err := Fit(st, nil, start, MethodLstsq, 1e-12)
	if err != nil {
		t.Fatal(err)
	}
	if s != nil {
		t.Fatalf("lstsq returned scales %v", s)
	}
	for k, v := range P.Data {
		if math.Abs(float64(v)-M[k]) > 1e-6 {
			t.Fatalf("P[%d][%d] = %.9g, want %.9g", k/d, k%d, v, M[k])
		}
	}
	// A large ridge must shrink the map: the test can tell λ is applied.
	Pr, _, err := Fit(st, nil, start, MethodLstsq, 10)
	if err != nil {
		t.Fatal(err)
	}
	if frob(Pr) >= 0.5*frob(P) {
		t.Fatalf("ridge 10 left ‖P‖ at %g of %g", frob(Pr), frob(P))
	}
}

func frob(m *tensor.Matrix) float64 {
	var s float64
	for _, v := range m.Data {
		s += float64(v) * float64(v)
	}
	return math.Sqrt(s)
}

func TestFitLstsqSingular(t *testing.T) {
	rng := rand.New(rand.NewPCG(17, 18))
	const d, start = 16, 1
	M := randomMatrix(rng, d, d)
	zeroCol := randomMatrix(rng, 100, d)
	for tk := range 100 {
		zeroCol[tk*d+5] = 0
	}
	dupCol := randomMatrix(rng, 100, d)
	for tk := range 100 {
		dupCol[tk*d+9] = dupCol[tk*d+2]
	}
	tests := []struct {
		name   string
		x      []float64
		tokens int
	}{
		{"fewer tokens than channels", randomMatrix(rng, 8, d), 8},
		{"zero channel", zeroCol, 100},
		{"duplicate channel", dupCol, 100},
		{"all zero", make([]float64, 10*d), 10},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st := gramStats(tc.x, M, tc.tokens, d, start)
			_, _, err := Fit(st, nil, start, MethodLstsq, 0)
			if !errors.Is(err, ErrSingular) {
				t.Fatalf("ridge 0: %v, want ErrSingular", err)
			}
			if tc.name != "all zero" { // a ridge makes the system solvable
				if _, _, err := Fit(st, nil, start, MethodLstsq, 1e-3); err != nil {
					t.Fatalf("ridge 1e-3: %v", err)
				}
			}
		})
	}
}

func TestFitErrors(t *testing.T) {
	rng := rand.New(rand.NewPCG(19, 20))
	st := handStats(rng, 6, 16, 2, 3)
	h, err := NewHadamard(16)
	if err != nil {
		t.Fatal(err)
	}
	h8, err := NewHadamard(8)
	if err != nil {
		t.Fatal(err)
	}
	malformed := handStats(rng, 6, 16, 2, 3)
	malformed.Windows[2].RotAbsMean = malformed.Windows[2].RotAbsMean[:3]
	empty := NewStats(6, 16, 2, 4)
	tests := []struct {
		name   string
		st     *Stats
		h      *Hadamard
		start  int
		method Method
		ridge  float64
		want   error
	}{
		{"unknown method", st, h, 2, Method("svd"), 0, ErrMethod},
		{"start negative", st, h, -1, MethodDiag, 0, ErrBlock},
		{"start past the end", st, h, 5, MethodRotate, 0, ErrBlock},
		{"rotate without Hadamard", st, nil, 2, MethodRotate, 0, ErrStats},
		{"rotate with wrong order", st, h8, 2, MethodRotate, 0, ErrStats},
		{"no windows", empty, h, 2, MethodDiag, 0, ErrStats},
		{"malformed", malformed, h, 2, MethodDiag, 0, ErrStats},
		{"lstsq without Gram", st, h, 2, MethodLstsq, 1e-6, ErrNoGram},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			P, s, err := Fit(tc.st, tc.h, tc.start, tc.method, tc.ridge)
			if !errors.Is(err, tc.want) || P != nil || s != nil {
				t.Fatalf("Fit = %v, %v, %v; want %v", P, s, err, tc.want)
			}
		})
	}
	t.Run("negative ridge", func(t *testing.T) {
		gs := gramStats(randomMatrix(rng, 40, 4), randomMatrix(rng, 4, 4), 40, 4, 0)
		if _, _, err := Fit(gs, nil, 0, MethodLstsq, -1); err == nil {
			t.Fatal("negative ridge accepted")
		}
	})
	t.Run("none", func(t *testing.T) {
		P, s, err := Fit(st, nil, 2, MethodNone, 0)
		if err != nil || P != nil || s != nil {
			t.Fatalf("Fit none = %v, %v, %v", P, s, err)
		}
	})
}

// TestFitOnModel fits every method on statistics of the synthetic model and checks what
// each guarantees: lstsq solves its normal equations, rotate and diag keep s positive and
// finite, and the patched model runs.
func TestFitOnModel(t *testing.T) {
	m, h := tinyModel(t)
	rng := rand.New(rand.NewPCG(21, 22))
	const start, n = 1, 2
	st := onePass(t, m, h, randomWindows(rng, 6, 32, m.Vocab), 0, StatsOptions{NumPrune: n, Gram: GramCut, Start: start})
	d := m.Dim
	g := st.Gram[start]
	for _, method := range Methods {
		P, s, err := Fit(st, h, start, method, 1e-6)
		if err != nil {
			t.Fatalf("%s: %v", method, err)
		}
		for _, v := range s {
			if !(v > 0) || math.IsInf(v, 0) {
				t.Fatalf("%s: scale %v", method, v)
			}
		}
		if method == MethodLstsq {
			var trace float64
			for c := range d {
				trace += g.XtX[c*d+c]
			}
			lambda := 1e-6 * trace / float64(d)
			worst, scale := 0.0, 0.0
			for r := range d {
				for c := range d {
					v := lambda * float64(P.Data[r*d+c])
					for k := range d {
						v += g.XtX[r*d+k] * float64(P.Data[k*d+c])
					}
					worst = math.Max(worst, math.Abs(v-g.XtY[r*d+c]))
					scale = math.Max(scale, math.Abs(g.XtY[r*d+c]))
				}
			}
			if worst > 1e-5*scale {
				t.Fatalf("lstsq: normal equations off by %g (scale %g)", worst, scale)
			}
		}
		logits := m.Pruned(start, start+n, P).Forward(randomWindows(rng, 1, 8, m.Vocab))
		for _, v := range logits.Data {
			if math.IsNaN(float64(v)) {
				t.Fatalf("%s: patched model gives NaN", method)
			}
		}
	}
}
