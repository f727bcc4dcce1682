package model

import (
	"fmt"
	"math"
	"os"
	"strings"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
)

// Piece types of sentencepiece_model.proto (ModelProto.SentencePiece.Type).
const (
	spNormal      = 1
	spUnknown     = 2
	spControl     = 3
	spUserDefined = 4
	spUnused      = 5
	spByte        = 6
)

// spModelBPE is TrainerSpec.ModelType BPE; UNIGRAM (1, the proto default), WORD and CHAR
// are not supported.
const spModelBPE = 2

// spSpace is U+2581 LOWER ONE EIGHTH BLOCK, sentencepiece's escaped space.
const spSpace = "\u2581"

// spUnkSurface is how the unknown piece decodes (TrainerSpec.unk_surface's default).
const spUnkSurface = " \u2047 "

// SentencePiece is a SentencePiece BPE tokenizer read from a tokenizer.model file. It
// implements the identity normalization rule (no NFKC) and byte fallback, and encodes as
// sentencepiece's bpe_model.cc does. It is immutable and safe for concurrent use.
type SentencePiece struct {
	pieces []string
	scores []float32
	types  []int8

	bpe         bpeMerger      // pieces: NORMAL, USER_DEFINED and UNUSED pieces
	user        map[string]int // USER_DEFINED pieces, matched whole before merging
	maxUserLen  int
	byteID      [256]int // id of piece <0xXX>, -1 when missing
	hasUnused   bool
	byteFallbck bool

	unk, bos, eos int

	addDummyPrefix, removeExtraSpaces, escapeSpaces bool

	chunkPairs spPairs // character pairs inside pieces: where a long text may not be cut
}

var _ Tokenizer = (*SentencePiece)(nil)

// LoadSentencePiece reads a SentencePiece model (a serialized sentencepiece ModelProto).
// Errors wrap ErrTokenizer for a malformed file and for what is not supported: a model
// type other than BPE, a normalization rule other than identity (one with a precompiled
// charsmap, such as NFKC), treat_whitespace_as_suffix.
func LoadSentencePiece(path string) (*SentencePiece, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("model: load sentencepiece: %w", err)
	}
	sp, err := parseSentencePiece(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return sp, nil
}

// spTrainer and spNormalizer hold the fields of TrainerSpec and NormalizerSpec that
// matter for encoding, with the proto's defaults.
type spTrainer struct {
	modelType               uint64
	byteFallback            bool
	treatWhitespaceAsSuffix bool
	unk, bos, eos           int
}

type spNormalizer struct {
	name                                            string
	charsmap                                        int // length of precompiled_charsmap
	addDummyPrefix, removeExtraSpaces, escapeSpaces bool
}

// parseSentencePiece decodes a ModelProto: pieces = 1, trainer_spec = 2, normalizer_spec = 3.
func parseSentencePiece(b []byte) (*SentencePiece, error) {
	sp := &SentencePiece{}
	tr := spTrainer{modelType: 1, unk: 0, bos: 1, eos: 2}
	norm := spNormalizer{addDummyPrefix: true, removeExtraSpaces: true, escapeSpaces: true}
	err := protoFields(b, func(num protowire.Number, typ protowire.Type, v uint64, raw []byte) error {
		switch {
		case num == 1 && typ == protowire.BytesType:
			piece, score, ty, err := parseSPPiece(raw)
			if err != nil {
				return fmt.Errorf("piece %d: %w", len(sp.pieces), err)
			}
			sp.pieces = append(sp.pieces, piece)
			sp.scores = append(sp.scores, score)
			sp.types = append(sp.types, ty)
		case num == 2 && typ == protowire.BytesType:
			return parseSPTrainer(raw, &tr)
		case num == 3 && typ == protowire.BytesType:
			return parseSPNormalizer(raw, &norm)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrTokenizer, err)
	}
	if err := sp.init(tr, norm); err != nil {
		return nil, fmt.Errorf("%w: %s", ErrTokenizer, err)
	}
	return sp, nil
}

// protoFields calls f for every field of the message b: v holds a varint or fixed value,
// raw the bytes of a length-delimited one. Groups are skipped.
func protoFields(b []byte, f func(num protowire.Number, typ protowire.Type, v uint64, raw []byte) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		var v uint64
		var raw []byte
		switch typ {
		case protowire.VarintType:
			v, n = protowire.ConsumeVarint(b)
		case protowire.Fixed32Type:
			var x uint32
			x, n = protowire.ConsumeFixed32(b)
			v = uint64(x)
		case protowire.Fixed64Type:
			v, n = protowire.ConsumeFixed64(b)
		case protowire.BytesType:
			raw, n = protowire.ConsumeBytes(b)
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return fmt.Errorf("field %d: %w", num, protowire.ParseError(n))
		}
		b = b[n:]
		if err := f(num, typ, v, raw); err != nil {
			return err
		}
	}
	return nil
}

