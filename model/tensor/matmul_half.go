package tensor

import "sync"

// halfBlockRows is the most weight rows (output features) of a half-precision right-hand
// side of MulT widened at a time, and halfBlockBytes the most float32 bytes of such a block
// (see halfBlockRowsFor). The block's row count depends only on the weight's shape, so the
// BLAS calls that compute an output element have the same shapes whatever the thread count
// and whatever the number of rows of a: the row blocks are mulInto's (gemmRowBlock rows,
// padded alike). A row's bits therefore never depend on the batch, as for float32 weights.
// Measured on LLaMA-3-8B's shapes (512 rows, 2 threads), 256 rows did better than 128 and
// than blocks sized to fit a core's cache (32 rows at k = 14336).
const (
	halfBlockRows  = 256
	halfBlockBytes = 16 << 20
)

// halfScratch holds widened weight blocks (*[]float32) between products.
var halfScratch sync.Pool

// mulTHalf sets dst = a·bᵀ for a half b and a batch of seqLen-row sequences in a (checked by
// MulTSeq). Work items are pairs of a block of halfBlockRows rows of b, widened into a
// per-item float32 scratch (halfBlockRowsFor), and a group of mulInto's row blocks, each multiplied in its own
// gemmRowBlock-row BLAS call (rowBlock). Row blocks are grouped only as much as the thread
// count needs (one group when there are enough weight blocks), so each weight element is
// widened once or a few times per product; the grouping never changes the BLAS calls, hence
// the bits. The scratch is at most halfBlockBytes per goroutine.
func mulTHalf(dst, a, b *Matrix, seqLen int) {
	m, n, k := dst.Rows, dst.Cols, a.Cols
	if m == 0 || n == 0 {
		return
	}
	if k == 0 {
		clear(dst.Data)
		return
	}
	br := halfBlockRowsFor(k)
	nBlocks := (n + br - 1) / br
	blocks := rowBlocks(m, seqLen)
	groups := 1
	if want := 2 * Threads(); nBlocks < want { // enough items to balance the goroutines
		groups = min(blocks, (want+nBlocks-1)/nBlocks)
	}
	perGroup := (blocks + groups - 1) / groups
	groups = (blocks + perGroup - 1) / perGroup
	parallelItems(nBlocks*groups, func(int) {}, func(_, item int) {
		j, g := item/groups, item%groups
		j0, j1 := j*br, min((j+1)*br, n)
		need := (j1 - j0) * k
		var buf []float32
		if p, ok := halfScratch.Get().(*[]float32); ok && cap(*p) >= need {
			buf = (*p)[:need]
		} else {
			buf = make([]float32, need)
		}
		w := b.RowsF32(j0, j1, buf)
		for i := g * perGroup; i < min((g+1)*perGroup, blocks); i++ {
			lo, hi := rowBlockRange(i, seqLen)
			rowBlock(true, lo, hi, j1-j0, k, a.Data, w, k, dst.Data[j0:], dst.Cols)
		}
		halfScratch.Put(&buf)
	})
}

// halfBlockRowsFor returns the rows of a weight of k columns widened at a time: halfBlockRows,
// or fewer (a multiple of 16, at least 32) when k is so large that the block would exceed
// halfBlockBytes. It depends on the weight's shape only, never on a or the threads.
func halfBlockRowsFor(k int) int {
	r := halfBlockBytes / (4 * max(k, 1)) / 16 * 16
	return min(max(r, 32), halfBlockRows)
}
