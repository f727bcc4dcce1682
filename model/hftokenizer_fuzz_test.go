package model

import (
	"slices"
	"strings"
	"testing"
	"unicode/utf8"
)

var hfFuzzTexts = []string{
	"", " ", "hello world", "I'M here, they'LL go", "  \t\n\r\n  x", "<|begin_of_text|>a<|end_of_text|>",
	"<s> </s><unk>", "日本語 ไทย 👨‍👩‍👧 🇫🇷", "\xff\xfe invalid \xc3", "e\u0301 ñ", "12345678901", "a\u00a0b\u3000c",
}

// FuzzHFTokenizerEncode encodes arbitrary text with the three real tokenizers: never a
// panic, every id in range, LLaMA-3 (no normalizer) decodes back to the text, the
// hand-written split matcher agrees with regexp2, and Mistral's chunked merge with the
// whole-line one.
func FuzzHFTokenizerEncode(f *testing.F) {
	toks := map[string]*HFTokenizer{}
	for _, name := range hfGoldenNames {
		toks[name] = loadSharedHF(f, name)
	}
	for _, s := range hfFuzzTexts {
		f.Add(s)
	}
	re, err := compileHFRegex("fuzz", llama3SplitPattern)
	if err != nil {
		f.Fatal(err)
	}
	slow := hfSplitPre{re: re, behavior: hfIsolated}
	fast := fastSplitFor(llama3SplitPattern)
	whole := *toks["mistral"] // merges a line without cutting it
	whole.chunkBytes = 1 << 30
	whole.cache = new(hfWordCache)
	f.Fuzz(func(t *testing.T, x string) {
		if got, want := toks["mistral"].Encode(x), whole.Encode(x); !slices.Equal(got, want) {
			t.Fatalf("mistral: chunked Encode(%q) = %v, whole %v", x, got, want)
		}
		if v := string([]rune(x)); !slices.Equal(fast.matches(v), slow.matches(v)) {
			t.Fatalf("split of %q: hand-written %v, regexp2 %v", v, fast.matches(v), slow.matches(v))
		}
		for name, tok := range toks {
			ids := tok.Encode(x)
			for _, id := range ids {
				if id < 0 || id >= tok.VocabSize() {
					t.Fatalf("%s: Encode(%q) = %v: id %d out of range", name, x, ids, id)
				}
			}
			got := tok.Decode(ids)
			if !utf8.ValidString(got) {
				t.Fatalf("%s: Decode gave invalid UTF-8 %q", name, got)
			}
			if name == "llama3" && utf8.ValidString(x) && !strings.Contains(x, "<|") && got != x {
				t.Fatalf("llama3: Decode(Encode(%q)) = %q", x, got)
			}
		}
	})
}

// FuzzHFTokenizerJSON parses arbitrary tokenizer.json bytes (seeded with valid small files)
// and encodes text with whatever parses: never a panic, ids in range.
func FuzzHFTokenizerJSON(f *testing.F) {
	f.Add(tinyHF(nil), "abc a<s>")
	f.Add(tinyHF(map[string]any{"model": map[string]any{"merges": [][]string{{"a", "b"}}}, "normalizer": nil,
		"pre_tokenizer": map[string]any{"type": "Sequence", "pretokenizers": []any{
			map[string]any{"type": "Split", "pattern": map[string]any{"Regex": `\s+(?!\S)|\s+|\p{L}+`}, "behavior": "Isolated"},
			map[string]any{"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}}}}), "ab  c")
	f.Add(tinyHF(map[string]any{"normalizer": map[string]any{"type": "NFC"},
		"pre_tokenizer": map[string]any{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"}}), "a b")
	f.Add(tinyHF(map[string]any{"added_tokens": []map[string]any{{"id": 1, "content": "<s>", "lstrip": true, "rstrip": true, "single_word": true, "normalized": true}}}), " <s> a")
	f.Add([]byte(`{"model":{"type":"BPE","vocab":{"a":0},"merges":[]},"post_processor":null}`), "aaa")
	f.Fuzz(func(t *testing.T, b []byte, text string) {
		tok, err := ParseHFTokenizer(b, nil, []byte(`{"bos_token_id": 0}`))
		if err != nil {
			return
		}
		if d := tok.DocumentStart(); d < 0 || d >= tok.VocabSize() {
			t.Fatalf("DocumentStart %d outside [0,%d)", d, tok.VocabSize())
		}
		for _, id := range tok.Encode(text) {
			if id < 0 || id >= tok.VocabSize() {
				t.Fatalf("Encode(%q): id %d out of range [0,%d)", text, id, tok.VocabSize())
			}
		}
		tok.Decode([]int{-1, 0, tok.VocabSize()})
	})
}
