package model

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// tinyHF is a small SentencePiece-style tokenizer.json: pieces a, b, c, ab, abc, ▁, ▁a,
// <unk> 0, <s> 1, </s> 2, and parts that tests replace.
func tinyHF(over map[string]any) []byte {
	vocab := map[string]int{"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "c": 5, "ab": 6, "abc": 7, "▁": 8, "▁a": 9}
	f := map[string]any{
		"version": "1.0",
		"added_tokens": []map[string]any{
			{"id": 0, "content": "<unk>", "special": true},
			{"id": 1, "content": "<s>", "special": true},
			{"id": 2, "content": "</s>", "special": true},
		},
		"normalizer": map[string]any{"type": "Sequence", "normalizers": []any{
			map[string]any{"type": "Prepend", "prepend": "▁"},
			map[string]any{"type": "Replace", "pattern": map[string]any{"String": " "}, "content": "▁"},
		}},
		"pre_tokenizer": nil,
		"model": map[string]any{"type": "BPE", "vocab": vocab, "merges": []string{"a b", "ab c", "▁ a"},
			"unk_token": "<unk>", "fuse_unk": true, "byte_fallback": true},
		"post_processor": map[string]any{"type": "TemplateProcessing",
			"single":         []any{map[string]any{"SpecialToken": map[string]any{"id": "<s>", "type_id": 0}}, map[string]any{"Sequence": map[string]any{"id": "A", "type_id": 0}}},
			"special_tokens": map[string]any{"<s>": map[string]any{"id": "<s>", "ids": []int{1}, "tokens": []string{"<s>"}}}},
		"decoder": nil,
	}
	for k, v := range over {
		if k == "model" {
			m := f["model"].(map[string]any)
			for mk, mv := range v.(map[string]any) {
				m[mk] = mv
			}
			continue
		}
		f[k] = v
	}
	b, err := json.Marshal(f)
	if err != nil {
		panic(err)
	}
	return b
}

// TestHFTokenizerBadInput: unsupported or malformed parts are refused naming the part.
func TestHFTokenizerBadInput(t *testing.T) {
	cfg := []byte(`{"vocab_size": 10, "bos_token_id": 1}`)
	noBOS := map[string]any{"post_processor": map[string]any{"type": "ByteLevel"}}
	cases := []struct {
		name     string
		tok      []byte
		modelCfg []byte
		want     []string
		tokCfg   []byte
	}{
		{"add_eos_token", tinyHF(nil), cfg, []string{"tokenizer_config.json", "add_eos_token"}, []byte(`{"add_eos_token": true}`)},
		{"bos_token not a token", tinyHF(nil), cfg, []string{"tokenizer_config.json", "bos_token", "<bos>"}, []byte(`{"bos_token": "<bos>"}`)},
		{"bos_token malformed", tinyHF(nil), cfg, []string{"tokenizer_config.json", "bos_token"}, []byte(`{"bos_token": 7}`)},
		{"tokenizer_config malformed", tinyHF(nil), cfg, []string{"tokenizer_config.json"}, []byte(`{`)},
		{"malformed json", []byte(`{"model": `), cfg, []string{"tokenizer.json"}, nil},
		{"no model", []byte(`{"added_tokens": []}`), cfg, []string{"no model"}, nil},
		{"WordPiece", tinyHF(map[string]any{"model": map[string]any{"type": "WordPiece"}}), cfg, []string{"WordPiece"}, nil},
		{"Unigram", tinyHF(map[string]any{"model": map[string]any{"type": "Unigram"}}), cfg, []string{"Unigram"}, nil},
		{"dropout", tinyHF(map[string]any{"model": map[string]any{"dropout": 0.1}}), cfg, []string{"dropout"}, nil},
		{"subword prefix", tinyHF(map[string]any{"model": map[string]any{"continuing_subword_prefix": "##"}}), cfg, []string{"continuing_subword_prefix"}, nil},
		{"merge of unknown piece", tinyHF(map[string]any{"model": map[string]any{"merges": []string{"x y"}}}), cfg, []string{"merge 0", "not in the vocabulary"}, nil},
		{"merge without space", tinyHF(map[string]any{"model": map[string]any{"merges": []string{"ab"}}}), cfg, []string{"merge 0"}, nil},
		{"merge triple", tinyHF(map[string]any{"model": map[string]any{"merges": [][]string{{"a", "b", "c"}}}}), cfg, []string{"merge 0"}, nil},
		{"unk not in vocab", tinyHF(map[string]any{"model": map[string]any{"unk_token": "<nope>"}}), cfg, []string{"unk_token"}, nil},
		{"negative id", tinyHF(map[string]any{"model": map[string]any{"vocab": map[string]int{"a": -1}, "merges": []string{}}}), cfg, []string{"out of range"}, nil},
		{"huge id", tinyHF(map[string]any{"model": map[string]any{"vocab": map[string]int{"a": 1 << 30}, "merges": []string{}}}), cfg, []string{"out of range"}, nil},
		{"normalizer BertNormalizer", tinyHF(map[string]any{"normalizer": map[string]any{"type": "BertNormalizer"}}), cfg, []string{"normalizer", "BertNormalizer"}, nil},
		{"normalizer Precompiled in a Sequence", tinyHF(map[string]any{"normalizer": map[string]any{"type": "Sequence", "normalizers": []any{map[string]any{"type": "Precompiled"}}}}), cfg, []string{"normalizer", "Precompiled"}, nil},
		{"pre-tokenizer BertPreTokenizer", tinyHF(map[string]any{"pre_tokenizer": map[string]any{"type": "BertPreTokenizer"}}), cfg, []string{"pre_tokenizer", "BertPreTokenizer"}, nil},
		{"pre-tokenizer in a Sequence", tinyHF(map[string]any{"pre_tokenizer": map[string]any{"type": "Sequence", "pretokenizers": []any{map[string]any{"type": "UnicodeScripts"}}}}), cfg, []string{"pre_tokenizer", "UnicodeScripts"}, nil},
		{"bad regex", tinyHF(map[string]any{"pre_tokenizer": map[string]any{"type": "Split", "pattern": map[string]any{"Regex": "(a"}, "behavior": "Isolated"}}), cfg, []string{"Split", "regex"}, nil},
		{"split behavior", tinyHF(map[string]any{"pre_tokenizer": map[string]any{"type": "Split", "pattern": map[string]any{"String": "a"}, "behavior": "Sideways"}}), cfg, []string{"Split", "Sideways"}, nil},
		{"post-processor BertProcessing", tinyHF(map[string]any{"post_processor": map[string]any{"type": "BertProcessing"}}), cfg, []string{"post_processor", "BertProcessing"}, nil},
		{"template adds EOS", tinyHF(map[string]any{"post_processor": map[string]any{"type": "TemplateProcessing",
			"single":         []any{map[string]any{"Sequence": map[string]any{"id": "A"}}, map[string]any{"SpecialToken": map[string]any{"id": "</s>"}}},
			"special_tokens": map[string]any{"</s>": map[string]any{"id": "</s>", "ids": []int{2}}}}}), cfg, []string{"post_processor", "after the text"}, nil},
		{"template id past vocabulary", tinyHF(map[string]any{"post_processor": map[string]any{"type": "TemplateProcessing",
			"single":         []any{map[string]any{"SpecialToken": map[string]any{"id": "<s>"}}, map[string]any{"Sequence": map[string]any{"id": "A"}}},
			"special_tokens": map[string]any{"<s>": map[string]any{"id": "<s>", "ids": []int{99}}}}}), cfg, []string{"post_processor", "99"}, nil},
		{"no BOS, config without bos_token_id", tinyHF(noBOS), []byte(`{"vocab_size": 10}`), []string{"adds no BOS", "bos_token_id"}, nil},
		{"no BOS, null bos_token_id", tinyHF(noBOS), []byte(`{"vocab_size": 10, "bos_token_id": null}`), []string{"adds no BOS", "bos_token_id"}, nil},
		{"no BOS, no config.json", tinyHF(noBOS), nil, []string{"adds no BOS", "config.json"}, nil},
		{"no BOS, bos_token_id past vocabulary", tinyHF(noBOS), []byte(`{"vocab_size": 10, "bos_token_id": 10}`), []string{"bos_token_id 10", "outside"}, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tok, err := ParseHFTokenizer(c.tok, c.tokCfg, c.modelCfg)
			if !errors.Is(err, ErrTokenizer) {
				t.Fatalf("got %v, %v; want an error wrapping ErrTokenizer", tok, err)
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %q", err, w)
				}
			}
		})
	}
}

