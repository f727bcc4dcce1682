package model

// mergeHeap is a binary heap of BPE merge candidates, the candidate that goes first at its
// root: bpePair (SentencePiece scores, highest first) and rankPair (tokenizer.json merge
// ranks, lowest first), each breaking ties to the leftmost pair.
type mergeHeap[T interface{ before(T) bool }] []T

func (h *mergeHeap[T]) push(x T) {
	*h = append(*h, x)
	a := *h
	for i := len(a) - 1; i > 0; {
		parent := (i - 1) / 2
		if !a[i].before(a[parent]) {
			break
		}
		a[i], a[parent] = a[parent], a[i]
		i = parent
	}
}

// down restores the heap order below i.
func (h mergeHeap[T]) down(i int) {
	n := len(h)
	for {
		l := 2*i + 1
		if l >= n {
			return
		}
		m := l
		if r := l + 1; r < n && h[r].before(h[l]) {
			m = r
		}
		if !h[m].before(h[i]) {
			return
		}
		h[i], h[m] = h[m], h[i]
		i = m
	}
}

// pop removes and returns the root; the heap must not be empty.
func (h *mergeHeap[T]) pop() T {
	a := *h
	top := a[0]
	n := len(a) - 1
	a[0] = a[n]
	*h = a[:n]
	h.down(0)
	return top
}
