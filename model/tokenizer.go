package model

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Tokenizer turns text into token ids and back. Implementations are safe for concurrent use.
type Tokenizer interface {
	// Encode returns the ids of text taken as one line, without BOS or EOS. It never fails:
	// text the vocabulary cannot spell falls back to byte pieces (or the unknown id).
	Encode(text string) []int
	// Decode returns the text of ids. Control ids (BOS, EOS, …) and ids outside
	// [0, VocabSize()) decode to nothing.
	Decode(ids []int) string
	// VocabSize is the number of pieces; every id Encode returns is below it.
	VocabSize() int
	// BOS and EOS are the begin- and end-of-sequence ids, or -1 when the tokenizer has none.
	BOS() int
	EOS() int
	// DocumentStart is the id put in front of every document (the lines protocol), of the
	// joined text (the join protocol) and of every multiple-choice context: the tokenizer's
	// own BOS, else the model's config.json bos_token_id (LoadTokenizer fills it in), or -1
	// when there is neither.
	DocumentStart() int
}

// docStartTokenizer is a tokenizer without its own BOS whose document start comes from
// the model's config.json.
type docStartTokenizer struct {
	Tokenizer
	start int
}

func (t docStartTokenizer) DocumentStart() int { return t.start }

// configBOS reads bos_token_id from dir/config.json: -1 when the file or the key is
// missing or null.
func configBOS(dir string) int {
	b, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return -1
	}
	var h struct {
		BOS json.RawMessage `json:"bos_token_id"`
	}
	if json.Unmarshal(b, &h) != nil {
		return -1
	}
	return firstTokenID(h.BOS, -1)
}

var (
	// ErrTokenizer is wrapped by every error about a malformed or unsupported tokenizer file.
	ErrTokenizer = errors.New("model: bad tokenizer")
	// ErrNoTokenizer is wrapped when a model has no tokenizer but one is needed (to read text).
	ErrNoTokenizer = errors.New("model: no tokenizer")
)

// TokenizerFiles are the tokenizer files of a Hugging Face directory, which a model derived
// from it (an export) copies.
var TokenizerFiles = []string{hfTokenizerFile, hfTokenizerConfigFile, sentencePieceFile}

// Tokenizer file names looked up by LoadTokenizer.
const (
	hfTokenizerJSON   = hfTokenizerFile // preferred over tokenizer.model
	sentencePieceFile = "tokenizer.model"
	llama2cTokFile    = "tokenizer.bin"
)

// LoadTokenizer finds and loads the tokenizer of the model at modelPath: a Hugging Face
// directory (or a file in one) holding a tokenizer.json (LoadHFTokenizer; preferred) or a
// SentencePiece tokenizer.model, or a llama2.c .bin
// checkpoint with a tokenizer.bin beside it (which stores no vocabulary size: vocab, the
// model's, is used). When vocab > 0 a tokenizer with more pieces than vocab is an error
// (ErrTokenizer), since its ids would index past the embeddings. When no tokenizer file
// exists the error wraps ErrNoTokenizer and names modelPath.
func LoadTokenizer(modelPath string, vocab int) (Tokenizer, error) {
	fi, err := os.Stat(modelPath)
	if err != nil {
		return nil, fmt.Errorf("model: load tokenizer: %w", err)
	}
	dir := modelPath
	if !fi.IsDir() {
		dir = filepath.Dir(modelPath)
	}
	var tok Tokenizer
	if !fi.IsDir() && strings.EqualFold(filepath.Ext(modelPath), ".bin") {
		p := filepath.Join(dir, llama2cTokFile)
		if isRegular(p) {
			if vocab <= 0 {
				return nil, fmt.Errorf("%w: %s: a llama2.c tokenizer needs the model's vocabulary size", ErrTokenizer, p)
			}
			t, err := LoadLlama2cTokenizer(p, vocab)
			if err != nil {
				return nil, err
			}
			tok = t
		}
	}
	if tok == nil && isRegular(filepath.Join(dir, hfTokenizerJSON)) {
		t, err := LoadHFTokenizer(dir)
		if err != nil {
			return nil, err
		}
		tok = t
	}
	if tok == nil {
		p := filepath.Join(dir, sentencePieceFile)
		if !isRegular(p) {
			return nil, fmt.Errorf("%w: %s has no %s or %s (or %s beside a llama2.c .bin); use token data (JSON Lines with input_ids)",
				ErrNoTokenizer, modelPath, hfTokenizerJSON, sentencePieceFile, llama2cTokFile)
		}
		t, err := LoadSentencePiece(p)
		if err != nil {
			return nil, err
		}
		tok = t
	}
	if tok.DocumentStart() < 0 {
		if id := configBOS(dir); id >= 0 {
			tok = docStartTokenizer{Tokenizer: tok, start: id}
		}
	}
	if vocab > 0 && tok.VocabSize() > vocab {
		return nil, fmt.Errorf("%w: %s: tokenizer has %d pieces, more than the model's vocabulary %d",
			ErrTokenizer, modelPath, tok.VocabSize(), vocab)
	}
	return tok, nil
}

