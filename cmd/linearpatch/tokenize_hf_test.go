package main

import (
	"bufio"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestTokenizeHFGolden runs `tokenize` on the real tokenizer directories (config.json and
// tokenizer files, no weights): the stream is the golden lines' input_ids concatenated.
func TestTokenizeHFGolden(t *testing.T) {
	for _, name := range []string{"llama3", "qwen3", "mistral"} {
		t.Run(name, func(t *testing.T) {
			f, err := os.Open(shared(t, "golden/tokenizers/"+name+".jsonl"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			var want []int
			sc := bufio.NewScanner(f)
			sc.Buffer(nil, 1<<24)
			for sc.Scan() {
				var g struct {
					InputIDs []int `json:"input_ids"`
				}
				if err := json.Unmarshal(sc.Bytes(), &g); err != nil {
					t.Fatal(err)
				}
				want = append(want, g.InputIDs...)
			}
			if err := sc.Err(); err != nil || len(want) == 0 {
				t.Fatalf("golden: %v (%d ids)", err, len(want))
			}
			out, err := runCLI(t, "tokenize", "--model", shared(t, "tokenizers/"+name), "--data", shared(t, "golden/tokenizers/lines.txt"))
			if err != nil {
				t.Fatal(err)
			}
			var got struct {
				InputIDs []int `json:"input_ids"`
			}
			lastJSON(t, out, &got)
			if !slices.Equal(got.InputIDs, want) {
				t.Errorf("%d ids, want %d; first difference at %d", len(got.InputIDs), len(want), firstDiff(got.InputIDs, want))
			}
		})
	}
}

func firstDiff(a, b []int) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestTokenizeHFBadInput: a tokenizer bigger than config.json's vocab_size, and one adding
// no BOS beside a config without bos_token_id, are refused before any output.
func TestTokenizeHFBadInput(t *testing.T) {
	src := shared(t, "tokenizers/qwen3")
	abs, err := filepath.Abs(src)
	if err != nil {
		t.Fatal(err)
	}
	data := shared(t, "golden/tokenizers/lines.txt")
	cases := []struct {
		name, config string
		want         []string
	}{
		{"vocabulary past vocab_size", `{"model_type": "qwen3", "vocab_size": 151000, "bos_token_id": 151643}`, []string{"151669 pieces", "151000"}},
		{"no bos_token_id", `{"model_type": "qwen3", "vocab_size": 151936}`, []string{"adds no BOS", "bos_token_id"}},
		{"no vocab_size", `{"model_type": "qwen3", "bos_token_id": 151643}`, []string{"vocab_size"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			for _, f := range []string{"tokenizer.json", "tokenizer_config.json"} {
				if err := os.Symlink(filepath.Join(abs, f), filepath.Join(dir, f)); err != nil {
					t.Fatal(err)
				}
			}
			if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(c.config), 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := runCLI(t, "tokenize", "--model", dir, "--data", data)
			if err == nil {
				t.Fatalf("no error; output %.100q", out)
			}
			if strings.Contains(out, "input_ids") {
				t.Errorf("output written before the error: %.100q", out)
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %q", err, w)
				}
			}
		})
	}
}
