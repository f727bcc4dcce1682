package model

import (
	"sync"
	"sync/atomic"
	"unicode/utf8"
)

// hfChunkBytes is the least size of the chunks a long word (a whole line for
// SentencePiece-style tokenizers, which have no pre-tokenizer) is cut in: 1 cuts at every
// place no merge crosses (mostly before "▁"), so that the chunks are short words that the
// cache holds, and the working memory is bounded.
const hfChunkBytes = 1

// Words up to hfCacheWordLen bytes keep their ids in a cache of at most hfCacheEntries
// words (then no more are added), as tokenizers' BPE cache does.
const (
	hfCacheWordLen = 64
	hfCacheEntries = 1 << 17
)

// hfWordCache maps a word to its ids; safe for concurrent use.
type hfWordCache struct {
	m sync.Map // string → []int
	n atomic.Int64
}

func (c *hfWordCache) get(w string) ([]int, bool) {
	v, ok := c.m.Load(w)
	if !ok {
		return nil, false
	}
	return v.([]int), true
}

func (c *hfWordCache) put(w string, ids []int) {
	if c.n.Load() >= hfCacheEntries {
		return
	}
	if _, loaded := c.m.LoadOrStore(w, ids); !loaded {
		c.n.Add(1)
	}
}

// bpeMerge is the result of merging a pair of pieces: the merge's rank (lower merges
// first) and the merged piece's id.
type bpeMerge struct {
	rank, id int32
}

func mergeKey(a, b int) uint64 { return uint64(uint32(a))<<32 | uint64(uint32(b)) }

// rankSym is one symbol of a word being merged: a piece id, linked to its neighbours
// (-1 at the ends).
type rankSym struct {
	id         int32
	prev, next int32
	dead       bool
}

// rankPair is a merge candidate: symbols left and right, adjacent with ids lid and rid
// when pushed.
type rankPair struct {
	rank, left, right, lid, rid, id int32
}

// before orders merge candidates: the lowest rank first, ties to the leftmost.
func (p rankPair) before(q rankPair) bool {
	if p.rank != q.rank {
		return p.rank < q.rank
	}
	return p.left < q.left
}

// rankHeap holds the merge candidates of one word.
type rankHeap = mergeHeap[rankPair]

// hfScratch is the reusable memory of one Encode call.
type hfScratch struct {
	syms []rankSym
	heap rankHeap
}

// encodeWord appends the ids of one pre-tokenized word: the word's id when ignore_merges
// and it is a piece; else its characters (each not in the vocabulary spelled by its
// <0xXX> byte pieces under byte_fallback, else the unknown id, consecutive ones fused
// under fuse_unk, else dropped: tokenizers fails there), merged by rank as tokenizers' BPE::merge_word does: the
// pair with the lowest merge rank first, ties to the leftmost.
func (t *HFTokenizer) encodeWord(ids []int, w string, sc *hfScratch) []int {
	if w == "" {
		return ids
	}
	if t.ignoreMerges {
		if id, ok := t.vocab[w]; ok {
			return append(ids, id)
		}
	}
	if len(w) > hfCacheWordLen && t.cross != nil {
		return t.mergeChunks(ids, w, sc)
	}
	return t.cachedMerge(ids, w, sc)
}

// cachedMerge is mergeWord through the cache of short words.
func (t *HFTokenizer) cachedMerge(ids []int, w string, sc *hfScratch) []int {
	if len(w) > hfCacheWordLen {
		return t.mergeWord(ids, w, sc)
	}
	if c, ok := t.cache.get(w); ok {
		return append(ids, c...)
	}
	n := len(ids)
	ids = t.mergeWord(ids, w, sc)
	t.cache.put(w, append([]int(nil), ids[n:]...))
	return ids
}

// mergeChunks merges a long word in chunks of at least chunkBytes, cut before a rune that
// is a piece (so no unknown runes fuse across the cut) where no merge joins the runes on
// either side: the ids are those of the whole word, since no merge crosses a cut.
func (t *HFTokenizer) mergeChunks(ids []int, w string, sc *hfScratch) []int {
	start := 0
	prev, n := utf8.DecodeRuneInString(w)
	for i := n; i < len(w); i += n {
		var r rune
		r, n = utf8.DecodeRuneInString(w[i:])
		if i-start >= t.chunkBytes {
			if _, joined := t.cross[runePair(prev, r)]; !joined {
				if _, known := t.vocab[w[i:i+n]]; known {
					ids = t.cachedMerge(ids, w[start:i], sc)
					start = i
				}
			}
		}
		prev = r
	}
	return t.cachedMerge(ids, w[start:], sc)
}

// mergeWord is encodeWord without the cache.
func (t *HFTokenizer) mergeWord(ids []int, w string, sc *hfScratch) []int {
	syms := sc.syms[:0]
	lastUnk := false
	for i := 0; i < len(w); {
		_, n := utf8.DecodeRuneInString(w[i:])
		if id, ok := t.vocab[w[i:i+n]]; ok {
			syms = append(syms, rankSym{id: int32(id)})
			lastUnk = false
			i += n
			continue
		}
		if t.byteFallback && t.hasBytes(w[i:i+n]) {
			for k := i; k < i+n; k++ {
				syms = append(syms, rankSym{id: int32(t.byteID[w[k]])})
			}
			lastUnk = false
			i += n
			continue
		}
		i += n
		if lastUnk && t.fuseUnk {
			continue
		}
		// Without an unknown id the character is dropped, but a symbol of id -1 (in no
		// merge) stays in its place so that its neighbours do not merge across it.
		syms = append(syms, rankSym{id: int32(t.unk)})
		lastUnk = true
	}
	for i := range syms {
		syms[i].prev, syms[i].next = int32(i-1), int32(i+1)
	}
	if len(syms) > 0 {
		syms[len(syms)-1].next = -1
	}
	h := sc.heap[:0]
	for i := 1; i < len(syms); i++ {
		t.pushPair(&h, syms, int32(i-1), int32(i))
	}
	for len(h) > 0 {
		p := h.pop()
		l, r := &syms[p.left], &syms[p.right]
		if l.dead || r.dead || l.next != p.right || l.id != p.lid || r.id != p.rid {
			continue // stale: a side has merged since the pair was pushed
		}
		l.id = p.id
		l.next = r.next
		if r.next >= 0 {
			syms[r.next].prev = p.left
		}
		r.dead = true
		if l.prev >= 0 {
			t.pushPair(&h, syms, l.prev, p.left)
		}
		if l.next >= 0 {
			t.pushPair(&h, syms, p.left, l.next)
		}
	}
	for i := int32(0); len(syms) > 0 && i >= 0; i = syms[i].next {
		if syms[i].id >= 0 {
			ids = append(ids, int(syms[i].id))
		}
	}
	sc.syms, sc.heap = syms, h
	return ids
}

func (t *HFTokenizer) pushPair(h *rankHeap, syms []rankSym, left, right int32) {
	m, ok := t.merges[mergeKey(int(syms[left].id), int(syms[right].id))]
	if ok {
		h.push(rankPair{rank: m.rank, left: left, right: right, lid: syms[left].id, rid: syms[right].id, id: m.id})
	}
}

func (t *HFTokenizer) hasBytes(s string) bool {
	for i := 0; i < len(s); i++ {
		if t.byteID[s[i]] < 0 {
			return false
		}
	}
	return true
}