func isRegular(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular()
}

// bpeSym is one symbol of a BPE segmentation: the byte range [start, end) of the working
// text, linked to its neighbours (-1 at the ends). Fields are int32 to halve the memory
// traffic: a working text must be shorter than 2 GiB.
type bpeSym struct {
	start, end int32
	prev, next int32
	id         int32 // vocabulary id of the range; -1 when it has none
	frozen     bool  // never merged (a user-defined symbol)
	dead       bool  // merged into its left neighbour
}

// bpePair is a merge candidate: symbols left and right (adjacent when pushed) whose
// concatenation, size bytes long, is piece id with score.
type bpePair struct {
	score       float32
	left, right int32
	size        int32
	id          int32
}

// before orders merge candidates: the highest score first, ties to the leftmost.
func (p bpePair) before(q bpePair) bool {
	if p.score != q.score {
		return p.score > q.score
	}
	return p.left < q.left
}

// bpeHeap holds the merge candidates of one text.
type bpeHeap = mergeHeap[bpePair]

// bpeMerger merges adjacent symbols greedily, as sentencepiece's bpe_model.cc does: always
// the adjacent pair whose concatenation is a piece with the highest score, ties to the
// leftmost pair, until no adjacent pair forms a piece. A priority queue with lazily
// discarded stale entries makes it O(n log n) in the number of symbols.
type bpeMerger struct {
	pieces   map[string]int // mergeable pieces
	scores   []float32      // by id
	minScore float32        // pairs scoring ≤ minScore never merge
	// unused marks ids that may be merged but are split back when they remain (sentencepiece
	// UNUSED pieces); nil: none.
	unused []bool
}

// merge runs the merges on syms, ranges of text linked in order, and leaves the result
// as the list starting at syms[0] (dead symbols are unlinked). When rev is not nil it
// records, for every unused piece formed, the two pieces it was formed from.
func (b *bpeMerger) merge(text string, syms []bpeSym, heap *bpeHeap, rev map[string][2]string) {
	*heap = (*heap)[:0]
	for i := 1; i < len(syms); i++ {
		b.candidate(text, syms, int32(i-1), int32(i), heap, rev, false)
	}
	for i := len(*heap)/2 - 1; i >= 0; i-- { // heapify: O(n)
		heap.down(i)
	}
	for len(*heap) > 0 {
		top := heap.pop()
		l, r := &syms[top.left], &syms[top.right]
		if l.dead || r.dead || l.next != top.right || (l.end-l.start)+(r.end-r.start) != top.size {
			continue // stale: one side has been merged since the pair was pushed
		}
		l.end = r.end
		l.id = top.id
		l.next = r.next
		if r.next >= 0 {
			syms[r.next].prev = top.left
		}
		r.dead = true
		b.candidate(text, syms, l.prev, top.left, heap, rev, true)
		b.candidate(text, syms, top.left, l.next, heap, rev, true)
	}
}

// candidate queues the pair (left, right) if it forms a mergeable piece: pushed onto the
// heap when push, else appended (the caller heapifies).
func (b *bpeMerger) candidate(text string, syms []bpeSym, left, right int32, heap *bpeHeap, rev map[string][2]string, push bool) {
	if left < 0 || right < 0 || syms[left].frozen || syms[right].frozen {
		return
	}
	// The two symbols are adjacent ranges, so their concatenation is a substring: no copy.
	piece := text[syms[left].start:syms[right].end]
	id, ok := b.pieces[piece]
	if !ok || b.scores[id] <= b.minScore {
		return
	}
	p := bpePair{score: b.scores[id], left: left, right: right, size: int32(len(piece)), id: int32(id)}
	if push {
		heap.push(p)
	} else {
		*heap = append(*heap, p)
	}
	if rev != nil && b.unused[id] {
		rev[piece] = [2]string{text[syms[left].start:syms[left].end], text[syms[right].start:syms[right].end]}
	}
}
