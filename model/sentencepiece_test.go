package model

import (
	"encoding/json"
	"errors"
	"io/fs"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
)

// tokShared is the shared directory beside the project (../shared from the repository).
func tokShared(t testing.TB) string {
	t.Helper()
	dir := filepath.Join("..", "..", "shared")
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("shared directory missing (needed by the tokenizer tests): %v", err)
	}
	return dir
}

// tokGolden is the tokenizer part of golden/tinystories-8L.json.
type tokGolden struct {
	Tokenize []struct {
		Text     string `json:"text"`
		InputIDs []int  `json:"input_ids"`
	} `json:"tokenize"`
	TokenizeFiles map[string]struct {
		NumTokens int   `json:"num_tokens"`
		First64   []int `json:"first64"`
		Last64    []int `json:"last64"`
	} `json:"tokenize_files"`
}

func loadTokGolden(t testing.TB) tokGolden {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(tokShared(t), "golden", "tinystories-8L.json"))
	if err != nil {
		t.Fatal(err)
	}
	var g tokGolden
	if err := json.Unmarshal(b, &g); err != nil {
		t.Fatal(err)
	}
	if len(g.Tokenize) == 0 || len(g.TokenizeFiles) == 0 {
		t.Fatal("golden file has no tokenize cases")
	}
	return g
}

var (
	tinySPOnce sync.Once
	tinySP     *SentencePiece
	tinySPErr  error
)

// tinyTokenizer loads the tinystories-8L tokenizer once per test binary.
func tinyTokenizer(t testing.TB) *SentencePiece {
	t.Helper()
	path := filepath.Join(tokShared(t), "models", "tinystories-8L", "tokenizer.model")
	tinySPOnce.Do(func() { tinySP, tinySPErr = LoadSentencePiece(path) })
	if tinySPErr != nil {
		t.Fatal(tinySPErr)
	}
	return tinySP
}

// validLines returns the non-blank lines of data/tinystories/valid.txt.
func validLines(t testing.TB) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(tokShared(t), "data", "tinystories", "valid.txt"))
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.TrimSpace(l) != "" {
			lines = append(lines, l)
		}
	}
	return lines
}

func TestSentencePieceLoad(t *testing.T) {
	sp := tinyTokenizer(t)
	if sp.VocabSize() != 1024 || sp.BOS() != 1 || sp.EOS() != 2 {
		t.Fatalf("vocab %d bos %d eos %d, want 1024 1 2", sp.VocabSize(), sp.BOS(), sp.EOS())
	}
	if sp.Piece(0) != "<unk>" || sp.Piece(1) != "<s>" || sp.Piece(2) != "</s>" {
		t.Errorf("special pieces %q %q %q", sp.Piece(0), sp.Piece(1), sp.Piece(2))
	}
	for b := range 256 {
		if sp.byteID[b] < 0 {
			t.Fatalf("byte piece <0x%02X> missing", b)
		}
	}
	if !sp.byteFallbck || !sp.addDummyPrefix || !sp.removeExtraSpaces || !sp.escapeSpaces {
		t.Errorf("flags: byte fallback %v dummy prefix %v remove spaces %v escape %v",
			sp.byteFallbck, sp.addDummyPrefix, sp.removeExtraSpaces, sp.escapeSpaces)
	}
}

func TestSentencePieceGolden(t *testing.T) {
	sp := tinyTokenizer(t)
	for _, c := range loadTokGolden(t).Tokenize {
		t.Run(c.Text, func(t *testing.T) {
			got := append([]int{sp.BOS()}, sp.Encode(c.Text)...)
			if !slices.Equal(got, c.InputIDs) {
				t.Fatalf("Encode(%q)\n got %v\nwant %v", c.Text, got, c.InputIDs)
			}
			if dec, want := sp.Decode(c.InputIDs), spReference(c.Text); dec != want {
				t.Errorf("Decode = %q, want %q", dec, want)
			}
		})
	}
}