// TestLoadTokenizerHF: a directory with tokenizer.json is read as one (preferred over
// tokenizer.model), checked against the model's vocabulary size, and a document is
// DocumentStart then Encode.
func TestLoadTokenizerHF(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, b []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("tokenizer.json", tinyHF(nil))
	write("tokenizer.model", []byte("not a sentencepiece model"))
	write("config.json", []byte(`{"vocab_size": 10, "bos_token_id": 1}`))
	tok, err := LoadTokenizer(dir, 10)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := tok.(*HFTokenizer); !ok || tok.DocumentStart() != 1 || tok.VocabSize() != 10 {
		t.Fatalf("got %T, DocumentStart %d, VocabSize %d", tok, tok.DocumentStart(), tok.VocabSize())
	}
	_, err = LoadTokenizer(dir, 9)
	if !errors.Is(err, ErrTokenizer) || !strings.Contains(err.Error(), "10 pieces") {
		t.Errorf("vocabulary larger than the model's: err = %v", err)
	}
	// The windows protocol: each line is DocumentStart then its ids, checked against vocab.
	data := filepath.Join(dir, "d.txt")
	if err := os.WriteFile(data, []byte("abc\n\nab a\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ids, err := ReadTokenStream(data, tok, 10)
	if err != nil {
		t.Fatal(err)
	}
	// "▁abc": "a b" (rank 0) before "▁ a" (rank 2): ▁ ab c → ▁ abc. "▁ab▁a": ▁ ab ▁a.
	want := []int{1, 8, 7, 1, 8, 6, 9}
	if !slices.Equal(ids, want) {
		t.Errorf("stream %v, want %v", ids, want)
	}
	if c, err := ReadTokenizingConfig(dir); err != nil || c.Vocab != 10 {
		t.Errorf("ReadTokenizingConfig = %+v, %v", c, err)
	}
	write("config.json", []byte(`{"bos_token_id": 1}`))
	if _, err := ReadTokenizingConfig(dir); !errors.Is(err, ErrConfig) {
		t.Errorf("config without vocab_size: err = %v", err)
	}
}
