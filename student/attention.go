package student

import (
	"math"
	"sync"
	"sync/atomic"

	"linearpatch/model/tensor"
)

// attnShape describes causal grouped-query attention over B sequences of T rows stacked in
// rows, reading a fused row layout [q heads | k heads | v heads] of width
// (heads + 2·kvHeads)·hd and writing rows of width heads·hd. Query head h attends with kv
// head h/(heads/kvHeads); scores are q·kᵀ/sqrt(hd) over the positions ≤ t of its sequence
// and, when window > 0, > t − window (Mistral's sliding window).
type attnShape struct {
	T, heads, kvHeads, hd int
	window                int // 0: full causal attention
}

// firstKey returns the first key position the query at position t sees.
func (a attnShape) firstKey(t int) int {
	if a.window > 0 {
		return max(0, t-a.window+1)
	}
	return 0
}

func (a attnShape) width() int    { return (a.heads + 2*a.kvHeads) * a.hd }
func (a attnShape) outWidth() int { return a.heads * a.hd }

// attnRowsPerBlock is the number of score rows (positions × heads of a kv group) per causal
// block, as in the engine: block i of query positions meets only the keys up to its end.
var attnRowsPerBlock = 64

// attnScratch is one worker's buffers for one (sequence, kv head) item.
type attnScratch struct {
	q, o, dq []float32 // T·G × hd: query heads of the group stacked by position
	dk, dv   []float32 // T × hd
	d        []float32 // T·G: rowsum(dO ⊙ O)
	s, dp    []float32 // block rows × T
}

func (a attnShape) newScratch(backward bool) *attnScratch {
	G := a.heads / a.kvHeads
	bq := max(1, attnRowsPerBlock/G)
	s := &attnScratch{
		q: make([]float32, a.T*G*a.hd),
		o: make([]float32, a.T*G*a.hd),
		s: make([]float32, min(bq, a.T)*G*a.T),
	}
	if backward {
		s.dq = make([]float32, a.T*G*a.hd)
		s.dk = make([]float32, a.T*a.hd)
		s.dv = make([]float32, a.T*a.hd)
		s.d = make([]float32, a.T*G)
		s.dp = make([]float32, min(bq, a.T)*G*a.T)
	}
	return s
}

// forEachItem runs fn(scratch, b, g) for every (sequence b, kv head g) pair of n rows on up
// to tensor.Threads() goroutines, each with its own scratch.
func (a attnShape) forEachItem(n int, backward bool, fn func(s *attnScratch, b, g int)) {
	items := n / a.T * a.kvHeads
	w := min(tensor.Threads(), items)
	var next atomic.Int64
	var wg sync.WaitGroup
	run := func() {
		s := a.newScratch(backward)
		for {
			it := int(next.Add(1) - 1)
			if it >= items {
				return
			}
			fn(s, it/a.kvHeads, it%a.kvHeads)
		}
	}
	for range w - 1 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			run()
		}()
	}
	run()
	wg.Wait()
}

// causalProbs sets sc (rows × p1) to the causal softmax of scale·Q_blk·Kᵀ for the query
// positions [p0, p0+rows/G): row r is position t = p0 + r/G and keeps keys firstKey(t)..t,
// the others zero.
func (a attnShape) causalProbs(sc, qblk, kb []float32, rows, p0, p1 int, scale float32) {
	G := a.heads / a.kvHeads
	sgemm(false, true, rows, p1, a.hd, scale, qblk, a.hd, kb, a.width(), 0, sc, p1)
	for r := range rows {
		t := p0 + r/G
		lo := a.firstKey(t)
		row := sc[r*p1 : (r+1)*p1]
		clear(row[:lo])
		tensor.Softmax(row[lo : t+1])
		clear(row[t+1:])
	}
}