func TestSentencePieceNormalize(t *testing.T) {
	sp := tinyTokenizer(t)
	for _, c := range []struct{ in, want string }{
		{"", ""},
		{"   ", ""},
		{"a", "▁a"},
		{"  Two  spaces ", "▁Two▁spaces"},
		{"tab\there", "▁tab\there"},
		{"\ttab", "▁\ttab"},   // a tab is not a space: it stays
		{"a \t b", "▁a▁\t▁b"}, // nor does it join a run of spaces
		{"é🙂", "▁é🙂"},
		{"a▁", "▁a"},    // trailing U+2581 goes with the trailing strip, as in sentencepiece
		{"▁ a", "▁▁▁a"}, // a literal U+2581 does not start a run of spaces
		{"bad\xffbyte", "▁bad\uFFFDbyte"},
	} {
		if got := sp.normalize(c.in); got != c.want {
			t.Errorf("normalize(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

// spReference is what Decode(Encode(x)) must give for the tinystories tokenizer (identity
// rule, remove_extra_whitespaces, add_dummy_prefix, escape_whitespaces, byte fallback with
// all 256 bytes), written independently of the encoder:
//   - every invalid UTF-8 byte becomes U+FFFD (the normalizer's rule; Go's range loop);
//   - leading spaces (U+0020 only) are removed and runs of spaces collapse to one;
//   - trailing spaces and U+2581 are removed (sentencepiece strips the escaped text's
//     trailing U+2581, which includes literal ones);
//   - a literal U+2581 decodes as a space.
//
// Everything else round-trips exactly, including tabs, newlines, NUL and characters outside
// the vocabulary (through byte pieces).
func spReference(x string) string {
	var valid strings.Builder
	for _, r := range x {
		valid.WriteRune(r)
	}
	s := strings.TrimLeft(valid.String(), " ")
	var b strings.Builder
	prevSpace := false
	for _, r := range s {
		if r == ' ' && prevSpace {
			continue
		}
		prevSpace = r == ' '
		b.WriteRune(r)
	}
	s = strings.TrimRight(b.String(), " \u2581")
	return strings.ReplaceAll(s, "\u2581", " ")
}

func TestSentencePieceRoundTrip(t *testing.T) {
	sp := tinyTokenizer(t)
	for _, x := range spFuzzSeeds {
		if got, want := sp.Decode(sp.Encode(x)), spReference(x); got != want {
			t.Errorf("Decode(Encode(%q)) = %q, want %q", x, got, want)
		}
	}
	for _, x := range validLines(t) {
		if got, want := sp.Decode(sp.Encode(x)), spReference(x); got != want {
			t.Fatalf("Decode(Encode(%q)) = %q, want %q", x, got, want)
		}
	}
}

// naiveSPEncode is the O(n²) twin of SentencePiece.Encode for models without user-defined
// or unused pieces: rescan all adjacent pairs for the best merge after every merge.
func naiveSPEncode(sp *SentencePiece, text string) []int {
	norm := sp.normalize(text)
	var syms []string
	for _, r := range norm {
		syms = append(syms, string(r))
	}
	for {
		best, bestScore := -1, float32(math.Inf(-1))
		for i := 0; i+1 < len(syms); i++ {
			id, ok := sp.bpe.pieces[syms[i]+syms[i+1]]
			if ok && (best < 0 || sp.scores[id] > bestScore) {
				best, bestScore = i, sp.scores[id]
			}
		}
		if best < 0 {
			break
		}
		syms[best] += syms[best+1]
		syms = slices.Delete(syms, best+1, best+2)
	}
	ids := []int{}
	for _, s := range syms {
		if id, ok := sp.bpe.pieces[s]; ok {
			ids = append(ids, id)
			continue
		}
		for i := 0; i < len(s); i++ {
			ids = append(ids, sp.byteID[s[i]])
		}
	}
	return ids
}

// randomText draws strings from an alphabet that forms many pieces, with spaces, tabs,
// accents, emoji and invalid bytes.
func randomText(rng *rand.Rand) string {
	alphabet := []string{"a", "b", "e", "h", "t", "o", "n", "s", " ", " ", "  ", "the", "ing", "\t", "é", "🙂", "\xff", ".", "T", "▁", "\n", "0", "9"}
	var b strings.Builder
	for range rng.IntN(40) {
		b.WriteString(alphabet[rng.IntN(len(alphabet))])
	}
	return b.String()
}

func TestSentencePieceMatchesNaive(t *testing.T) {
	sp := tinyTokenizer(t)
	// The naive twin is quadratic: take the first 300 bytes of 100 stories.
	var texts []string
	for _, l := range validLines(t)[:100] {
		if len(l) > 300 {
			l = l[:300] // may cut a character: its bytes then go to byte fallback
		}
		texts = append(texts, l)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 2000 {
		texts = append(texts, randomText(rng))
	}
	texts = append(texts, spFuzzSeeds...)
	for _, x := range texts {
		got, want := sp.Encode(x), naiveSPEncode(sp, x)
		if !slices.Equal(got, want) {
			t.Fatalf("Encode(%q)\n got %v\nwant %v (naive)", x, got, want)
		}
	}
}

func TestSentencePieceInputUnchanged(t *testing.T) {
	sp := tinyTokenizer(t)
	ids := sp.Encode("Once upon a time")
	keep := slices.Clone(ids)
	_ = sp.Decode(ids)
	if !slices.Equal(ids, keep) {
		t.Fatal("Decode changed its input")
	}
}

func TestSentencePieceDecodeSpecial(t *testing.T) {
	sp := tinyTokenizer(t)
	a := sp.Encode("a")
	for _, c := range []struct {
		name string
		ids  []int
		want string
	}{
		{"empty", nil, ""},
		{"control", []int{1, a[0], 2}, "a"},
		{"out of range", []int{-1, a[0], 5000}, "a"},
		{"unknown", []int{a[0], 0}, "a \u2047 "},
		{"broken utf8", []int{sp.byteID[0xF0], sp.byteID[0x9F], sp.byteID['x']}, "\uFFFD\uFFFDx"},
		{"bytes then piece", []int{sp.byteID[0xC3], sp.byteID[0xA9], a[0]}, "é a"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := sp.Decode(c.ids); got != c.want {
				t.Errorf("Decode(%v) = %q, want %q", c.ids, got, c.want)
			}
		})
	}
}

// spModel builds a serialized ModelProto for tests.
type spModel struct {
	pieces       []spTestPiece
	modelType    uint64 // 0: omitted (UNIGRAM)
	byteFallback bool
	unk          int
	// normalizer; nil pointers are omitted (proto default true)
	name                           string
	charsmap                       []byte
	dummy, removeSpaces, escapeSps *bool
}

type spTestPiece struct {
	piece string
	score float32
	typ   uint64 // 0: omitted (NORMAL)
}

func (m spModel) bytes() []byte {
	var b []byte
	for _, p := range m.pieces {
		var pb []byte
		pb = protowire.AppendTag(pb, 1, protowire.BytesType)
		pb = protowire.AppendString(pb, p.piece)
		pb = protowire.AppendTag(pb, 2, protowire.Fixed32Type)
		pb = protowire.AppendFixed32(pb, math.Float32bits(p.score))
		if p.typ != 0 {
			pb = protowire.AppendTag(pb, 3, protowire.VarintType)
			pb = protowire.AppendVarint(pb, p.typ)
		}
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendBytes(b, pb)
	}
	var tb []byte
	if m.modelType != 0 {
		tb = protowire.AppendTag(tb, 3, protowire.VarintType)
		tb = protowire.AppendVarint(tb, m.modelType)
	}
	tb = protowire.AppendTag(tb, 4, protowire.VarintType) // vocab_size: ignored
	tb = protowire.AppendVarint(tb, uint64(len(m.pieces)))
	if m.byteFallback {
		tb = protowire.AppendTag(tb, 35, protowire.VarintType)
		tb = protowire.AppendVarint(tb, 1)
	}
	tb = protowire.AppendTag(tb, 40, protowire.VarintType)
	tb = protowire.AppendVarint(tb, uint64(m.unk))
	tb = protowire.AppendTag(tb, 43, protowire.VarintType) // pad_id = -1: a 10-byte varint
	tb = protowire.AppendVarint(tb, uint64(math.MaxUint64))
	b = protowire.AppendTag(b, 2, protowire.BytesType)
	b = protowire.AppendBytes(b, tb)

	var nb []byte
	if m.name != "" {
		nb = protowire.AppendTag(nb, 1, protowire.BytesType)
		nb = protowire.AppendString(nb, m.name)
	}
	if m.charsmap != nil {
		nb = protowire.AppendTag(nb, 2, protowire.BytesType)
		nb = protowire.AppendBytes(nb, m.charsmap)
	}
	for i, f := range []*bool{m.dummy, m.removeSpaces, m.escapeSps} {
		if f != nil {
			nb = protowire.AppendTag(nb, protowire.Number(3+i), protowire.VarintType)
			nb = protowire.AppendVarint(nb, protowire.EncodeBool(*f))
		}
	}
	b = protowire.AppendTag(b, 3, protowire.BytesType)
	b = protowire.AppendBytes(b, nb)
	b = protowire.AppendTag(b, 99, protowire.VarintType) // an unknown field: skipped
	b = protowire.AppendVarint(b, 7)
	return b
}

// smallSP is a model over a, b, c with an unused piece, a user-defined piece and byte
// fallback only when asked.
func smallSP(t *testing.T, byteFallback bool) *SentencePiece {
	t.Helper()
	m := spModel{modelType: spModelBPE, byteFallback: byteFallback, pieces: []spTestPiece{
		{"<unk>", 0, spUnknown},
		{"<s>", 0, spControl},
		{"</s>", 0, spControl},
		{"▁", -1, 0},
		{"a", -2, 0},
		{"b", -3, 0},
		{"c", -4, 0},
		{"ab", -5, 0},
		{"▁ab", -6, 0},
		{"bc", -5, 0},        // ties "ab": the leftmost pair wins
		{"cc", -1, spUnused}, // merged, then split back
		{"▁cc", -0.5, 0},
		{"<X>", 0, spUserDefined},
		{"X", -9, 0},
		{"<s", -8, 0}, // "<s>" in text never becomes the control piece
	}}
	if byteFallback {
		for i := range 256 {
			m.pieces = append(m.pieces, spTestPiece{piece: "<0x" + strings.ToUpper(hex2(byte(i))) + ">", typ: spByte})
		}
	}
	sp, err := parseSentencePiece(m.bytes())
	if err != nil {
		t.Fatal(err)
	}
	return sp
}

func hex2(b byte) string {
	const digits = "0123456789abcdef"
	return string([]byte{digits[b>>4], digits[b&15]})
}

func TestSentencePieceSynthetic(t *testing.T) {
	withBytes, noBytes := smallSP(t, true), smallSP(t, false)
	byteID := func(b byte) int { return withBytes.byteID[b] }
	for _, c := range []struct {
		name string
		sp   *SentencePiece
		text string
		want []int
	}{
		{"merge", noBytes, "ab", []int{8}},
		{"tie leftmost", noBytes, "abc", []int{8, 6}},
		{"tie leftmost inner", noBytes, "cabc", []int{3, 6, 7, 6}},
		{"unused resegmented", noBytes, "acc", []int{3, 4, 6, 6}},
		{"unused under a used piece", noBytes, "cc", []int{11}},
		{"user defined whole", noBytes, "a<X>b", []int{3, 4, 12, 5}},
		{"user defined alone", noBytes, "<X>", []int{3, 12}},
		{"control never matched", noBytes, "<s>", []int{3, 14, 0}},
		{"unknown without fallback", noBytes, "aé", []int{3, 4, 0}},
		{"byte fallback", withBytes, "aé", []int{3, 4, byteID(0xC3), byteID(0xA9)}},
		{"unknown char is one unk", noBytes, "🙂", []int{3, 0}},
		{"empty", noBytes, "", []int{}},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := c.sp.Encode(c.text); !slices.Equal(got, c.want) {
				t.Errorf("Encode(%q) = %v, want %v", c.text, got, c.want)
			}
		})
	}
	if got := withBytes.Decode(withBytes.Encode("a<X>bé cc")); got != "a<X>bé cc" {
		t.Errorf("round trip = %q", got)
	}
}

func TestSentencePieceNormalizerFlags(t *testing.T) {
	f, tr := false, true
	base := []spTestPiece{{"<unk>", 0, spUnknown}, {"a", -1, 0}, {" ", -1, 0}, {"▁", -1, 0}}
	for _, c := range []struct {
		name                  string
		dummy, remove, escape *bool
		text, norm, roundTrip string
	}{
		{"defaults", nil, nil, nil, " a  a ", "▁a▁a", "a a"},
		{"no dummy prefix", &f, nil, nil, "a a", "a▁a", "a a"},
		{"keep spaces", nil, &f, nil, " a  a ", "▁▁a▁▁a▁", " a  a "},
		{"no escape", nil, nil, &f, "a  a", " a a", "a a"},
		{"explicit true", &tr, &tr, &tr, "a", "▁a", "a"},
	} {
		t.Run(c.name, func(t *testing.T) {
			m := spModel{modelType: spModelBPE, pieces: base, dummy: c.dummy, removeSpaces: c.remove, escapeSps: c.escape}
			sp, err := parseSentencePiece(m.bytes())
			if err != nil {
				t.Fatal(err)
			}
			if got := sp.normalize(c.text); got != c.norm {
				t.Errorf("normalize(%q) = %q, want %q", c.text, got, c.norm)
			}
			if got := sp.Decode(sp.Encode(c.text)); got != c.roundTrip {
				t.Errorf("round trip of %q = %q, want %q", c.text, got, c.roundTrip)
			}
		})
	}
}

func TestSentencePieceErrors(t *testing.T) {
	good := spModel{modelType: spModelBPE, pieces: []spTestPiece{{"<unk>", 0, spUnknown}, {"<s>", 0, spControl}, {"</s>", 0, spControl}, {"a", 0, 0}}}
	bad := func(f func(m *spModel)) []byte {
		m := good
		m.pieces = slices.Clone(good.pieces)
		f(&m)
		return m.bytes()
	}
	valid := good.bytes()
	for _, c := range []struct {
		name string
		b    []byte
	}{
		{"unigram (default model type)", bad(func(m *spModel) { m.modelType = 0 })},
		{"word model", bad(func(m *spModel) { m.modelType = 3 })},
		{"nfkc charsmap", bad(func(m *spModel) { m.name, m.charsmap = "nmt_nfkc", []byte{1, 2, 3, 4, 5} })},
		{"named rule", bad(func(m *spModel) { m.name = "nfkc" })},
		{"no pieces", bad(func(m *spModel) { m.pieces = nil })},
		{"unk not unknown", bad(func(m *spModel) { m.unk = 3 })},
		{"bos out of range", bad(func(m *spModel) { m.pieces = m.pieces[:1] })},
		{"empty piece", bad(func(m *spModel) { m.pieces = append(m.pieces, spTestPiece{"", 0, 0}) })},
		{"duplicate piece", bad(func(m *spModel) { m.pieces = append(m.pieces, spTestPiece{"a", 0, 0}) })},
		{"byte without fallback", bad(func(m *spModel) { m.pieces = append(m.pieces, spTestPiece{"<0x41>", 0, spByte}) })},
		{"bad byte piece", bad(func(m *spModel) {
			m.byteFallback = true
			m.pieces = append(m.pieces, spTestPiece{"<0xZZ>", 0, spByte})
		})},
		{"bad piece type", bad(func(m *spModel) { m.pieces = append(m.pieces, spTestPiece{"q", 0, 9}) })},
		{"truncated", valid[:len(valid)-4]}, // inside normalizer_spec
		{"garbage", []byte{0xff, 0xff, 0xff}},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := parseSentencePiece(c.b)
			if !errors.Is(err, ErrTokenizer) {
				t.Fatalf("err = %v, want ErrTokenizer", err)
			}
			t.Log(err)
		})
	}
	if _, err := parseSentencePiece(valid); err != nil {
		t.Fatalf("valid model: %v", err)
	}
	if _, err := LoadSentencePiece(filepath.Join(t.TempDir(), "missing.model")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("missing file: err = %v", err)
	}
}

