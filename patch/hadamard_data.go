package patch

// Williamson quadruples: the first rows a, b, c, d of four symmetric circulant
// ±1 matrices A, B, C, D of order n with A² + B² + C² + D² = 4n·I, written with
// '+' for +1 and '-' for −1. They give the Hadamard matrices of order 4n that
// no Paley construction reaches among our orders (see williamsonHadamard).
//
// Source: the table of Williamson-type quadruples in SageMath
// (src/sage/combinat/matrices/hadamard_matrix.py,
// williamson_type_quadruples_smallcases), which cites M. Hall, Combinatorial
// Theory, 2nd ed., 1983, for n = 43 and S. London, 2013, for n = 39. Every
// sequence is checked by the tests: length n, symmetric (a[i] = a[n−i]), and the
// resulting order-4n matrix satisfies H·Hᵀ = 4n·I in integer arithmetic.
var williamsonQuadruples = map[int][4]string{
	39: {
		"+++--+-+-----+--++----++--+-----+-+--++",
		"+++--++-+---+-+--+----+--+-+---+-++--++",
		"++++---+--++----+-+--+-+----++--+---+++",
		"+---++-+-+-----+++-++-+++-----+-+-++---",
	},
	43: {
		"++---++++-+--+--++--------++--+--+-++++---+",
		"+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
		"++-++++++----+-+--++-++-++--+-+----++++++-+",
		"+---++--++++-+-+++-++--++-+++-+-++++--++---",
	},
}
