package patch

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
)

// hadRefSupported is the set of orders ≤ limit the issue asks for:
// 2^k and m·2^k for the advertised m.
func hadRefSupported(limit int) map[int]bool {
	set := map[int]bool{}
	for _, m := range append([]int{1}, hadamardAdvertised...) {
		for d := m; d <= limit; d *= 2 {
			set[d] = true
		}
	}
	return set
}

func hadSupportedUpTo(limit int) []int {
	var ds []int
	for d := range hadRefSupported(limit) {
		ds = append(ds, d)
	}
	slices.Sort(ds)
	return ds
}

// sylvester builds the natural-order Sylvester matrix of order n (a power of
// two) by the recursion S_1 = [1], S_2n = [[S, S], [S, −S]].
func hadSylvester(n int) []int8 {
	s := []int8{1}
	for k := 1; k < n; k *= 2 {
		t := make([]int8, 4*k*k)
		for i := 0; i < k; i++ {
			for j := 0; j < k; j++ {
				v := s[i*k+j]
				t[i*2*k+j] = v
				t[i*2*k+j+k] = v
				t[(i+k)*2*k+j] = v
				t[(i+k)*2*k+j+k] = -v
			}
		}
		s = t
	}
	return s
}

func TestHadamardFactors(t *testing.T) {
	for _, f := range hadamardFactors {
		t.Run(fmt.Sprintf("m=%d", f.m), func(t *testing.T) {
			h := buildHadamardFactor(f)
			m := f.m
			if len(h) != m*m {
				t.Fatalf("len = %d, want %d", len(h), m*m)
			}
			for k, v := range h {
				if v != 1 && v != -1 {
					t.Fatalf("entry %d = %d, want ±1", k, v)
				}
			}
			for i := 0; i < m; i++ {
				for j := 0; j < m; j++ {
					dot := 0
					for k := 0; k < m; k++ {
						dot += int(h[i*m+k]) * int(h[j*m+k])
					}
					want := 0
					if i == j {
						want = m
					}
					if dot != want {
						t.Fatalf("(H Hᵀ)[%d][%d] = %d, want %d", i, j, dot, want)
					}
				}
			}
			if !slices.Equal(buildHadamardFactor(f), h) {
				t.Fatal("construction is not deterministic")
			}
		})
	}
}

func TestHadamardWilliamsonQuadruples(t *testing.T) {
	for n, q := range williamsonQuadruples {
		for k, s := range q {
			if len(s) != n {
				t.Errorf("n=%d row %d: length %d", n, k, len(s))
				continue
			}
			for i := 1; i < n; i++ {
				if s[i] != s[n-i] {
					t.Errorf("n=%d row %d: not symmetric at %d", n, k, i)
				}
			}
		}
		// Σ of the periodic autocorrelations must vanish at every shift.
		for shift := 1; shift < n; shift++ {
			sum := 0
			for _, s := range q {
				for i := 0; i < n; i++ {
					if s[i] == s[(i+shift)%n] {
						sum++
					} else {
						sum--
					}
				}
			}
			if sum != 0 {
				t.Errorf("n=%d: autocorrelation sum at shift %d = %d", n, shift, sum)
			}
		}
	}
}

func TestHadamardField(t *testing.T) {
	if got := gfIrreducible(5, 2); !slices.Equal(got, []int{2, 0, 1}) {
		t.Errorf("gfIrreducible(5, 2) = %v, want t²+2 = [2 0 1]", got)
	}
	for _, pe := range [][2]int{{5, 2}, {3, 3}, {11, 1}, {139, 1}} {
		chi, sub, q := gfQuadraticCharacter(pe[0], pe[1])
		squares, non := 0, 0
		for x, c := range chi {
			switch {
			case x == 0 && c != 0:
				t.Errorf("q=%d: χ(0) = %d", q, c)
			case c == 1:
				squares++
			case c == -1:
				non++
			}
		}
		if squares != (q-1)/2 || non != (q-1)/2 {
			t.Errorf("q=%d: %d squares, %d non-squares, want %d each", q, squares, non, (q-1)/2)
		}
		for x := 0; x < q; x++ {
			if sub(x, x) != 0 || sub(x, 0) != x {
				t.Fatalf("q=%d: subtraction broken at %d", q, x)
			}
		}
	}
}