// attentionForward sets out (n × heads·hd) to causal GQA attention of the fused qkv rows.
func attentionForward(out, qkv []float32, a attnShape) {
	T, hd, W, OW := a.T, a.hd, a.width(), a.outWidth()
	G := a.heads / a.kvHeads
	gw := G * hd
	bq := max(1, attnRowsPerBlock/G)
	scale := float32(1 / math.Sqrt(float64(hd)))
	n := len(qkv) / W
	a.forEachItem(n, false, func(s *attnScratch, b, g int) {
		base := b * T
		for t := range T {
			off := (base+t)*W + g*gw
			copy(s.q[t*gw:(t+1)*gw], qkv[off:off+gw])
		}
		kb := qkv[base*W+(a.heads+g)*hd:]
		vb := qkv[base*W+(a.heads+a.kvHeads+g)*hd:]
		for p0 := 0; p0 < T; p0 += bq {
			p1 := min(p0+bq, T)
			rows := (p1 - p0) * G
			sc := s.s[:rows*p1]
			a.causalProbs(sc, s.q[p0*gw:], kb, rows, p0, p1, scale)
			sgemm(false, false, rows, hd, p1, 1, sc, p1, vb, W, 0, s.o[p0*gw:], hd)
		}
		for t := range T {
			off := (base+t)*OW + g*gw
			copy(out[off:off+gw], s.o[t*gw:(t+1)*gw])
		}
	})
}

// attentionBackward sets dqkv (n × width) to the gradient of attentionForward with respect
// to its fused input, given the forward output out and its gradient dout (n × heads·hd).
// The probabilities are recomputed block by block rather than stored (memory O(T) per
// worker instead of O(heads·T²)).
func attentionBackward(dqkv, qkv, out, dout []float32, a attnShape) {
	T, hd, W, OW := a.T, a.hd, a.width(), a.outWidth()
	G := a.heads / a.kvHeads
	gw := G * hd
	bq := max(1, attnRowsPerBlock/G)
	scale := float32(1 / math.Sqrt(float64(hd)))
	n := len(qkv) / W
	a.forEachItem(n, true, func(s *attnScratch, b, g int) {
		base := b * T
		for t := range T {
			qoff := (base+t)*W + g*gw
			ooff := (base+t)*OW + g*gw
			copy(s.q[t*gw:(t+1)*gw], qkv[qoff:qoff+gw])
			copy(s.o[t*gw:(t+1)*gw], dout[ooff:ooff+gw]) // s.o holds dO here
			for h := range G {
				var dot float64
				o := out[ooff+h*hd : ooff+(h+1)*hd]
				do := dout[ooff+h*hd : ooff+(h+1)*hd]
				for c, v := range o {
					dot += float64(v) * float64(do[c])
				}
				s.d[t*G+h] = float32(dot)
			}
		}
		clear(s.dk)
		clear(s.dv)
		kb := qkv[base*W+(a.heads+g)*hd:]
		vb := qkv[base*W+(a.heads+a.kvHeads+g)*hd:]
		for p0 := 0; p0 < T; p0 += bq {
			p1 := min(p0+bq, T)
			rows := (p1 - p0) * G
			pr := s.s[:rows*p1]
			dp := s.dp[:rows*p1]
			qblk, doblk := s.q[p0*gw:], s.o[p0*gw:]
			a.causalProbs(pr, qblk, kb, rows, p0, p1, scale)
			// dV[:p1] += Pᵀ·dO
			sgemm(true, false, p1, hd, rows, 1, pr, p1, doblk, hd, 1, s.dv, hd)
			// dP = dO·Vᵀ, then dS = P ⊙ (dP − D) in place
			sgemm(false, true, rows, p1, hd, 1, doblk, hd, vb, W, 0, dp, p1)
			for r := range rows {
				t := p0 + r/G
				dr, prr := dp[r*p1:(r+1)*p1], pr[r*p1:(r+1)*p1]
				dv := s.d[p0*G+r]
				lo := a.firstKey(t)
				clear(dr[:lo])
				for j := lo; j <= t; j++ {
					dr[j] = prr[j] * (dr[j] - dv)
				}
				clear(dr[t+1:])
			}
			// dQ = scale·dS·K, dK[:p1] += scale·dSᵀ·Q
			sgemm(false, false, rows, hd, p1, scale, dp, p1, kb, W, 0, s.dq[p0*gw:], hd)
			sgemm(true, false, p1, hd, rows, scale, dp, p1, qblk, hd, 1, s.dk, hd)
		}
		for t := range T {
			row := dqkv[(base+t)*W:]
			copy(row[g*gw:(g+1)*gw], s.dq[t*gw:(t+1)*gw])
			copy(row[(a.heads+g)*hd:(a.heads+g+1)*hd], s.dk[t*hd:(t+1)*hd])
			copy(row[(a.heads+a.kvHeads+g)*hd:(a.heads+a.kvHeads+g+1)*hd], s.dv[t*hd:(t+1)*hd])
		}
	})
}