// parseSPPiece decodes a ModelProto.SentencePiece: piece = 1, score = 2, type = 3.
func parseSPPiece(b []byte) (piece string, score float32, ty int8, err error) {
	ty = spNormal
	err = protoFields(b, func(num protowire.Number, typ protowire.Type, v uint64, raw []byte) error {
		switch {
		case num == 1 && typ == protowire.BytesType:
			piece = string(raw)
		case num == 2 && typ == protowire.Fixed32Type:
			score = math.Float32frombits(uint32(v))
		case num == 3 && typ == protowire.VarintType:
			if v < spNormal || v > spByte {
				return fmt.Errorf("unknown piece type %d", v)
			}
			ty = int8(v)
		}
		return nil
	})
	return piece, score, ty, err
}

// parseSPTrainer decodes the TrainerSpec fields model_type = 3,
// treat_whitespace_as_suffix = 24, byte_fallback = 35 and unk/bos/eos_id = 40/41/42.
func parseSPTrainer(b []byte, tr *spTrainer) error {
	return protoFields(b, func(num protowire.Number, typ protowire.Type, v uint64, raw []byte) error {
		if typ != protowire.VarintType {
			return nil
		}
		switch num {
		case 3:
			tr.modelType = v
		case 24:
			tr.treatWhitespaceAsSuffix = v != 0
		case 35:
			tr.byteFallback = v != 0
		case 40:
			tr.unk = int(int32(v))
		case 41:
			tr.bos = int(int32(v))
		case 42:
			tr.eos = int(int32(v))
		}
		return nil
	})
}

// parseSPNormalizer decodes the NormalizerSpec fields name = 1, precompiled_charsmap = 2,
// add_dummy_prefix = 3, remove_extra_whitespaces = 4 and escape_whitespaces = 5.
func parseSPNormalizer(b []byte, n *spNormalizer) error {
	return protoFields(b, func(num protowire.Number, typ protowire.Type, v uint64, raw []byte) error {
		switch {
		case num == 1 && typ == protowire.BytesType:
			n.name = string(raw)
		case num == 2 && typ == protowire.BytesType:
			n.charsmap = len(raw)
		case num == 3 && typ == protowire.VarintType:
			n.addDummyPrefix = v != 0
		case num == 4 && typ == protowire.VarintType:
			n.removeExtraSpaces = v != 0
		case num == 5 && typ == protowire.VarintType:
			n.escapeSpaces = v != 0
		}
		return nil
	})
}

// init checks the parsed model and builds the lookup tables.
func (sp *SentencePiece) init(tr spTrainer, norm spNormalizer) error {
	if tr.modelType != spModelBPE {
		names := map[uint64]string{1: "UNIGRAM", 3: "WORD", 4: "CHAR"}
		name := names[tr.modelType]
		if name == "" {
			name = fmt.Sprint(tr.modelType)
		}
		return fmt.Errorf("model type %s is not supported (only BPE)", name)
	}
	if norm.charsmap > 0 || (norm.name != "" && norm.name != "identity") {
		return fmt.Errorf("normalization rule %q (precompiled charsmap of %d bytes) is not supported (only identity)", norm.name, norm.charsmap)
	}
	if tr.treatWhitespaceAsSuffix {
		return fmt.Errorf("treat_whitespace_as_suffix is not supported")
	}
	n := len(sp.pieces)
	if n == 0 {
		return fmt.Errorf("no pieces")
	}
	if tr.unk < 0 || tr.unk >= n || sp.types[tr.unk] != spUnknown {
		return fmt.Errorf("unk_id %d is not an UNKNOWN piece of the %d", tr.unk, n)
	}
	if tr.bos >= n || tr.eos >= n {
		return fmt.Errorf("bos_id %d or eos_id %d out of range [0,%d)", tr.bos, tr.eos, n)
	}
	sp.unk, sp.bos, sp.eos = tr.unk, max(tr.bos, -1), max(tr.eos, -1)
	sp.byteFallbck = tr.byteFallback
	sp.addDummyPrefix, sp.removeExtraSpaces, sp.escapeSpaces = norm.addDummyPrefix, norm.removeExtraSpaces, norm.escapeSpaces

	sp.bpe = bpeMerger{pieces: make(map[string]int, n), scores: sp.scores, minScore: float32(math.Inf(-1))}
	for i := range sp.byteID {
		sp.byteID[i] = -1
	}
	seen := make(map[string]bool, n)
	for id, p := range sp.pieces {
		if p == "" {
			return fmt.Errorf("piece %d is empty", id)
		}
		if seen[p] {
			return fmt.Errorf("piece %d %q is defined twice", id, p)
		}
		seen[p] = true
		switch sp.types[id] {
		case spNormal, spUserDefined, spUnused:
			sp.bpe.pieces[p] = id
		case spByte:
			if !tr.byteFallback {
				return fmt.Errorf("byte piece %d %q without byte_fallback", id, p)
			}
			b, ok := parseBytePiece(p)
			if !ok {
				return fmt.Errorf("byte piece %d %q is not <0xXX>", id, p)
			}
			sp.byteID[b] = id
		}
		switch sp.types[id] {
		case spUserDefined:
			if sp.user == nil {
				sp.user = make(map[string]int)
			}
			sp.user[p] = id
			sp.maxUserLen = max(sp.maxUserLen, len(p))
		case spUnused:
			if sp.bpe.unused == nil {
				sp.bpe.unused = make([]bool, n)
			}
			sp.bpe.unused[id] = true
			sp.hasUnused = true
		}
	}
	sp.chunkPairs = sp.buildPairs()
	return nil
}

