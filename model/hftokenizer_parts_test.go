package model

import (
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/text/unicode/norm"
)

func mustHF(t *testing.T, b []byte) *HFTokenizer {
	t.Helper()
	tok, err := ParseHFTokenizer(b, nil, []byte(`{"bos_token_id": 1}`))
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// TestHFTokenizerModelOptions covers BPE options the golden tokenizers do not all show:
// fuse_unk, byte fallback with and without byte pieces, ignore_merges, both merge forms.
func TestHFTokenizerModelOptions(t *testing.T) {
	withBytes := map[string]int{"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "c": 5, "ab": 6, "abc": 7, "▁": 8, "▁a": 9,
		"<0xC3>": 10, "<0xA9>": 11}
	cases := []struct {
		name string
		over map[string]any
		text string
		want []int
	}{
		{"merges as strings", nil, "abc", []int{8, 7}},
		{"merges as pairs", map[string]any{"model": map[string]any{"merges": [][]string{{"a", "b"}, {"ab", "c"}, {"▁", "a"}}}}, "abc", []int{8, 7}},
		{"merge order by rank", map[string]any{"model": map[string]any{"merges": []string{"▁ a", "a b", "ab c"}}}, "abc", []int{9, 4, 5}},
		{"fuse_unk", nil, "aéé日b", []int{9, 0, 4}},
		{"no fuse_unk", map[string]any{"model": map[string]any{"fuse_unk": false}}, "aéé日b", []int{9, 0, 0, 0, 4}},
		{"byte fallback", map[string]any{"model": map[string]any{"vocab": withBytes}}, "aé日b", []int{9, 10, 11, 0, 4}},
		{"no unk: dropped, nothing merges across it", map[string]any{"model": map[string]any{"unk_token": nil}}, "a日b", []int{9, 4}},
		{"ignore_merges takes a whole word", map[string]any{"model": map[string]any{"ignore_merges": true, "merges": []string{}},
			"normalizer": nil}, "abc", []int{7}},
		{"without ignore_merges, merges only", map[string]any{"model": map[string]any{"merges": []string{}}, "normalizer": nil}, "abc", []int{3, 4, 5}},
		{"empty text", nil, "", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := mustHF(t, tinyHF(c.over)).Encode(c.text)
			if !slices.Equal(got, c.want) {
				t.Errorf("Encode(%q) = %v, want %v", c.text, got, c.want)
			}
		})
	}
}

// TestHFAddedTokenFlags: added tokens are found in the raw text (normalized=false) or the
// normalized text (normalized=true); lstrip/rstrip take the spaces beside them; a
// single_word token is not matched inside a word.
func TestHFAddedTokenFlags(t *testing.T) {
	added := func(extra map[string]any) map[string]any {
		tok := map[string]any{"id": 10, "content": "<x>", "special": true}
		for k, v := range extra {
			tok[k] = v
		}
		return map[string]any{"added_tokens": []map[string]any{
			{"id": 1, "content": "<s>", "special": true}, tok}}
	}
	plain := map[string]any{"normalizer": nil, "model": map[string]any{"vocab": map[string]int{"<unk>": 0, "<s>": 1, "a": 3, " ": 8}, "merges": []string{}}}
	cases := []struct {
		name  string
		extra map[string]any
		text  string
		want  []int
	}{
		{"plain", nil, "a <x> a", []int{3, 8, 10, 8, 3}},
		{"special token text at the start", nil, "<s>a", []int{1, 3}},
		{"lstrip", map[string]any{"lstrip": true}, "a  <x> a", []int{3, 10, 8, 3}},
		{"rstrip", map[string]any{"rstrip": true}, "a <x>  a", []int{3, 8, 10, 3}},
		{"single_word inside a word", map[string]any{"single_word": true}, "a<x>a", []int{3, 0, 3}}, // <x> spelled by fused unks
		{"single_word alone", map[string]any{"single_word": true}, "a <x> a", []int{3, 8, 10, 8, 3}},
		{"longest match", nil, "<x><s>", []int{10, 1}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			over := added(c.extra)
			for k, v := range plain {
				over[k] = v
			}
			got := mustHF(t, tinyHF(over)).Encode(c.text)
			if !slices.Equal(got, c.want) {
				t.Errorf("Encode(%q) = %v, want %v", c.text, got, c.want)
			}
		})
	}
	// normalized=true: matched after the normalizer (here Replace "X" → "x").
	over := added(map[string]any{"normalized": true, "special": false})
	over["normalizer"] = map[string]any{"type": "Replace", "pattern": map[string]any{"String": "X"}, "content": "x"}
	over["model"] = plain["model"]
	tok := mustHF(t, tinyHF(over))
	if got, want := tok.Encode("a<X>"), []int{3, 10}; !slices.Equal(got, want) {
		t.Errorf("normalized token: Encode = %v, want %v", got, want)
	}
	if got := tok.Decode([]int{3, 10, 1}); got != "a<x>" {
		t.Errorf("Decode = %q (a non-special added token decodes to its content, a special one to nothing)", got)
	}
}

