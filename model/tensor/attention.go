package tensor

import "math"

// attnRowsPerBlock is the target number of score rows (query positions × heads of a kv
// group) per causal block: block i of query positions only multiplies against the keys up
// to its last position, so the upper triangle is (mostly) skipped. 64 measured best among
// 64, 128, 256 and unblocked on the development machine. Tests vary it.
var attnRowsPerBlock = 64

// Attention computes causal grouped-query attention for B sequences of seqLen rows each,
// stacked in rows. q and dst are (B·seqLen)×(heads·hd); k and v are (B·seqLen)×(kvHeads·hd).
// Query head h attends with kv head h/(heads/kvHeads): for the query at position t of a
// sequence, scores over that sequence's keys at positions <= t are q·kᵀ/sqrt(hd), softmaxed
// and used to weight the values. dst is overwritten and must not share storage with q, k
// or v. It panics unless seqLen >= 1, kvHeads >= 1, heads is a multiple of kvHeads, q.Cols
// is a multiple of heads, the row counts are equal multiples of seqLen and the widths match.
//
// Work is split over (sequence, kv head) pairs on up to Threads() goroutines; the query
// heads of one kv group are stacked so that each product is one sgemm, and query positions
// go in blocks that only meet the keys up to the block's end. While the pairs run in
// parallel, OpenBLAS is held at one thread (a process-wide setting): BLAS products that
// other goroutines run meanwhile stay correct but single-threaded.
func Attention(dst, q, k, v *Matrix, seqLen, heads, kvHeads int) {
	AttentionWindow(dst, q, k, v, seqLen, heads, kvHeads, 0)
}

// AttentionWindow is Attention with a sliding window (Mistral's): when window > 0, the
// query at position t only sees the keys at positions s with t − window < s ≤ t. window 0
// is plain causal attention. It panics as Attention does, and on window < 0.
func AttentionWindow(dst, q, k, v *Matrix, seqLen, heads, kvHeads, window int) {
	mustShape("Attention", seqLen >= 1 && heads >= 1 && kvHeads >= 1 && heads%kvHeads == 0 &&
		q.Cols%heads == 0 && window >= 0, "seqLen %d, %d heads, %d kv heads, q width %d, window %d", seqLen, heads, kvHeads, q.Cols, window)
	hd := q.Cols / heads
	mustShape("Attention", q.Rows%seqLen == 0 && dst.SameShape(q) &&
		k.Rows == q.Rows && v.Rows == q.Rows && k.Cols == kvHeads*hd && v.Cols == kvHeads*hd,
		"dst %d×%d, q %d×%d, k %d×%d, v %d×%d, seqLen %d, %d heads, %d kv heads",
		dst.Rows, dst.Cols, q.Rows, q.Cols, k.Rows, k.Cols, v.Rows, v.Cols, seqLen, heads, kvHeads)
	mustShape("Attention", !overlaps(dst, q) && !overlaps(dst, k) && !overlaps(dst, v), "dst aliases an input")
	if q.Rows == 0 || hd == 0 {
		clear(dst.Data)
		return
	}
	T, G := seqLen, heads/kvHeads
	B := q.Rows / T
	gw := G * hd // width of one kv group's query heads
	bq := max(1, attnRowsPerBlock/G)
	scale := float32(1 / math.Sqrt(float64(hd)))

	type scratch struct{ q, o, s []float32 }
	var bufs []scratch
	setup := func(w int) {
		bufs = make([]scratch, w)
		for i := range bufs {
			bufs[i] = scratch{
				q: make([]float32, T*gw),
				o: make([]float32, T*gw),
				s: make([]float32, min(bq, T)*G*T),
			}
		}
	}
	item := func(w, it int) {
		b, g := it/kvHeads, it%kvHeads
		s := &bufs[w]
		// Gather: row t·G+h' of s.q is query head g·G+h' at position t.
		for t := range T {
			off := (b*T+t)*q.Cols + g*gw
			copy(s.q[t*gw:(t+1)*gw], q.Data[off:off+gw])
		}
		kb := k.Data[b*T*k.Cols+g*hd:]
		vb := v.Data[b*T*v.Cols+g*hd:]
		for p0 := 0; p0 < T; p0 += bq {
			p1 := min(p0+bq, T)
			k0 := 0 // first key any query of the block sees
			if window > 0 {
				k0 = max(0, p0-window+1)
			}
			nk := p1 - k0
			rows := (p1 - p0) * G
			sc := s.s[:rows*nk]
			gemm(false, true, rows, nk, hd, scale, s.q[p0*gw:], hd, kb[k0*k.Cols:], k.Cols, 0, sc, nk)
			for r := range rows {
				t := p0 + r/G
				lo := 0
				if window > 0 {
					lo = max(0, t-window+1) - k0
				}
				row := sc[r*nk : (r+1)*nk]
				clear(row[:lo])
				Softmax(row[lo : t+1-k0])
				clear(row[t+1-k0:])
			}
			gemm(false, false, rows, hd, nk, 1, sc, nk, vb[k0*v.Cols:], v.Cols, 0, s.o[p0*gw:], hd)
		}
		for t := range T {
			off := (b*T+t)*dst.Cols + g*gw
			copy(dst.Data[off:off+gw], s.o[t*gw:(t+1)*gw])
		}
	}
	if Threads() > 1 && B*kvHeads > 1 {
		// Many small products side by side: one BLAS thread each is faster than BLAS
		// threads inside each product (measured: about 1/4 of the CPU time).
		defer singleBLAS()()
	}
	parallelItems(B*kvHeads, setup, item)
}
