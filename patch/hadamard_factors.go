package patch

import "fmt"

// This file builds the order-m Hadamard factors H_m (entries exactly ±1,
// H_m·H_mᵀ = m·I) that NewHadamard combines with a Sylvester matrix.
//
// The factor of each order, chosen once and fixed (the matrices are part of
// the numbers a patch is made of):
//
//	m    construction                 field / data
//	12   Paley I,  q = 11             GF(11)
//	20   Paley I,  q = 19             GF(19)
//	28   Paley II, q = 13             GF(13)
//	36   Paley II, q = 17             GF(17)
//	44   Paley I,  q = 43             GF(43)
//	52   Paley II, q = 25             GF(25) = GF(5)[t]/(t² + 2)
//	60   Paley I,  q = 59             GF(59)
//	108  Paley I,  q = 107            GF(107)
//	140  Paley I,  q = 139            GF(139)
//	156  Williamson, n = 39           williamsonQuadruples[39]
//	172  Williamson, n = 43           williamsonQuadruples[43]
//
// Order 40 has no factor of its own: 40·2^k = 20·2^(k+1), and NewHadamard
// always uses the factor with the smallest order (H_20 ⊗ S_(2^(k+1))).

// hadamardFactorKind names a construction of a Hadamard factor.
type hadamardFactorKind int

const (
	factorPaleyI hadamardFactorKind = iota + 1
	factorPaleyII
	factorWilliamson
)

// hadamardFactorSpec says how to build the factor of order m.
type hadamardFactorSpec struct {
	m    int
	kind hadamardFactorKind
	p, e int // Paley: the field GF(p^e); Williamson: n = m/4 (p), e unused
}

// hadamardFactors lists the factors by increasing order; each order is 4·o
// with o odd, so every d has at most one factor that fits (see splitHadamardOrder).
var hadamardFactors = []hadamardFactorSpec{
	{m: 12, kind: factorPaleyI, p: 11, e: 1},
	{m: 20, kind: factorPaleyI, p: 19, e: 1},
	{m: 28, kind: factorPaleyII, p: 13, e: 1},
	{m: 36, kind: factorPaleyII, p: 17, e: 1},
	{m: 44, kind: factorPaleyI, p: 43, e: 1},
	{m: 52, kind: factorPaleyII, p: 5, e: 2},
	{m: 60, kind: factorPaleyI, p: 59, e: 1},
	{m: 108, kind: factorPaleyI, p: 107, e: 1},
	{m: 140, kind: factorPaleyI, p: 139, e: 1},
	{m: 156, kind: factorWilliamson, p: 39},
	{m: 172, kind: factorWilliamson, p: 43},
}

// hadamardAdvertised is the list of m named in errors and docs: the factor
// orders plus 40, which is served through 20 (40·2^k = 20·2^(k+1)).
var hadamardAdvertised = []int{12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 156, 172}

// hadamardFactorFor returns the spec of the factor of order m, if there is one.
func hadamardFactorFor(m int) (hadamardFactorSpec, bool) {
	for _, f := range hadamardFactors {
		if f.m == m {
			return f, true
		}
	}
	return hadamardFactorSpec{}, false
}

// buildHadamardFactor returns H_m row-major as ±1 entries. It panics on a spec that
// is not in hadamardFactors (a programming error: the table is fixed).
func buildHadamardFactor(f hadamardFactorSpec) []int8 {
	var h []int8
	switch f.kind {
	case factorPaleyI:
		h = paleyIHadamard(f.p, f.e)
	case factorPaleyII:
		h = paleyIIHadamard(f.p, f.e)
	case factorWilliamson:
		q, ok := williamsonQuadruples[f.p]
		if !ok {
			panic(fmt.Sprintf("patch: no Williamson quadruple of order %d", f.p))
		}
		h = williamsonHadamard(q)
	default:
		panic(fmt.Sprintf("patch: unknown Hadamard factor kind %d", f.kind))
	}
	if len(h) != f.m*f.m {
		panic(fmt.Sprintf("patch: Hadamard factor has %d entries, want %d", len(h), f.m*f.m))
	}
	return h
}

// paleyIHadamard is Paley's first construction for q = p^e ≡ 3 (mod 4):
// H = I + S of order q+1, where S = [[0, 1ᵀ], [−1, Q]] is skew and
// Q[x][y] = χ(x − y) is the Jacobsthal matrix of GF(q), χ its quadratic
// character. Field elements are ordered by their base-p encoding.
func paleyIHadamard(p, e int) []int8 {
	chi, sub, q := gfQuadraticCharacter(p, e)
	if q%4 != 3 {
		panic(fmt.Sprintf("patch: Paley I needs q ≡ 3 mod 4, got %d", q))
	}
	m := q + 1
	h := make([]int8, m*m)
	for j := 0; j < m; j++ {
		h[j] = 1 // row 0: I + [0, 1ᵀ]
	}
	for x := 0; x < q; x++ {
		r := (x + 1) * m
		h[r] = -1
		for y := 0; y < q; y++ {
			v := chi[sub(x, y)]
			if x == y {
				v = 1 // χ(0) = 0, plus the identity
			}
			h[r+y+1] = v
		}
	}
	return h
}