// TestHFNormalizers covers normalizers the golden tokenizers do not use.
func TestHFNormalizers(t *testing.T) {
	cases := []struct {
		json, in, want string
	}{
		{`{"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": "$1 "}`, "a \t b", "a$1 b"},
		{`{"type": "Replace", "pattern": {"String": "ab"}, "content": "x"}`, "abcab", "xcx"},
		{`{"type": "NFKC"}`, "ﬁ①", "fi1"},
		{`{"type": "NFD"}`, "é", "e\u0301"},
		{`{"type": "Lowercase"}`, "AbC", "abc"},
		{`{"type": "Strip", "left": true, "right": false}`, "  a  ", "a  "},
		{`{"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "_"}, {"type": "Strip", "left": false, "right": true}]}`, "a ", "_a"},
		{`{"type": "Prepend", "prepend": "_"}`, "", ""},
	}
	for _, c := range cases {
		n, err := parseHFNormalizer([]byte(c.json))
		if err != nil {
			t.Fatalf("%s: %v", c.json, err)
		}
		in, _ := strconv.Unquote(`"` + c.in + `"`)
		want, _ := strconv.Unquote(`"` + c.want + `"`)
		if got := n.normalize(in); got != want {
			t.Errorf("%s on %q: %q, want %q", c.json, in, got, want)
		}
	}
}

// TestHFSplitBehaviors checks each SplitDelimiterBehavior on tokenizers' documented example.
func TestHFSplitBehaviors(t *testing.T) {
	const s = "the-final--countdown"
	cases := []struct {
		b    hfSplitBehavior
		want string
	}{
		{hfRemoved, "the|final|countdown"},
		{hfIsolated, "the|-|final|-|-|countdown"},
		{hfMergedWithPrevious, "the-|final-|-|countdown"},
		{hfMergedWithNext, "the|-final|-|-countdown"},
		{hfContiguous, "the|-|final|--|countdown"},
	}
	for _, c := range cases {
		p := hfSplitPre{literal: "-", behavior: c.b}
		if got := strings.Join(p.split([]string{s}, true), "|"); got != c.want {
			t.Errorf("behavior %d: %s, want %s", c.b, got, c.want)
		}
	}
	inv := hfSplitPre{literal: "-", behavior: hfRemoved, invert: true}
	if got := strings.Join(inv.split([]string{s}, true), "|"); got != "-|-|-" {
		t.Errorf("invert removed: %s", got)
	}
	re, err := compileHFRegex("test", `\s+(?!\S)|\s+`)
	if err != nil {
		t.Fatal(err)
	}
	// The look-ahead leaves the last space of a run for the next word.
	p := hfSplitPre{re: re, behavior: hfIsolated}
	if got := strings.Join(p.split([]string{"a   b"}, true), "|"); got != "a|  | |b" {
		t.Errorf("look-ahead split: %q", got)
	}
}

// TestHFMetaspaceMatchesNormalizer: Mistral's tokenizer.json rewritten the way newer
// LLaMA-2 files are (no normalizer, a Metaspace pre-tokenizer with prepend_scheme "first"
// and split false) encodes every golden line without an added token or a leading space as
// the original.
func TestHFMetaspaceMatchesNormalizer(t *testing.T) {
	orig := loadSharedHF(t, "mistral")
	meta := *orig
	meta.cache = new(hfWordCache)
	meta.norm = nil
	pre, err := parseHFPreTokenizer([]byte(`{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false}`))
	if err != nil {
		t.Fatal(err)
	}
	meta.pre = pre
	n := 0
	for _, g := range readHFGolden(t, "mistral") {
		if strings.Contains(g.Text, "<s>") || strings.Contains(g.Text, "</s>") || strings.Contains(g.Text, "<unk>") {
			continue
		}
		if strings.HasPrefix(g.Text, " ") {
			continue // Metaspace prepends no ▁ to a text starting with one; Prepend does
		}
		n++
		if got, want := meta.Encode(g.Text), orig.Encode(g.Text); !slices.Equal(got, want) {
			t.Errorf("%q: Metaspace %v, normalizer %v", g.Text, got, want)
		}
	}
	if n < 100 {
		t.Fatalf("only %d lines compared", n)
	}
}

// TestHFDecodeRoundTrip: Decode(Encode(text)) gives the text back for the golden lines
// (byte-level tokenizers exactly; Mistral's up to its spaces around special tokens).
func TestHFDecodeRoundTrip(t *testing.T) {
	for _, name := range []string{"llama3", "qwen3"} {
		tok := loadSharedHF(t, name)
		for _, g := range readHFGolden(t, name) {
			if strings.Contains(g.Text, "<|") {
				continue // special tokens decode to nothing
			}
			text := g.Text
			if name == "qwen3" {
				text = norm.NFC.String(text)
			}
			if got := tok.Decode(tok.Encode(g.Text)); got != text {
				t.Errorf("%s: Decode(Encode(%q)) = %q", name, g.Text, got)
			}
		}
	}
	tok := loadSharedHF(t, "mistral")
	for _, g := range readHFGolden(t, "mistral") {
		if strings.Contains(g.Text, "<") {
			continue
		}
		if got := tok.Decode(tok.Encode(g.Text)); got != g.Text {
			t.Errorf("mistral: Decode(Encode(%q)) = %q", g.Text, got)
		}
	}
}
