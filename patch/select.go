package patch

import (
	"errors"
	"fmt"
	"math"
)

// ErrBlock is wrapped by the error Select returns when no block can be chosen.
var ErrBlock = errors.New("patch: no block to prune")

// Select returns the start of the block [start, start+n) of a model with layers layers whose
// mean cosine (cosine[i] between X_i and X_{i+n}, i = 0..layers−n, as Stats.Cosine returns)
// is highest. Candidates are i ∈ [1, layers−n−1], both inclusive, as in the official code
// (never the first layer, never a block that ends at the output), or i ∈ [0, layers−n] when
// allowEdges. Ties go to the lowest start; a NaN cosine is never selected.
//
// The error wraps ErrBlock when n < 1, n ≥ layers, len(cosine) ≠ layers−n+1, or no
// candidate exists (n ≥ layers−1 without edges, or every candidate is NaN).
func Select(cosine []float64, layers, n int, allowEdges bool) (start int, err error) {
	if n < 1 || n >= layers {
		return 0, fmt.Errorf("%w: cannot prune %d of %d layers", ErrBlock, n, layers)
	}
	if len(cosine) != layers-n+1 {
		return 0, fmt.Errorf("%w: %d cosines given, want %d for %d of %d layers", ErrBlock, len(cosine), layers-n+1, n, layers)
	}
	lo, hi := 1, layers-n-1
	if allowEdges {
		lo, hi = 0, layers-n
	}
	start = -1
	for i := lo; i <= hi; i++ {
		if math.IsNaN(cosine[i]) {
			continue
		}
		if start < 0 || cosine[i] > cosine[start] {
			start = i
		}
	}
	if start < 0 {
		if lo > hi {
			return 0, fmt.Errorf("%w: no block of %d layers inside %d layers avoids the first and the last (allow edges)", ErrBlock, n, layers)
		}
		return 0, fmt.Errorf("%w: every candidate cosine is NaN", ErrBlock)
	}
	return start, nil
}