// paleyIIHadamard is Paley's second construction for q = p^e ≡ 1 (mod 4):
// with the symmetric conference matrix C = [[0, 1ᵀ], [1, Q]] of order q+1,
// H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]], of order 2(q+1).
func paleyIIHadamard(p, e int) []int8 {
	chi, sub, q := gfQuadraticCharacter(p, e)
	if q%4 != 1 {
		panic(fmt.Sprintf("patch: Paley II needs q ≡ 1 mod 4, got %d", q))
	}
	n := q + 1
	c := make([]int8, n*n)
	for j := 1; j < n; j++ {
		c[j] = 1
		c[j*n] = 1
	}
	for x := 0; x < q; x++ {
		for y := 0; y < q; y++ {
			c[(x+1)*n+y+1] = chi[sub(x, y)]
		}
	}
	offDiag := [2][2]int8{{1, 1}, {1, -1}}
	onDiag := [2][2]int8{{1, -1}, {-1, -1}}
	m := 2 * n
	h := make([]int8, m*m)
	for r := 0; r < n; r++ {
		for s := 0; s < n; s++ {
			for a := 0; a < 2; a++ {
				for b := 0; b < 2; b++ {
					v := onDiag[a][b]
					if r != s {
						v = c[r*n+s] * offDiag[a][b]
					}
					h[(2*r+a)*m+2*s+b] = v
				}
			}
		}
	}
	return h
}

// williamsonHadamard builds the Williamson array of order 4n
//
//	[ A  B  C  D]
//	[−B  A −D  C]
//	[−C  D  A −B]
//	[−D −C  B  A]
//
// from the first rows of the circulants A, B, C, D (X[i][j] = x[(j−i) mod n]).
func williamsonHadamard(rows [4]string) []int8 {
	n := len(rows[0])
	var seq [4][]int8
	for k, s := range rows {
		if len(s) != n {
			panic("patch: Williamson rows of unequal length")
		}
		seq[k] = make([]int8, n)
		for i := 0; i < n; i++ {
			switch s[i] {
			case '+':
				seq[k][i] = 1
			case '-':
				seq[k][i] = -1
			default:
				panic(fmt.Sprintf("patch: bad Williamson symbol %q", s[i]))
			}
		}
	}
	// layout[R][C] = (which of A..D, sign)
	type blk struct {
		k    int
		sign int8
	}
	layout := [4][4]blk{
		{{0, 1}, {1, 1}, {2, 1}, {3, 1}},
		{{1, -1}, {0, 1}, {3, -1}, {2, 1}},
		{{2, -1}, {3, 1}, {0, 1}, {1, -1}},
		{{3, -1}, {2, -1}, {1, 1}, {0, 1}},
	}
	m := 4 * n
	h := make([]int8, m*m)
	for br := 0; br < 4; br++ {
		for bc := 0; bc < 4; bc++ {
			b := layout[br][bc]
			for i := 0; i < n; i++ {
				for j := 0; j < n; j++ {
					h[(br*n+i)*m+bc*n+j] = b.sign * seq[b.k][((j-i)%n+n)%n]
				}
			}
		}
	}
	return h
}

// gfQuadraticCharacter returns, for GF(q) with q = p^e (p an odd prime, e ≤ 3),
// the table χ[x] ∈ {0, 1, −1} over the base-p encodings x ∈ [0, q) of the
// field elements, a subtraction on encodings, and q. For e > 1 the field is
// GF(p)[t]/(f) with f the first monic polynomial of degree e without a root in
// GF(p) in base-p counting order of its low coefficients (irreducible as e ≤ 3);
// for GF(25) that is f = t² + 2.
func gfQuadraticCharacter(p, e int) (chi []int8, sub func(x, y int) int, q int) {
	if e < 1 || e > 3 {
		panic(fmt.Sprintf("patch: GF(%d^%d) not supported", p, e))
	}
	q = 1
	for i := 0; i < e; i++ {
		q *= p
	}
	digits := func(x int) []int {
		d := make([]int, e)
		for i := 0; i < e; i++ {
			d[i] = x % p
			x /= p
		}
		return d
	}
	encode := func(d []int) int {
		x := 0
		for i := e - 1; i >= 0; i-- {
			x = x*p + ((d[i]%p)+p)%p
		}
		return x
	}
	sub = func(x, y int) int {
		a, b := digits(x), digits(y)
		for i := range a {
			a[i] -= b[i]
		}
		return encode(a)
	}
	f := gfIrreducible(p, e) // monic, f[e] = 1
	mul := func(x, y int) int {
		a, b := digits(x), digits(y)
		prod := make([]int, 2*e-1)
		for i := range a {
			for j := range b {
				prod[i+j] = (prod[i+j] + a[i]*b[j]) % p
			}
		}
		for k := 2*e - 2; k >= e; k-- {
			c := prod[k]
			for i := 0; i < e; i++ {
				prod[k-e+i] = (prod[k-e+i] - c*f[i]%p + p) % p
			}
			prod[k] = 0
		}
		return encode(prod[:e])
	}
	chi = make([]int8, q)
	for x := 1; x < q; x++ {
		chi[x] = -1
	}
	for x := 1; x < q; x++ {
		chi[mul(x, x)] = 1
	}
	return chi, sub, q
}

// gfIrreducible returns the coefficients f[0..e] (f[e] = 1) of the first monic
// polynomial of degree e over GF(p) with no root in GF(p), counting its low
// coefficients f[0..e−1] in base p. For e ≤ 3 no root means irreducible; for
// e = 1 it is f = t.
func gfIrreducible(p, e int) []int {
	f := make([]int, e+1)
	f[e] = 1
	if e == 1 {
		return f
	}
	limit := 1
	for i := 0; i < e; i++ {
		limit *= p
	}
	for c := 0; c < limit; c++ {
		x := c
		for i := 0; i < e; i++ {
			f[i] = x % p
			x /= p
		}
		hasRoot := false
		for r := 0; r < p && !hasRoot; r++ {
			v := 0
			for i := e; i >= 0; i-- {
				v = (v*r + f[i]) % p
			}
			hasRoot = v == 0
		}
		if !hasRoot {
			return f
		}
	}
	panic(fmt.Sprintf("patch: no irreducible polynomial of degree %d over GF(%d)", e, p))
}
