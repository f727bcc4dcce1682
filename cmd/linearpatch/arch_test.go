package main

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"linearpatch/model"
)

// archNames are the architecture variants of tinystories-8L in ../shared/models/arch.
var archNames = []string{"llama3-rope", "mistral-swa", "qwen2-bias", "qwen3-qknorm"}

// TestEvalArchGolden: eval --json on each variant matches golden/arch.json (windows
// protocol, seq-len 256, valid.txt, all windows) within 0.1%. The golden file has all 510
// windows only, so there is no shorter check: under -short (the pure-Go build, about 3
// minutes a model) it is skipped; the pure-Go forward differs from this one only in its
// sgemm, which TestEvalGolden and the tensor tests check.
func TestEvalArchGolden(t *testing.T) {
	if testing.Short() {
		t.Skip("4 × 510 windows: left to the OpenBLAS build (-short)")
	}
	var g struct {
		Models map[string]struct {
			PPL     float64 `json:"ppl"`
			Windows int     `json:"windows"`
		} `json:"models"`
	}
	readJSON(t, shared(t, "golden/arch.json"), &g)
	for _, name := range archNames {
		t.Run(name, func(t *testing.T) {
			want, ok := g.Models[name]
			if !ok {
				t.Fatalf("golden/arch.json has no %s", name)
			}
			out, err := runCLI(t, "eval", "--model", shared(t, "models/arch/"+name), "--data",
				shared(t, "data/tinystories/valid.txt"), "--seq-len", "256", "--json")
			if err != nil {
				t.Fatal(err)
			}
			var res struct {
				PPL             float64
				Windows, Tokens int
			}
			lastJSON(t, out, &res)
			if relDiff(res.PPL, want.PPL) > 1e-3 || res.Windows != want.Windows || res.Tokens != want.Windows*255 {
				t.Fatalf("got %+v, want ppl %.6f over %d windows", res, want.PPL, want.Windows)
			}
			t.Logf("ppl %.6f, golden %.6f", res.PPL, want.PPL)
		})
	}
}

