package shards

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"math"
	"slices"
)

// TopK writes into idx the indices of the k largest logits in descending order (ties by
// ascending index) and into prob the softmax over those k logits (in float64, rounded to
// float32), which is what a teacher publishes per token. It runs in O(V log k) for V logits
// with a size-k min-heap. NaN logits order below every number (a selected NaN gives NaN
// probabilities, which EncodeMessage rejects). logits is not modified. It panics unless
// 1 ≤ k ≤ len(logits) and len(idx) = len(prob) = k.
func TopK(logits []float32, k int, idx []int32, prob []float32) {
	if k < 1 || k > len(logits) || len(idx) != k || len(prob) != k {
		panic(fmt.Sprintf("shards: TopK of %d logits, k %d, into %d indices and %d probabilities", len(logits), k, len(idx), len(prob)))
	}
	// heap holds the best k seen so far; heap[0] is the worst of them.
	heap := idx[:0]
	for i := range logits {
		v := int32(i)
		if len(heap) < k {
			heap = append(heap, v)
			for c := len(heap) - 1; c > 0; { // sift up
				p := (c - 1) / 2
				if !better(logits, heap[p], heap[c]) {
					break
				}
				heap[p], heap[c] = heap[c], heap[p]
				c = p
			}
			continue
		}
		if !better(logits, v, heap[0]) {
			continue
		}
		heap[0] = v
		siftDown(logits, heap, 0, k)
	}
	// Heap sort: move the worst to the end repeatedly, leaving descending order.
	for n := k - 1; n > 0; n-- {
		heap[0], heap[n] = heap[n], heap[0]
		siftDown(logits, heap, 0, n)
	}
	softmaxAt(logits, idx, prob)
}

// better reports whether logit a ranks above logit b: larger, ties by smaller index, NaN last.
func better(logits []float32, a, b int32) bool {
	x, y := logits[a], logits[b]
	switch {
	case x > y:
		return true
	case x < y:
		return false
	case x == y:
		return a < b
	}
	// At least one NaN.
	xn, yn := x != x, y != y
	if xn != yn {
		return yn
	}
	return a < b
}

// siftDown restores the min-heap (worst at the root) of h[:n] below position i.
func siftDown(logits []float32, h []int32, i, n int) {
	for {
		w := i
		if l := 2*i + 1; l < n && better(logits, h[w], h[l]) {
			w = l
		}
		if r := 2*i + 2; r < n && better(logits, h[w], h[r]) {
			w = r
		}
		if w == i {
			return
		}
		h[i], h[w] = h[w], h[i]
		i = w
	}
}

// softmaxAt writes the softmax of logits at idx (idx[0] the largest) into prob.
func softmaxAt(logits []float32, idx []int32, prob []float32) {
	m := float64(logits[idx[0]])
	var sum float64
	for _, i := range idx {
		sum += math.Exp(float64(logits[i]) - m)
	}
	for j, i := range idx {
		prob[j] = float32(math.Exp(float64(logits[i])-m) / sum)
	}
}

// topKNaive is TopK by sorting every index: the twin TopK is tested against.
func topKNaive(logits []float32, k int, idx []int32, prob []float32) {
	all := make([]int32, len(logits))
	for i := range all {
		all[i] = int32(i)
	}
	slices.SortStableFunc(all, func(a, b int32) int {
		if better(logits, a, b) {
			return -1
		}
		if better(logits, b, a) {
			return 1
		}
		return 0
	})
	copy(idx, all[:k])
	softmaxAt(logits, idx, prob)
}

// Top-k quantizer (SCHEMA.md, "Top-k targets"). A token's k entries are stored in
// ascending id order, so no bits are spent on their order: the id gaps g_j = id_j −
// id_{j−1} − 1 (id_{−1} = −1) as a low byte and a high part (1 byte when the vocabulary
// has ≤ 65536 ids, else 2), and c_j = round(255·√p_j) with p normalized to sum 1. The
// decoder reconstructs w_j = c_j² + 1/12 (the centroid of a uniform error in √p space,
// never 0), renormalizes and sorts by descending probability, ties by ascending id.
const sqrtLevels = 255

// topKScratch holds the per-token scratch space of the quantizer.
type topKScratch struct {
	perm []int
}

func newTopKScratch(k int) *topKScratch {
	return &topKScratch{perm: make([]int, k)}
}

// encodeTopK quantizes one token's targets (idx, prob: k entries in any order) into lo
// (k bytes), hi (k·hiW bytes) and q (k bytes). Errors wrap ErrInvalid: an id outside
// [0, vocab), a repeated id, a negative or non-finite probability, or a zero sum.
func encodeTopK(idx []int32, prob []float32, vocab, hiW int, lo, hi, q []byte, s *topKScratch) error {
	k := len(idx)
	perm := s.perm[:k]
	var sum float64
	for j := range perm {
		perm[j] = j
		if idx[j] < 0 || int(idx[j]) >= vocab {
			return fmt.Errorf("%w: top-k id %d outside the vocabulary [0, %d)", ErrInvalid, idx[j], vocab)
		}
		p := float64(prob[j])
		if !(p >= 0) || math.IsInf(p, 1) {
			return fmt.Errorf("%w: top-k probability %v", ErrInvalid, prob[j])
		}
		sum += p
	}
	if !(sum > 0) || math.IsInf(sum, 1) {
		return fmt.Errorf("%w: top-k probabilities sum to %v", ErrInvalid, sum)
	}
	slices.SortFunc(perm, func(a, b int) int { return cmp.Compare(idx[a], idx[b]) })
	prev := int32(-1)
	for j, e := range perm {
		id := idx[e]
		if id == prev {
			return fmt.Errorf("%w: top-k id %d repeated", ErrInvalid, id)
		}
		gap := uint32(id - prev - 1)
		prev = id
		lo[j] = byte(gap)
		if hiW == 1 {
			hi[j] = byte(gap >> 8)
		} else {
			binary.LittleEndian.PutUint16(hi[2*j:], uint16(gap>>8))
		}
		q[j] = byte(math.Round(sqrtLevels * math.Sqrt(float64(prob[e])/sum)))
	}
	return nil
}

// decodeTopK inverts encodeTopK into idx and prob (k = len(idx) entries, descending
// probability, ties by ascending id). It returns false when an id reaches vocab.
func decodeTopK(lo, hi, q []byte, vocab, hiW int, idx []int32, prob []float32) bool {
	k := len(idx)
	id := -1
	var sum float64
	for j := range k {
		gap := int(lo[j])
		if hiW == 1 {
			gap |= int(hi[j]) << 8
		} else {
			gap |= int(binary.LittleEndian.Uint16(hi[2*j:])) << 8
		}
		id += gap + 1
		if id >= vocab {
			return false
		}
		c := float64(q[j])
		sum += c*c + 1.0/12
		// Insert entry j (id ascending so far) into idx/prob by descending code; a stable
		// insertion keeps ties in ascending id order.
		pos := j
		for pos > 0 && q[j] > codeOf(prob[pos-1]) {
			pos--
		}
		copy(idx[pos+1:j+1], idx[pos:j])
		copy(prob[pos+1:j+1], prob[pos:j])
		idx[pos] = int32(id)
		prob[pos] = float32(q[j]) // the code, for now
	}
	for j := range k {
		c := float64(prob[j])
		prob[j] = float32((c*c + 1.0/12) / sum)
	}
	return true
}

// codeOf returns the code temporarily held in a prob slot by decodeTopK.
func codeOf(p float32) byte { return byte(p) }