func TestSupportedHadamard(t *testing.T) {
	ref := hadRefSupported(1 << 12)
	for d := -3; d <= 1<<12; d++ {
		if got := SupportedHadamard(d); got != ref[d] {
			t.Errorf("SupportedHadamard(%d) = %v, want %v", d, got, ref[d])
		}
		if m, n, ok := splitHadamardOrder(d); ok && m*n != d {
			t.Errorf("splitHadamardOrder(%d) = %d·%d", d, m, n)
		}
	}
	for _, d := range []int{5120, 8192, 11008, 14336, 172 << 10} {
		if !SupportedHadamard(d) {
			t.Errorf("SupportedHadamard(%d) = false", d)
		}
	}
}

func TestNewHadamardUnsupported(t *testing.T) {
	const list = "{12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 156, 172}"
	for _, d := range []int{100, 6, 0, -1, 3, 10, 86, 116, 1000} {
		t.Run(fmt.Sprint(d), func(t *testing.T) {
			h, err := NewHadamard(d)
			if h != nil || err == nil {
				t.Fatalf("NewHadamard(%d) = %p, %v; want an error", d, h, err)
			}
			if !errors.Is(err, ErrHadamardSize) {
				t.Errorf("error %q does not wrap ErrHadamardSize", err)
			}
			want := fmt.Sprintf("patch: no Hadamard matrix of order %d: supported are 2^k and m·2^k for m in %s", d, list)
			if err.Error() != want {
				t.Errorf("error = %q, want %q", err, want)
			}
		})
	}
}

func TestHadamardSylvesterGolden(t *testing.T) {
	h, err := NewHadamard(4)
	if err != nil {
		t.Fatal(err)
	}
	want := []float64{
		1, 1, 1, 1,
		1, -1, 1, -1,
		1, 1, -1, -1,
		1, -1, -1, 1,
	}
	for i := range want {
		want[i] /= 2
	}
	if got := h.Dense(); !slices.Equal(got, want) {
		t.Errorf("Dense(4) = %v, want %v", got, want)
	}
	h1, err := NewHadamard(1)
	if err != nil {
		t.Fatal(err)
	}
	if got := h1.Dense(); !slices.Equal(got, []float64{1}) {
		t.Errorf("Dense(1) = %v", got)
	}
	x := []float64{-2.5}
	h1.Rotate(x)
	h1.RotateBack(x)
	if x[0] != -2.5 {
		t.Errorf("d=1 rotation changed x to %v", x)
	}
}

// TestHadamardDense checks, for every supported d ≤ 2048, that Dense is the
// Kronecker product H_m ⊗ S_(2^k) scaled by 1/√d, that HHᵀ = I, and that the
// fast transforms agree with the dense x·H and x·Hᵀ (their naive twins).
func TestHadamardDense(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, d := range hadSupportedUpTo(2048) {
		t.Run(fmt.Sprint(d), func(t *testing.T) {
			h, err := NewHadamard(d)
			if err != nil {
				t.Fatal(err)
			}
			if h.Dim() != d {
				t.Fatalf("Dim = %d", h.Dim())
			}
			dense := h.Dense()
			hadCheckKronecker(t, h, dense)
			hadCheckOrthogonal(t, d, dense)
			trials := 2
			if d > 256 {
				trials = 1 // a random vector already pins a linear map down
			}
			for range trials {
				hadCheckRotations(t, h, dense, rng)
			}
		})
	}
}

func hadCheckKronecker(t *testing.T, h *Hadamard, dense []float64) {
	t.Helper()
	d, m, n := h.d, h.m, h.n
	s := hadSylvester(n)
	factor := []int8{1}
	if m > 1 {
		f, _ := hadamardFactorFor(m)
		factor = buildHadamardFactor(f)
	}
	scale := 1 / math.Sqrt(float64(d))
	for r := 0; r < d; r++ {
		for c := 0; c < d; c++ {
			want := scale * float64(factor[(r/n)*m+c/n]*s[(r%n)*n+c%n])
			if dense[r*d+c] != want {
				t.Fatalf("Dense[%d][%d] = %v, want %v", r, c, dense[r*d+c], want)
			}
		}
	}
}