// TestPruneRunArch: prune and run (stats, cache, student, export) work on each variant;
// the exported models keep the architecture and reload to the perplexity prune reported.
func TestPruneRunArch(t *testing.T) {
	dir := t.TempDir()
	valid, err := os.ReadFile(shared(t, "data/tinystories/valid.txt"))
	if err != nil {
		t.Fatal(err)
	}
	small := filepath.Join(dir, "small.txt") // the first 6 stories: about 20 windows of 64
	if err := os.WriteFile(small, []byte(strings.Join(strings.SplitN(string(valid), "\n", 7)[:6], "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, name := range archNames {
		t.Run(name, func(t *testing.T) {
			src := shared(t, "models/arch/"+name)
			want, err := model.ReadModelConfig(src)
			if err != nil {
				t.Fatal(err)
			}
			sameArch := func(out string) {
				t.Helper()
				got, err := model.ReadModelConfig(out)
				if err != nil {
					t.Fatal(err)
				}
				if got.Arch != want.Arch || got.QKNorm != want.QKNorm || got.QKVBias != want.QKVBias ||
					got.SlidingWindow != want.SlidingWindow || got.HeadDim != want.HeadDim || (got.Scaling == nil) != (want.Scaling == nil) {
					t.Fatalf("exported config %+v, source %+v", got, want)
				}
			}
			common := []string{"--model", src, "--calib", small, "--calib-windows", "8", "--seq-len", "64",
				"--num-prune", "2", "--method", "lstsq"}
			pruned := filepath.Join(dir, name, "prune")
			out, err := runCLI(t, append([]string{"prune", "--out", pruned, "--eval", small, "--json"}, common...)...)
			if err != nil {
				t.Fatal(err)
			}
			var pr pruneJSON
			lastJSON(t, out, &pr)
			sameArch(pruned)
			out, err = runCLI(t, "eval", "--model", pruned, "--data", small, "--seq-len", "64", "--json")
			if err != nil {
				t.Fatal(err)
			}
			var ev struct{ PPL float64 }
			lastJSON(t, out, &ev)
			if !(pr.PPL["lstsq"] > 1) || relDiff(ev.PPL, pr.PPL["lstsq"]) > 1e-5 {
				t.Fatalf("exported model's ppl %.6f, prune reported %.6f", ev.PPL, pr.PPL["lstsq"])
			}

			ran := filepath.Join(dir, name, "run")
			if _, err := runCLI(t, append([]string{"run", "--out", ran, "--train", small, "--teachers", "1",
				"--shard-windows", "8", "--top-k", "8", "--epochs", "1", "--lr", "1e-4"}, common...)...); err != nil {
				t.Fatal(err)
			}
			sameArch(ran)
			out, err = runCLI(t, "eval", "--model", ran, "--data", small, "--seq-len", "64", "--json")
			if err != nil {
				t.Fatal(err)
			}
			lastJSON(t, out, &ev)
			if !(ev.PPL > 1) || math.IsInf(ev.PPL, 0) {
				t.Fatalf("run's exported model: ppl %v", ev.PPL)
			}
			t.Logf("prune lstsq ppl %.4f (dense %.4f); run's distilled model %.4f", pr.PPL["lstsq"], pr.PPL["dense"], ev.PPL)
		})
	}
}

// TestSynthLike: synth --like writes a loadable model of each real config's architecture
// (one layer, and a small vocabulary and width so the test stays small), in the dtype
// asked for; the shape flags given override the config, the others keep it.
func TestSynthLike(t *testing.T) {
	dir := t.TempDir()
	ids := make([]int, 40)
	for i := range ids {
		ids[i] = (i*13 + 1) % 500
	}
	b, _ := json.Marshal(map[string][]int{"input_ids": ids})
	data := filepath.Join(dir, "d.jsonl")
	if err := os.WriteFile(data, append(b, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, dtype, st string
		check           func(model.Config) bool
	}{
		{"llama3", "bf16", "BF16", func(c model.Config) bool {
			return c.Arch == "llama" && c.RopeTheta == 500000 && c.KVHeads == 8 && c.HeadDim == 128 && !c.TiedHead
		}},
		{"qwen3", "bf16", "BF16", func(c model.Config) bool {
			return c.Arch == "qwen3" && c.QKNorm && c.HeadDim == 128 && c.TiedHead && c.NormEps == 1e-6
		}},
		{"mistral", "f16", "F16", func(c model.Config) bool { return c.Arch == "mistral" && c.SlidingWindow == 4096 }},
	} {
		t.Run(c.name, func(t *testing.T) {
			like := shared(t, filepath.Join("tokenizers", c.name, "config.json"))
			out := filepath.Join(dir, c.name)
			if _, err := runCLI(t, "synth", "--like", like, "--out", out, "--layers", "1", "--dim", "64",
				"--ffn", "96", "--vocab", "500", "--dtype", c.dtype); err != nil {
				t.Fatal(err)
			}
			m, err := model.Load(out)
			if err != nil {
				t.Fatal(err)
			}
			if m.Config.Layers != 1 || m.Dim != 64 || m.FFN != 96 || m.Vocab != 500 || !c.check(m.Config) {
				t.Fatalf("config %+v", m.Config)
			}
			f, err := model.OpenSafetensors(filepath.Join(out, "model.safetensors"))
			if err != nil {
				t.Fatal(err)
			}
			dt, _ := f.DType("model.layers.0.self_attn.q_proj.weight")
			f.Close()
			if dt != c.st {
				t.Fatalf("dtype %s, want %s", dt, c.st)
			}
			res, err := runCLI(t, "eval", "--model", out, "--data", data, "--seq-len", "20", "--json")
			if err != nil {
				t.Fatal(err)
			}
			var r struct{ PPL float64 }
			lastJSON(t, res, &r)
			if !(r.PPL > 1 && r.PPL < 10*500) { // random weights: about the vocabulary's size
				t.Fatalf("eval: ppl %v", r.PPL)
			}
		})
	}
	// The model directory itself is accepted too; bad input is refused.
	if _, err := runCLI(t, "synth", "--like", shared(t, "models/arch/qwen3-qknorm"), "--out", filepath.Join(dir, "q3"), "--layers", "1"); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(dir, "bad.json")
	if err := os.WriteFile(bad, []byte(`{"model_type": "qwen2", "use_sliding_window": true, "hidden_size": 8}`), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--like", bad}, "use_sliding_window"},
		{[]string{"--like", filepath.Join(dir, "none.json")}, "none.json"},
		{[]string{"--like", shared(t, "tokenizers/qwen3/config.json"), "--layers", "1", "--heads", "5"}, "num_key_value_heads"},
		{[]string{"--like", shared(t, "tokenizers/qwen3/config.json"), "--dtype", "f8"}, "--dtype"},
		{[]string{"--like", shared(t, "tokenizers/qwen3/config.json"), "--qkv-bias"}, "qkv-bias"},
	} {
		out := filepath.Join(dir, "refused")
		_, err := runCLI(t, append([]string{"synth", "--out", out}, tc.args...)...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("synth %v: error %v, want one mentioning %q", tc.args, err, tc.want)
		}
		if _, err := os.Stat(out); err == nil {
			t.Errorf("synth %v left %s behind", tc.args, out)
		}
	}
}