// spFuzzSeeds are seeds for FuzzSentencePiece and inputs for the round-trip tests.
var spFuzzSeeds = []string{
	"", " ", "   ", "a", "Once upon a time, there was a little girl named Lily.",
	"  Two  spaces, tabs\tand émojis 🙂 — 4096 tokens?",
	"Tom and Sue went to the park. They saw a big red ball! Mom said: \"Be careful.\" 123 café",
	"\t", " \t ", "a\x00b", "\xff\xfe", "\xe2\x96", "▁", "▁▁ ▁", "a▁", " ▁a", "a ▁ b",
	"<s></s><unk><0x41>", "\r\n", "日本語のテキスト", "\U0010FFFF", "\uFFFD", "x  ",
}

// FuzzSentencePiece checks that Encode never panics, returns ids in range and never control
// or unknown ids (the model has byte fallback for all 256 bytes), and that
// Decode(Encode(x)) == spReference(x): see spReference for what round-trips exactly.
func FuzzSentencePiece(f *testing.F) {
	sp := tinyTokenizer(f)
	for _, s := range spFuzzSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, x string) {
		ids := sp.Encode(x)
		for _, id := range ids {
			if id < 0 || id >= sp.VocabSize() || sp.types[id] == spControl || sp.types[id] == spUnknown {
				t.Fatalf("Encode(%q) = %v: bad id %d", x, ids, id)
			}
		}
		got := sp.Decode(ids)
		if want := spReference(x); got != want {
			t.Fatalf("Decode(Encode(%q)) = %q, want %q", x, got, want)
		}
		if !utf8.ValidString(got) {
			t.Fatalf("Decode gave invalid UTF-8 %q", got)
		}
	})
}

func BenchmarkEncodeValid(b *testing.B) {
	sp := tinyTokenizer(b)
	lines := validLines(b)
	bytes := 0
	for _, l := range lines {
		bytes += len(l)
	}
	b.SetBytes(int64(bytes))
	b.ReportAllocs()
	for b.Loop() {
		n := 0
		for _, l := range lines {
			n += len(sp.Encode(l))
		}
		if n == 0 {
			b.Fatal("no tokens")
		}
	}
}