// hadCheckOrthogonal verifies HHᵀ = I. All entries are ±s, so (HHᵀ)[r][c] is
// s²·(d − 2·#sign differences); the sign patterns are packed in bits and
// compared with popcount, exact and O(d³/64).
func hadCheckOrthogonal(t *testing.T, d int, dense []float64) {
	t.Helper()
	s := math.Abs(dense[0])
	words := (d + 63) / 64
	packed := make([]uint64, d*words)
	for r := 0; r < d; r++ {
		for c := 0; c < d; c++ {
			v := dense[r*d+c]
			if math.Abs(v) != s {
				t.Fatalf("entry [%d][%d] = %v, want ±%v", r, c, v, s)
			}
			if v < 0 {
				packed[r*words+c/64] |= 1 << (c % 64)
			}
		}
	}
	maxErr := 0.0
	for r := 0; r < d; r++ {
		pr := packed[r*words : (r+1)*words]
		for c := r; c < d; c++ {
			pc := packed[c*words : (c+1)*words]
			diff := 0
			for w := range pr {
				diff += bits.OnesCount64(pr[w] ^ pc[w])
			}
			got := float64(d-2*diff) * s * s
			want := 0.0
			if r == c {
				want = 1
			}
			maxErr = max(maxErr, math.Abs(got-want))
		}
	}
	if maxErr >= 1e-12 {
		t.Errorf("max |HHᵀ − I| = %g", maxErr)
	}
	if d <= 128 { // naive twin of the popcount check
		for r := 0; r < d; r++ {
			for c := 0; c < d; c++ {
				dot := 0.0
				for k := 0; k < d; k++ {
					dot += dense[r*d+k] * dense[c*d+k]
				}
				want := 0.0
				if r == c {
					want = 1
				}
				if math.Abs(dot-want) >= 1e-12 {
					t.Fatalf("float (HHᵀ)[%d][%d] = %v", r, c, dot)
				}
			}
		}
	}
}

// hadRowTimes returns x·M (transpose false) or x·Mᵀ for row-major d×d M.
func hadRowTimes(x, mat []float64, transpose bool) []float64 {
	d := len(x)
	y := make([]float64, d)
	for r := 0; r < d; r++ {
		if transpose {
			sum := 0.0
			for c := 0; c < d; c++ {
				sum += x[c] * mat[r*d+c]
			}
			y[r] = sum
			continue
		}
		xr := x[r]
		for c := 0; c < d; c++ {
			y[c] += xr * mat[r*d+c]
		}
	}
	return y
}

func hadMaxAbsDiff(a, b []float64) float64 {
	m := 0.0
	for i := range a {
		m = max(m, math.Abs(a[i]-b[i]))
	}
	return m
}

func hadCheckRotations(t *testing.T, h *Hadamard, dense []float64, rng *rand.Rand) {
	t.Helper()
	d := h.Dim()
	x := make([]float64, d)
	for i := range x {
		x[i] = rng.NormFloat64()
	}
	for _, tc := range []struct {
		name      string
		rot       func([]float64)
		rot32     func([]float32)
		transpose bool
	}{
		{"Rotate", h.Rotate, h.Rotate32, false},
		{"RotateBack", h.RotateBack, h.RotateBack32, true},
	} {
		want := hadRowTimes(x, dense, tc.transpose)
		got := slices.Clone(x)
		tc.rot(got)
		if e := hadMaxAbsDiff(got, want); e > 1e-12 {
			t.Errorf("%s differs from dense by %g", tc.name, e)
		}
		x32 := make([]float32, d)
		for i, v := range x {
			x32[i] = float32(v)
		}
		want32 := make([]float64, d)
		for i, v := range x32 {
			want32[i] = float64(v)
		}
		want32 = hadRowTimes(want32, dense, tc.transpose)
		tc.rot32(x32)
		for i := range x32 {
			// float64 inside, one rounding to float32 at the end.
			if float32(want32[i]) != x32[i] && math.Abs(float64(x32[i])-want32[i]) > 1e-6*(1+math.Abs(want32[i])) {
				t.Fatalf("%s32[%d] = %v, want %v", tc.name, i, x32[i], want32[i])
			}
		}
	}
}

// TestHadamardLarge checks the fast path above 2048, where the dense matrix
// is too big for a unit test: norm preservation, RotateBack∘Rotate = id, and
// sampled coordinates of x·H against their definition.
func TestHadamardLarge(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, d := range []int{4096, 5120, 8192, 11008, 14336} {
		t.Run(fmt.Sprint(d), func(t *testing.T) {
			h, err := NewHadamard(d)
			if err != nil {
				t.Fatal(err)
			}
			x := make([]float64, d)
			for i := range x {
				x[i] = rng.NormFloat64()
			}
			y := slices.Clone(x)
			h.Rotate(y)
			if nx, ny := hadNorm(x), hadNorm(y); math.Abs(nx-ny) > 1e-10*nx {
				t.Errorf("‖x‖ = %v, ‖xH‖ = %v", nx, ny)
			}
			for _, c := range []int{0, 1, d / 3, d / 2, d - 1, rng.IntN(d), rng.IntN(d)} {
				if want := hadEntryTimes(h, x, c); math.Abs(y[c]-want) > 1e-10 {
					t.Errorf("(xH)[%d] = %v, want %v", c, y[c], want)
				}
			}
			h.RotateBack(y)
			if e := hadMaxAbsDiff(x, y); e > 1e-10 {
				t.Errorf("RotateBack(Rotate(x)) differs from x by %g", e)
			}
		})
	}
}

