package model

import "unicode/utf8"

// Long texts (the join protocol encodes a whole file as one string) are encoded in chunks,
// bounding the BPE working memory (~50 bytes per character) by the chunk instead of the
// text. A chunk ends only at a boundary no merge can cross: between two characters that
// appear next to each other in no mergeable or user-defined piece. A merge forms a piece
// from two adjacent symbols, so a merge across such a boundary would form a piece holding
// the pair; merges on either side never compete (the heap order only ranks candidates, and
// candidates of one side never involve the other). The ids are therefore those of the
// whole text. Not used when the model has UNUSED pieces, whose re-segmentation depends on
// how the piece was last formed anywhere in the text.

// spChunkBytes is the length of normalized text beyond which Encode cuts into chunks.
const spChunkBytes = 1 << 16

// spPairs is the set of adjacent character pairs inside the pieces of a SentencePiece model.
type spPairs map[[2]rune]struct{}

// buildPairs returns the character pairs of every mergeable and user-defined piece.
func (sp *SentencePiece) buildPairs() spPairs {
	set := spPairs{}
	add := func(p string) {
		prev := rune(-1)
		for _, r := range p {
			if prev >= 0 {
				set[[2]rune{prev, r}] = struct{}{}
			}
			prev = r
		}
	}
	for p := range sp.bpe.pieces {
		add(p)
	}
	for p := range sp.user {
		add(p)
	}
	return set
}

// encodeChunked encodes normalized text in chunks of at least chunk bytes cut at safe
// boundaries (see above); the result equals encodeNormalized(norm).
func (sp *SentencePiece) encodeChunked(norm string, chunk int) []int {
	pairs := sp.chunkPairs
	ids := make([]int, 0, len(norm)/3)
	start := 0
	prev, prevSize := utf8.DecodeRuneInString(norm)
	for i := prevSize; i < len(norm); {
		r, size := utf8.DecodeRuneInString(norm[i:])
		if i-start >= chunk {
			if _, joined := pairs[[2]rune{prev, r}]; !joined {
				ids = append(ids, sp.encodeNormalized(norm[start:i])...)
				start = i
			}
		}
		prev = r
		i += size
	}
	return append(ids, sp.encodeNormalized(norm[start:])...)
}
