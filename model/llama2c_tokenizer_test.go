package model

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// llama2cTokBytes serializes a llama2.c tokenizer.bin.
func llama2cTokBytes(pieces []string, scores []float32) []byte {
	maxLen := 0
	for _, p := range pieces {
		maxLen = max(maxLen, len(p))
	}
	b := binary.LittleEndian.AppendUint32(nil, uint32(maxLen))
	for i, p := range pieces {
		b = binary.LittleEndian.AppendUint32(b, math.Float32bits(scores[i]))
		b = binary.LittleEndian.AppendUint32(b, uint32(len(p)))
		b = append(b, p...)
	}
	return b
}

func writeLlama2cTok(t *testing.T, dir string, pieces []string, scores []float32) string {
	t.Helper()
	path := filepath.Join(dir, "tokenizer.bin")
	if err := os.WriteFile(path, llama2cTokBytes(pieces, scores), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// smallLlama2cVocab is <unk>, BOS, EOS, the 256 byte pieces, then extra.
func smallLlama2cVocab(extra ...any) ([]string, []float32) {
	pieces := []string{"<unk>", "\n<s>\n", "\n</s>\n"}
	for b := range 256 {
		pieces = append(pieces, fmt.Sprintf("<0x%02X>", b))
	}
	scores := make([]float32, len(pieces))
	for i := 0; i < len(extra); i += 2 {
		pieces = append(pieces, extra[i].(string))
		scores = append(scores, extra[i+1].(float32))
	}
	return pieces, scores
}

func TestLlama2cTokenizerEncode(t *testing.T) {
	pieces, scores := smallLlama2cVocab(
		" ", float32(-1), // 259
		"a", float32(-1), // 260
		"b", float32(-1), // 261
		"ab", float32(-2), // 262
		" ab", float32(-3), // 263
		"é", float32(-1), // 264
		"ba", float32(-2), // 265
		"z", float32(-1), // 266
		"zz", float32(-1e11), // 267: at or below -1e10, never merged (run.c's best_score start)
	)
	tok, err := LoadLlama2cTokenizer(writeLlama2cTok(t, t.TempDir(), pieces, scores), len(pieces))
	if err != nil {
		t.Fatal(err)
	}
	if tok.VocabSize() != len(pieces) || tok.BOS() != 1 || tok.EOS() != 2 {
		t.Fatalf("vocab %d bos %d eos %d", tok.VocabSize(), tok.BOS(), tok.EOS())
	}
	for _, c := range []struct {
		name, text string
		want       []int
	}{
		{"empty", "", []int{}},
		{"merge twice", "ab", []int{263}},
		{"tie leftmost", "aba", []int{263, 260}},
		{"byte fallback", "é🙂", []int{259, 264, 0xF0 + 3, 0x9F + 3, 0x99 + 3, 0x82 + 3}},
		{"leading space kept", " ab", []int{259, 263}},
		{"score floor", "zz", []int{259, 266, 266}},
		{"stray continuation bytes", "\x80\x80\x80\x80\x80a", []int{259, 131, 131, 131, 131, 131, 260}},
		{"nul is a byte", "a\x00", []int{259, 260, 3}},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := tok.Encode(c.text)
			if !slices.Equal(got, c.want) {
				t.Fatalf("Encode(%q) = %v, want %v", c.text, got, c.want)
			}
			if dec := tok.Decode(append([]int{tok.BOS()}, append(got, tok.EOS())...)); dec != c.text {
				t.Errorf("Decode = %q, want %q", dec, c.text)
			}
		})
	}
}

// TestLlama2cMatchesSentencePiece exports the tinystories tokenizer as llama2.c's
// tokenizer.py does and checks that both encoders agree on the stories (single-spaced text,
// where sentencepiece's whitespace normalization does nothing) and that llama2.c's
// decoding round-trips them exactly.
func TestLlama2cMatchesSentencePiece(t *testing.T) {
	sp := tinyTokenizer(t)
	pieces := make([]string, sp.VocabSize())
	for i := range pieces {
		p := sp.Piece(i)
		switch i {
		case sp.BOS():
			p = "\n<s>\n"
		case sp.EOS():
			p = "\n</s>\n"
		}
		pieces[i] = strings.ReplaceAll(p, "\u2581", " ")
	}
	tok, err := LoadLlama2cTokenizer(writeLlama2cTok(t, t.TempDir(), pieces, sp.scores), len(pieces))
	if err != nil {
		t.Fatal(err)
	}
	texts := append(validLines(t), "  Two  spaces, tabs\tand émojis 🙂 — 4096 tokens?"[2:])
	for _, x := range texts {
		if strings.Contains(x, "  ") || strings.TrimSpace(x) != x {
			continue
		}
		got, want := tok.Encode(x), sp.Encode(x)
		if !slices.Equal(got, want) {
			t.Fatalf("Encode(%q)\n got %v\nwant %v (sentencepiece)", x, got, want)
		}
		if dec := tok.Decode(got); dec != x {
			t.Fatalf("Decode(Encode(%q)) = %q", x, dec)
		}
	}
}

func TestLlama2cTokenizerErrors(t *testing.T) {
	pieces, scores := smallLlama2cVocab(" ", float32(-1))
	full := llama2cTokBytes(pieces, scores)
	negLen := slices.Clone(full)
	binary.LittleEndian.PutUint32(negLen[4+4:], uint32(0xFFFFFFFF)) // piece 0's length: -1
	for _, c := range []struct {
		name  string
		b     []byte
		vocab int
	}{
		{"empty", nil, len(pieces)},
		{"truncated piece", full[:len(full)-1], len(pieces)},
		{"truncated in a piece header", full[:len(full)-6], len(pieces)},
		{"vocab larger than file", full, len(pieces) + 1},
		{"negative length", negLen, len(pieces)},
		{"vocab too small", full, 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := parseLlama2cTokenizer(c.b, c.vocab)
			if !errors.Is(err, ErrTokenizer) {
				t.Fatalf("err = %v, want ErrTokenizer", err)
			}
		})
	}
	// Fewer pieces than the file holds is what run.c reads.
	if tok, err := parseLlama2cTokenizer(full, 100); err != nil || tok.VocabSize() != 100 {
		t.Fatalf("prefix of the vocabulary: %v", err)
	}
	if _, err := LoadLlama2cTokenizer(filepath.Join(t.TempDir(), "none.bin"), 10); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("missing file: err = %v", err)
	}
}

// TestLlama2cTokenizerNoSpacePiece: without a " " piece run.c would emit id -1; we skip the prefix.
func TestLlama2cTokenizerNoSpacePiece(t *testing.T) {
	pieces, scores := smallLlama2cVocab("a", float32(-1))
	tok, err := parseLlama2cTokenizer(llama2cTokBytes(pieces, scores), len(pieces))
	if err != nil {
		t.Fatal(err)
	}
	if got := tok.Encode("a"); !slices.Equal(got, []int{259}) {
		t.Fatalf("Encode = %v", got)
	}
	// A vocabulary too small for byte fallback spells missing bytes as <unk>.
	tok, err = parseLlama2cTokenizer(llama2cTokBytes(pieces[:10], scores[:10]), 10)
	if err != nil {
		t.Fatal(err)
	}
	if got := tok.Encode("\x05\xff"); !slices.Equal(got, []int{8, 0}) {
		t.Fatalf("Encode = %v, want [8 0]", got)
	}
}