// hadEntryTimes returns (x·H)[c] = Σ_r x[r]·H[r][c], H from its definition.
func hadEntryTimes(h *Hadamard, x []float64, c int) float64 {
	m, n := h.m, h.n
	j, b := c/n, c%n
	sum := 0.0
	for r, v := range x {
		i, a := r/n, r%n
		if bits.OnesCount(uint(a&b))&1 == 1 {
			v = -v
		}
		if m > 1 && h.factor[i*m+j] < 0 {
			v = -v
		}
		sum += v
	}
	return sum / math.Sqrt(float64(h.d))
}

func hadNorm(x []float64) float64 {
	s := 0.0
	for _, v := range x {
		s += v * v
	}
	return math.Sqrt(s)
}

func TestHadamardPanics(t *testing.T) {
	h, err := NewHadamard(12)
	if err != nil {
		t.Fatal(err)
	}
	for name, f := range map[string]func(){
		"Rotate":       func() { h.Rotate(make([]float64, 11)) },
		"RotateBack":   func() { h.RotateBack(make([]float64, 13)) },
		"Rotate32":     func() { h.Rotate32(nil) },
		"RotateBack32": func() { h.RotateBack32(make([]float32, 24)) },
	} {
		t.Run(name, func(t *testing.T) {
			defer func() {
				r := recover()
				if r == nil || !strings.Contains(fmt.Sprint(r), name) {
					t.Errorf("recovered %v, want a panic naming %s", r, name)
				}
			}()
			f()
		})
	}
}

func TestHadamardDenseIsCopy(t *testing.T) {
	h, err := NewHadamard(24)
	if err != nil {
		t.Fatal(err)
	}
	a := h.Dense()
	want := slices.Clone(a)
	a[0], a[5] = 42, 42
	if got := h.Dense(); !slices.Equal(got, want) {
		t.Error("mutating a Dense result changed the matrix")
	}
}

func TestHadamardConcurrent(t *testing.T) {
	h, err := NewHadamard(172 * 4)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(5, 6))
	const workers = 4
	inputs := make([][]float32, workers)
	wants := make([][]float32, workers)
	for w := range inputs {
		inputs[w] = make([]float32, h.Dim())
		for i := range inputs[w] {
			inputs[w][i] = float32(rng.NormFloat64())
		}
		wants[w] = slices.Clone(inputs[w])
		h.Rotate32(wants[w])
	}
	var wg sync.WaitGroup
	for w := range inputs {
		wg.Go(func() {
			for range 20 {
				x := slices.Clone(inputs[w])
				h.Rotate32(x)
				if !slices.Equal(x, wants[w]) {
					t.Error("concurrent Rotate32 gave a different result")
					return
				}
			}
		})
	}
	wg.Wait()
}

// BenchmarkRotate compares the fast transform with a dense x·H (the dense
// 11008 case holds a 970 MB matrix).
func BenchmarkRotate(b *testing.B) {
	for _, d := range []int{4096, 11008} {
		h, err := NewHadamard(d)
		if err != nil {
			b.Fatal(err)
		}
		x := make([]float64, d)
		rng := rand.New(rand.NewPCG(7, 8))
		for i := range x {
			x[i] = rng.NormFloat64()
		}
		b.Run(fmt.Sprintf("d=%d/fast", d), func(b *testing.B) {
			y := slices.Clone(x)
			for b.Loop() {
				h.Rotate(y)
			}
		})
		b.Run(fmt.Sprintf("d=%d/fast32", d), func(b *testing.B) {
			y := make([]float32, d)
			for i, v := range x {
				y[i] = float32(v)
			}
			for b.Loop() {
				h.Rotate32(y)
			}
		})
		b.Run(fmt.Sprintf("d=%d/dense", d), func(b *testing.B) {
			dense := h.Dense()
			y := make([]float64, d)
			b.ResetTimer()
			for b.Loop() {
				clear(y)
				for r, xr := range x {
					row := dense[r*d : (r+1)*d]
					for c, v := range row {
						y[c] += xr * v
					}
				}
			}
		})
	}
}
