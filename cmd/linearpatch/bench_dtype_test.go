package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"linearpatch/model"
	"linearpatch/model/tensor"
)

// smallLike writes a config.json with LLaMA-3's settings but small shapes.
func smallLike(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(shared(t, "tokenizers/llama3/config.json"))
	if err != nil {
		t.Fatal(err)
	}
	var c map[string]any
	if err := json.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"] = 64, 96, 4, 2, 300
	dir := filepath.Join(t.TempDir(), "small")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	b, _ = json.Marshal(c)
	path := filepath.Join(dir, "config.json")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestBenchDType: the synthetic half-precision writer gives a sharded model that loads with
// half weights, and the measurement reports sane numbers for it.
func TestBenchDType(t *testing.T) {
	out := filepath.Join(t.TempDir(), "m")
	if err := writeSynthHalf(smallLike(t), out, 2, tensor.F16, 1); err != nil {
		t.Fatal(err)
	}
	shardsWritten, _ := filepath.Glob(filepath.Join(out, "*.safetensors"))
	if len(shardsWritten) != 4 {
		t.Fatalf("%d shards, want one per layer plus embeddings and head", len(shardsWritten))
	}
	m, err := model.Load(out)
	if err != nil {
		t.Fatal(err)
	}
	if m.Config.Layers != 2 || m.Dim != 64 || m.Embed.DType != tensor.F16 || m.Layers[1].Wdown.DType != tensor.F16 ||
		m.Head.DType != tensor.F16 || m.VectorDType != tensor.F16 {
		t.Fatalf("loaded %d layers of width %d, dtypes %v %v %v %v", m.Config.Layers, m.Dim, m.Embed.DType,
			m.Layers[1].Wdown.DType, m.Head.DType, m.VectorDType)
	}
	stdout, err := runCLI(t, "bench-dtype", "--model", out, "--seq-len", "40", "--ratio-seq-len", "16", "--reps", "1", "--json")
	if err != nil {
		t.Fatalf("%v\n%s", err, stdout)
	}
	var res benchDTypeResult
	lastJSON(t, stdout, &res)
	var files int64
	for _, f := range shardsWritten {
		st, _ := os.Stat(f)
		files += st.Size()
	}
	if res.DType != "F16" || res.WeightFileBytes != files || res.PeakRSSBytes <= files || res.WindowTokens != 40 ||
		res.Ratio <= 0 || res.HalfTokensPerSec <= 0 || res.F32TokensPerSec <= 0 {
		t.Fatalf("implausible result %+v (files %d bytes)", res, files)
	}

	if err := writeSynthHalf(smallLike(t), filepath.Join(t.TempDir(), "z"), 0, tensor.BF16, 1); err == nil {
		t.Fatal("--layers 0 accepted")
	}
	for _, args := range [][]string{
		{"bench-dtype"},
		{"bench-dtype", "--model", out, "--like", "x"},
		{"bench-dtype", "--model", shared(t, "models/tinystories-8L")},
		{"bench-dtype", "--like", smallLike(t), "--dtype", "f32"},
	} {
		if _, err := runCLI(t, args...); err == nil {
			t.Errorf("%s: no error", strings.Join(args, " "))
		}
	}
}

// TestRunRefusesAllGramSumsOfABigModel: lstsq in the distributed run would keep the Gram
// sums of every candidate block in each teacher (≈7.5 GB at LLaMA-3-8B's width): refused
// before any work, from config.json alone.
func TestRunRefusesAllGramSumsOfABigModel(t *testing.T) {
	dir := t.TempDir()
	b, err := os.ReadFile(shared(t, "tokenizers/llama3/config.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	// The weights are never read: a small file with the last layer's first tensor (the
	// layer count is checked against it) stands in for them.
	if err := model.WriteSafetensors(filepath.Join(dir, "model.safetensors"),
		[]model.NamedTensor{{Name: "model.layers.31.input_layernorm.weight", Shape: []int{4096}, Data: make([]float32, 4096)}}, nil); err != nil {
		t.Fatal(err)
	}
	_, err = runCLI(t, "run", "--model", dir, "--calib", shared(t, "data/stories260K/calib.jsonl"), "--method", "lstsq",
		"--num-prune", "4", "--out", filepath.Join(t.TempDir(), "out"))
	if err == nil || !strings.Contains(err.Error(), "Gram sums") {
		t.Fatalf("lstsq run on an 8B-shaped model: %v", err)
	}
}
