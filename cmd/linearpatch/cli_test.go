package main

import (
	"bytes"
	"context"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"linearpatch/model"
)

var sharedDir = filepath.Join("..", "..", "..", "shared")

func shared(t testing.TB, rel string) string {
	t.Helper()
	p := filepath.Join(sharedDir, rel)
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("shared file missing (CI needs ../shared beside the repository): %v", err)
	}
	return p
}

// runCLI runs the command line in-process and returns its stdout.
func runCLI(t testing.TB, args ...string) (string, error) {
	t.Helper()
	cmd := newRootCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	err := cmd.Execute()
	return out.String(), err
}

// lastJSON decodes the last line of out into v.
func lastJSON(t testing.TB, out string, v any) {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), v); err != nil {
		t.Fatalf("last line of stdout is not JSON: %v\n%s", err, out)
	}
}

func readJSON(t testing.TB, path string, v any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatal(err)
	}
}

func relDiff(a, b float64) float64 { return math.Abs(a-b) / math.Abs(b) }

func TestEvalGolden(t *testing.T) {
	for _, gm := range []struct{ model, golden string }{
		{"models/tinystories-8L", "golden/tinystories-8L.json"},
		{"models/stories260K/stories260K.bin", "golden/stories260K.json"},
	} {
		var g struct {
			Eval []struct {
				Data    string  `json:"data"`
				SeqLen  int     `json:"seq_len"`
				PPL     float64 `json:"ppl"`
				Windows int     `json:"windows"`
			} `json:"eval"`
		}
		readJSON(t, shared(t, gm.golden), &g)
		for _, e := range g.Eval {
			if testing.Short() && e.SeqLen != 256 {
				continue
			}
			out, err := runCLI(t, "eval", "--model", shared(t, gm.model), "--data", shared(t, e.Data),
				"--seq-len", itoa(e.SeqLen), "--json")
			if err != nil {
				t.Fatal(err)
			}
			var res struct {
				PPL             float64
				Windows, Tokens int
			}
			lastJSON(t, out, &res)
			if relDiff(res.PPL, e.PPL) > 1e-3 || res.Windows != e.Windows || res.Tokens != e.Windows*(e.SeqLen-1) {
				t.Errorf("%s on %s seq-len %d: got %+v, want ppl %.6f over %d windows", gm.model, e.Data, e.SeqLen, res, e.PPL, e.Windows)
			}
		}
	}
}

func itoa(n int) string { b, _ := json.Marshal(n); return string(b) }