// VocabSize returns the number of pieces.
func (sp *SentencePiece) VocabSize() int { return len(sp.pieces) }

// BOS returns the begin-of-sequence id (-1: none).
func (sp *SentencePiece) BOS() int { return sp.bos }

// DocumentStart returns the BOS id (-1: none).
func (sp *SentencePiece) DocumentStart() int { return sp.bos }

// EOS returns the end-of-sequence id (-1: none).
func (sp *SentencePiece) EOS() int { return sp.eos }

// Piece returns the piece of id; it panics when id is out of range.
func (sp *SentencePiece) Piece(id int) string { return sp.pieces[id] }

// normalize applies sentencepiece's normalizer with the identity rule (normalizer.cc): each
// invalid UTF-8 byte becomes U+FFFD; with remove_extra_whitespaces leading and trailing
// spaces are dropped and runs of spaces collapse to one (only U+0020 counts: a tab stays);
// with add_dummy_prefix a space is prepended to a non-empty result; with escape_whitespaces
// every space becomes U+2581. As in sentencepiece, trailing U+2581 are dropped along with
// spaces, since the trailing strip runs on the escaped text.
func (sp *SentencePiece) normalize(text string) string {
	if sp.removeExtraSpaces {
		text = strings.TrimLeft(text, " ")
	}
	if text == "" {
		return ""
	}
	space := " "
	if sp.escapeSpaces {
		space = spSpace
	}
	var b strings.Builder
	b.Grow(len(text) + len(text)/2 + 3)
	if sp.addDummyPrefix {
		b.WriteString(space)
	}
	prevSpace := sp.removeExtraSpaces
	for i := 0; i < len(text); {
		c := text[i]
		if c == ' ' {
			if !prevSpace {
				b.WriteString(space)
			}
			prevSpace = sp.removeExtraSpaces
			i++
			continue
		}
		prevSpace = false
		if c < utf8.RuneSelf {
			b.WriteByte(c)
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(text[i:])
		if r == utf8.RuneError && size == 1 {
			b.WriteString("\uFFFD")
		} else {
			b.WriteString(text[i : i+size])
		}
		i += size
	}
	out := b.String()
	if sp.removeExtraSpaces {
		for strings.HasSuffix(out, space) {
			out = out[:len(out)-len(space)]
		}
	}
	return out
}

// Encode returns the ids of text as one line, without BOS: the normalized text is split
// into characters (user-defined pieces whole), merged by BPE, and every resulting symbol
// that is not a piece is spelt with byte pieces <0xXX> (byte fallback) or is the unknown id.
// Control and unknown pieces are never produced from text. The text should hold no newline:
// one would be encoded as byte <0x0A>.
func (sp *SentencePiece) Encode(text string) []int {
	norm := sp.normalize(text)
	if norm == "" {
		return []int{}
	}
	if len(norm) > spChunkBytes && !sp.hasUnused {
		return sp.encodeChunked(norm, spChunkBytes)
	}
	return sp.encodeNormalized(norm)
}

// encodeNormalized encodes normalized text as one BPE segmentation.
func (sp *SentencePiece) encodeNormalized(norm string) []int {
	if len(norm) > math.MaxInt32 {
		panic("model: SentencePiece.Encode: line longer than 2 GiB")
	}
	syms := make([]bpeSym, 0, utf8.RuneCountInString(norm))
	for i := 0; i < len(norm); {
		size, frozen := 0, false
		if sp.user != nil {
			for l := min(sp.maxUserLen, len(norm)-i); l > 0; l-- {
				if _, ok := sp.user[norm[i:i+l]]; ok {
					size, frozen = l, true
					break
				}
			}
		}
		if size == 0 {
			if norm[i] < utf8.RuneSelf {
				size = 1
			} else {
				_, size = utf8.DecodeRuneInString(norm[i:]) // valid: normalize replaced bad bytes
			}
		}
		k := int32(len(syms))
		syms = append(syms, bpeSym{start: int32(i), end: int32(i + size), prev: k - 1, next: k + 1, id: -1, frozen: frozen})
		i += size
	}
	syms[len(syms)-1].next = -1

	var rev map[string][2]string
	if sp.hasUnused {
		rev = make(map[string][2]string)
	}
	heap := make(bpeHeap, 0, len(syms))
	sp.bpe.merge(norm, syms, &heap, rev)

	ids := make([]int, 0, len(syms))
	for i := int32(0); i >= 0; i = syms[i].next {
		ids = sp.appendPiece(ids, norm[syms[i].start:syms[i].end], rev)
	}
	return ids
}

// appendPiece appends the ids of one merged symbol w (bpe_model.cc's resegment, then the
// processor's byte fallback).
func (sp *SentencePiece) appendPiece(ids []int, w string, rev map[string][2]string) []int {
	id, ok := sp.bpe.pieces[w]
	if ok && sp.types[id] == spUnused {
		if parts, ok := rev[w]; ok {
			ids = sp.appendPiece(ids, parts[0], rev)
			return sp.appendPiece(ids, parts[1], rev)
		}
		ok = false // an unused single character: unknown
	}
	if ok {
		return append(ids, id)
	}
	if !sp.byteFallbck {
		return append(ids, sp.unk)
	}
	for i := 0; i < len(w); i++ {
		if b := sp.byteID[w[i]]; b >= 0 {
			ids = append(ids, b)
		} else {
			ids = append(ids, sp.unk)
		}
	}
	return ids
}

// Decode returns the text of ids: pieces joined, byte pieces reassembled into UTF-8 (each
// byte of an invalid sequence becomes U+FFFD), U+2581 turned back into spaces and, with
// add_dummy_prefix, the leading space dropped. Control pieces and out-of-range ids decode
// to nothing, the unknown piece to " ⁇ ".
func (sp *SentencePiece) Decode(ids []int) string {
	var b strings.Builder
	var pending []byte // run of byte pieces not yet written
	flush := func() {
		for len(pending) > 0 {
			r, size := utf8.DecodeRune(pending)
			if r == utf8.RuneError && size == 1 {
				b.WriteString("\uFFFD")
			} else {
				b.Write(pending[:size])
			}
			pending = pending[size:]
		}
	}
	for _, id := range ids {
		if id < 0 || id >= len(sp.pieces) {
			continue
		}
		switch sp.types[id] {
		case spControl:
			continue
		case spByte:
			b, _ := parseBytePiece(sp.pieces[id]) // validated at load
			pending = append(pending, b)
			continue
		}
		flush()
		if sp.types[id] == spUnknown {
			b.WriteString(spUnkSurface)
			continue
		}
		p := sp.pieces[id]
		if sp.escapeSpaces {
			p = strings.ReplaceAll(p, spSpace, " ")
		}
		b.WriteString(p)
	}
	flush()
	out := b.String()
	if sp.addDummyPrefix {
		out = strings.TrimPrefix(out, " ")
	}
	return out
}

// parseBytePiece returns the byte of a piece "<0xXX>" (hex digits of either case).
func parseBytePiece(p string) (byte, bool) {
	if len(p) != 6 || p[:3] != "<0x" || p[5] != '>' {
		return 0, false
	}
	hi, ok1 := unhex(p[3])
	lo, ok2 := unhex(p[4])
	return hi<<4 | lo, ok1 && ok2
}

func unhex(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10, true
	case c >= 'A' && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}
