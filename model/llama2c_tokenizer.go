package model

import (
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"strings"
	"unicode/utf8"
)

// llama2.c's fixed special ids (run.c) and the offset of its byte-fallback ids: byte b is
// id b+3.
const (
	l2cUnk        = 0
	l2cBOS        = 1
	l2cEOS        = 2
	l2cByteOffset = 3
)

// Llama2cTokenizer is a llama2.c tokenizer.bin (its export of a SentencePiece model: spaces
// as ' ', bytes as pieces "<0xXX>", BOS "\n<s>\n" and EOS "\n</s>\n"), encoding as run.c's
// encode. It is immutable and safe for concurrent use.
type Llama2cTokenizer struct {
	vocab []string
	bpe   bpeMerger // every piece, by first id
	space int       // id of " ", -1 when missing
}

var _ Tokenizer = (*Llama2cTokenizer)(nil)

// LoadLlama2cTokenizer reads the first vocabSize pieces of a llama2.c tokenizer.bin:
// int32 max_token_length, then per piece float32 score, int32 length and the bytes, all
// little-endian. vocabSize is the model's (the file does not store it); bytes after the last
// piece are ignored, as run.c does. A short or malformed file is an error wrapping ErrTokenizer.
func LoadLlama2cTokenizer(path string, vocabSize int) (*Llama2cTokenizer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("model: load llama2.c tokenizer: %w", err)
	}
	t, err := parseLlama2cTokenizer(b, vocabSize)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return t, nil
}

func parseLlama2cTokenizer(b []byte, vocabSize int) (*Llama2cTokenizer, error) {
	if vocabSize <= l2cEOS {
		return nil, fmt.Errorf("%w: vocabulary size %d (needs <unk>, BOS and EOS at 0, 1, 2)", ErrTokenizer, vocabSize)
	}
	if len(b) < 4 {
		return nil, fmt.Errorf("%w: llama2.c tokenizer truncated before max_token_length", ErrTokenizer)
	}
	t := &Llama2cTokenizer{vocab: make([]string, vocabSize), space: -1}
	b = b[4:] // max_token_length: only run.c's buffer size
	scores := make([]float32, vocabSize)
	t.bpe = bpeMerger{pieces: make(map[string]int, vocabSize), scores: scores, minScore: -1e10}
	for i := range vocabSize {
		if len(b) < 8 {
			return nil, fmt.Errorf("%w: llama2.c tokenizer truncated at piece %d of %d", ErrTokenizer, i, vocabSize)
		}
		scores[i] = math.Float32frombits(binary.LittleEndian.Uint32(b))
		n := int64(int32(binary.LittleEndian.Uint32(b[4:])))
		b = b[8:]
		if n < 0 || n > int64(len(b)) {
			return nil, fmt.Errorf("%w: llama2.c tokenizer piece %d has length %d with %d bytes left", ErrTokenizer, i, n, len(b))
		}
		p := string(b[:n])
		b = b[n:]
		t.vocab[i] = p
		if _, dup := t.bpe.pieces[p]; !dup {
			t.bpe.pieces[p] = i
		}
	}
	if id, ok := t.bpe.pieces[" "]; ok {
		t.space = id
	}
	return t, nil
}

// VocabSize returns the number of pieces.
func (t *Llama2cTokenizer) VocabSize() int { return len(t.vocab) }

// BOS returns 1, llama2.c's fixed begin-of-sequence id.
func (t *Llama2cTokenizer) BOS() int { return l2cBOS }

// DocumentStart returns the BOS id.
func (t *Llama2cTokenizer) DocumentStart() int { return l2cBOS }

// EOS returns 2, llama2.c's fixed end-of-sequence id.
func (t *Llama2cTokenizer) EOS() int { return l2cEOS }

// Encode returns the ids of text as run.c's encode does, without BOS: for non-empty text the
// piece " " (a dummy prefix; skipped when the vocabulary lacks it), then each UTF-8
// character's piece (a lead byte with up to three continuation bytes, as run.c groups them)
// or, for one missing from the vocabulary, its bytes as ids byte+3 (the unknown id 0 where
// that is past the vocabulary); then repeatedly the adjacent pair whose concatenated pieces
// form the best-scoring piece (score above -1e10, ties to the leftmost) is merged. Unlike
// run.c, a NUL byte does not end the text.
func (t *Llama2cTokenizer) Encode(text string) []int {
	if text == "" {
		return []int{}
	}
	var work strings.Builder // the concatenated pieces of the initial symbols
	work.Grow(len(text) + 1)
	syms := make([]bpeSym, 0, len(text)+1)
	add := func(id int) {
		start := work.Len()
		work.WriteString(t.vocab[id])
		if work.Len() > math.MaxInt32 {
			panic("model: Llama2cTokenizer.Encode: text longer than 2 GiB")
		}
		k := int32(len(syms))
		syms = append(syms, bpeSym{start: int32(start), end: int32(work.Len()), prev: k - 1, next: k + 1, id: int32(id)})
	}
	if t.space >= 0 {
		add(t.space)
	}
	for i := 0; i < len(text); {
		// A byte and up to three continuation bytes after it: a lead byte's character, or,
		// as in run.c, a run of stray continuation bytes.
		n := 1
		for n < utf8.UTFMax && i+n < len(text) && text[i+n]&0xC0 == 0x80 {
			n++
		}
		if id, ok := t.bpe.pieces[text[i:i+n]]; ok {
			add(id)
		} else {
			for _, c := range []byte(text[i : i+n]) {
				if id := int(c) + l2cByteOffset; id < len(t.vocab) {
					add(id)
				} else {
					add(l2cUnk)
				}
			}
		}
		i += n
	}
	syms[len(syms)-1].next = -1
	heap := make(bpeHeap, 0, len(syms))
	t.bpe.merge(work.String(), syms, &heap, nil)
	ids := make([]int, 0, len(syms))
	for i := int32(0); i >= 0; i = syms[i].next {
		ids = append(ids, int(syms[i].id))
	}
	return ids
}

// Decode returns the text of ids as run.c's decode does, piece by piece: "<0xXX>" pieces
// are their byte, BOS and EOS are dropped, and the leading space of the first piece (the
// dummy prefix) is dropped. Out-of-range ids decode to nothing. Byte pieces that do not form
// valid UTF-8 are kept as bytes.
func (t *Llama2cTokenizer) Decode(ids []int) string {
	var b strings.Builder
	first := true
	for _, id := range ids {
		if id < 0 || id >= len(t.vocab) || id == l2cBOS || id == l2cEOS {
			continue
		}
		p := t.vocab[id]
		if first {
			p = strings.TrimPrefix(p, " ")
			first = false
		}
		if c, ok := parseBytePiece(p); ok {
			b.WriteByte(c)
			continue
		}
		b.WriteString(p)
	}
	return b.String()
}