func TestTokenizeGolden(t *testing.T) {
	var g struct {
		Files map[string]struct {
			NumTokens int   `json:"num_tokens"`
			First64   []int `json:"first64"`
			Last64    []int `json:"last64"`
		} `json:"tokenize_files"`
	}
	readJSON(t, shared(t, "golden/tinystories-8L.json"), &g)
	if len(g.Files) == 0 {
		t.Fatal("no tokenize_files cases")
	}
	for file, want := range g.Files {
		out, err := runCLI(t, "tokenize", "--model", shared(t, "models/tinystories-8L"), "--data", shared(t, file))
		if err != nil {
			t.Fatal(err)
		}
		var got struct {
			InputIDs []int `json:"input_ids"`
		}
		lastJSON(t, out, &got)
		ids := got.InputIDs
		if len(ids) != want.NumTokens || !equalInts(ids[:64], want.First64) || !equalInts(ids[len(ids)-64:], want.Last64) {
			t.Errorf("%s: %d tokens, first/last 64 differ from golden (want %d tokens)", file, len(ids), want.NumTokens)
		}
	}
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestConfigPrecedence sets the same key by YAML file, environment and flag.
func TestConfigPrecedence(t *testing.T) {
	model := shared(t, "models/stories260K/stories260K.bin")
	data := shared(t, "data/stories260K/valid.jsonl")
	cfg := filepath.Join(t.TempDir(), "run.yaml")
	if err := os.WriteFile(cfg, []byte("model: "+model+"\ndata: "+data+"\nseq-len: 128\nmax-windows: 5\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	windows := func(args ...string) int {
		t.Helper()
		out, err := runCLI(t, append([]string{"eval", "--config", cfg, "--json"}, args...)...)
		if err != nil {
			t.Fatal(err)
		}
		var res struct{ Windows, Tokens int }
		lastJSON(t, out, &res)
		return res.Tokens / res.Windows
	}
	if got := windows(); got != 127 {
		t.Errorf("YAML seq-len 128: %d predictions per window", got)
	}
	t.Setenv("LINEARPATCH_SEQ_LEN", "64")
	if got := windows(); got != 63 {
		t.Errorf("env seq-len 64 over YAML: %d predictions per window", got)
	}
	if got := windows("--seq-len", "32"); got != 31 {
		t.Errorf("flag seq-len 32 over env: %d predictions per window", got)
	}
}

func TestEvalBadInput(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	m260 := shared(t, "models/stories260K/stories260K.bin")
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no model", []string{"eval", "--data", "x"}, "--model"},
		{"missing model", []string{"eval", "--model", filepath.Join(dir, "nope"), "--data", "x"}, "no such file"},
		{"bad json", []string{"eval", "--model", m260, "--data", write("bad.jsonl", "{\"input_ids\": [1, 2,\n")}, "bad.jsonl"},
		{"id too large", []string{"eval", "--model", m260, "--data", write("big.jsonl", "{\"input_ids\": [1, 2, 512]}\n")}, "512"},
		{"text without tokenizer", []string{"eval", "--model", m260, "--data", write("t.txt", "Once upon a time\n")}, "tokenizer"},
		{"shorter than a window", []string{"eval", "--model", m260, "--data", write("short.jsonl", "{\"input_ids\": [1, 2, 3]}\n")}, "shorter than one window"},
		{"truncated model", []string{"eval", "--model", write("trunc.bin", "\x40\x00\x00\x00"), "--data", "x"}, "trunc.bin"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := runCLI(t, tc.args...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

func TestSynthThenEval(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "synth")
	if _, err := runCLI(t, "synth", "--out", out, "--dim", "48", "--layers", "3", "--heads", "4", "--kv-heads", "2",
		"--ffn", "96", "--vocab", "97", "--qkv-bias"); err != nil {
		t.Fatal(err)
	}
	if _, err := runCLI(t, "synth", "--out", out); err == nil {
		t.Fatal("synth overwrote an existing directory")
	}
	ids := make([]int, 200)
	for i := range ids {
		ids[i] = (i * 7) % 97
	}
	b, _ := json.Marshal(map[string][]int{"input_ids": ids})
	data := filepath.Join(dir, "d.jsonl")
	if err := os.WriteFile(data, append(b, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
	res, err := runCLI(t, "eval", "--model", out, "--data", data, "--seq-len", "50", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var r struct {
		PPL     float64
		Windows int
	}
	lastJSON(t, res, &r)
	if r.Windows != 4 || !(r.PPL > 1) || math.IsInf(r.PPL, 0) {
		t.Fatalf("eval of a synthetic model: %+v", r)
	}
	// The round trip: the saved qwen2 model reloads with its q/k/v biases, and the CLI's
	// perplexity is the in-memory model's (synth's default seed is 1), which the biases change.
	want, err := model.Synthetic(model.Config{Arch: "qwen2", Dim: 48, Layers: 3, Heads: 4, KVHeads: 2, FFN: 96, Vocab: 97,
		MaxSeq: 2048, QKVBias: true}, 1)
	if err != nil {
		t.Fatal(err)
	}
	got, err := model.Load(out)
	if err != nil {
		t.Fatal(err)
	}
	if !got.QKVBias || got.Arch != "qwen2" {
		t.Fatalf("reloaded config: arch %q, q/k/v bias %v", got.Arch, got.QKVBias)
	}
	for i, ly := range got.Layers {
		w := want.Layers[i]
		if !slices.Equal(ly.Bq, w.Bq) || !slices.Equal(ly.Bk, w.Bk) || !slices.Equal(ly.Bv, w.Bv) || len(ly.Bq) == 0 {
			t.Fatalf("layer %d: reloaded q/k/v biases differ from the saved ones", i)
		}
	}
	windows := model.Windows(ids, 50, 0)
	ref, err := want.EvalPerplexity(context.Background(), windows, nil)
	if err != nil {
		t.Fatal(err)
	}
	if relDiff(r.PPL, ref.PPL) > 1e-6 {
		t.Fatalf("CLI perplexity %v, in-memory model %v", r.PPL, ref.PPL)
	}
	for _, ly := range want.Layers {
		ly.Bq, ly.Bk, ly.Bv = nil, nil, nil
	}
	want.QKVBias = false
	noBias, err := want.EvalPerplexity(context.Background(), windows, nil)
	if err != nil {
		t.Fatal(err)
	}
	if relDiff(noBias.PPL, ref.PPL) < 1e-6 {
		t.Fatalf("perplexity %v without the biases equals %v with them: the biases are not exercised", noBias.PPL, ref.PPL)
	}
}
