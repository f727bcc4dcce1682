package main

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"linearpatch/model"
)

func newSynthCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "synth --out DIR (--like CONFIG.json | --dim D --layers L --heads H --kv-heads K --ffn F --vocab V)",
		Short: "Write a Hugging Face model directory with seeded random weights",
		Long: `Write a model with seeded random weights (config.json + model.safetensors) for
benchmarks and tests. It has no tokenizer: give it JSON Lines token data.

With --like, the shapes and architecture come from a real model's config.json (any
supported model_type: llama, mistral, qwen2, qwen3, with its rope scaling, sliding window,
head_dim, tied head); the shape flags given explicitly (--layers, --dim, --vocab, ...)
override it, e.g. --layers 4 for the first layers of LLaMA-3-8B (head_dim stays the
config's unless --head-dim is given). Weights are drawn and
written a block at a time, so the file may be larger than memory.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := resolve(cmd)
			if err != nil {
				return err
			}
			out := s.str("out")
			if out == "" {
				return fmt.Errorf("--out is required")
			}
			dtype, ok := map[string]string{"f32": "F32", "f16": "F16", "bf16": "BF16"}[strings.ToLower(s.str("dtype"))]
			if !ok {
				return fmt.Errorf("--dtype %q: want f32, f16 or bf16", s.str("dtype"))
			}
			cfg, err := synthConfig(s)
			if err != nil {
				return err
			}
			if cfg, err = writeSynthDir(cfg, s.uint64("seed"), dtype, out); err != nil {
				return err
			}
			if path := s.str("data"); path != "" {
				return writeRandomTokens(path, s.num("data-tokens"), cfg.Vocab, s.uint64("seed"))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.String("out", "", "output directory (must not exist)")
	f.String("like", "", "take shapes and architecture from this config.json (or a model directory holding one)")
	f.String("dtype", "f32", "weight dtype on disk: f32, f16 or bf16")
	f.Int("dim", 256, "hidden size")
	f.Int("layers", 4, "transformer layers")
	f.Int("heads", 8, "attention heads")
	f.Int("kv-heads", 0, "key/value heads (0: same as --heads)")
	f.Int("head-dim", 0, "per-head dimension (0: dim/heads)")
	f.Int("ffn", 688, "SwiGLU intermediate size")
	f.Int("vocab", 1024, "vocabulary size")
	f.Int("max-seq", 2048, "max_position_embeddings")
	f.Bool("tied", false, "share the embedding matrix with the head")
	f.Bool("qkv-bias", false, "add q/k/v biases (writes a qwen2 model)")
	f.Uint64("seed", 1, "random seed")
	f.String("data", "", "also write uniformly random token data (JSON Lines) to this file")
	f.Int("data-tokens", 1<<16, "tokens of --data")
	return cmd
}

// synthConfig returns the configuration synth writes: --like's config.json with the shape
// settings given explicitly on top, or the shape settings alone.
func synthConfig(s settings) (model.Config, error) {
	like := s.str("like")
	if like == "" {
		cfg := model.Config{
			Arch: "llama", Dim: s.num("dim"), Layers: s.num("layers"), Heads: s.num("heads"),
			KVHeads: s.num("kv-heads"), FFN: s.num("ffn"), Vocab: s.num("vocab"),
			HeadDim: s.num("head-dim"), MaxSeq: s.num("max-seq"), TiedHead: s.flag("tied"),
			QKVBias: s.flag("qkv-bias"),
		}
		if cfg.QKVBias {
			cfg.Arch = "qwen2"
		}
		return cfg, nil
	}
	if st, err := os.Stat(like); err == nil && st.IsDir() {
		like = filepath.Join(like, "config.json")
	}
	cfg, err := model.ReadConfig(like)
	if err != nil {
		return model.Config{}, fmt.Errorf("--like: %w", err)
	}
	cfg.LinearPatch = nil
	for key, field := range map[string]*int{"dim": &cfg.Dim, "layers": &cfg.Layers, "heads": &cfg.Heads,
		"kv-heads": &cfg.KVHeads, "head-dim": &cfg.HeadDim, "ffn": &cfg.FFN, "vocab": &cfg.Vocab, "max-seq": &cfg.MaxSeq} {
		if s.v.IsSet(key) {
			*field = s.num(key)
		}
	}
	if s.v.IsSet("tied") {
		cfg.TiedHead = s.flag("tied")
	}
	if s.v.IsSet("qkv-bias") && s.flag("qkv-bias") != cfg.QKVBias {
		return model.Config{}, fmt.Errorf("--qkv-bias with --like: the biases come with the model_type (%s)", cfg.Arch)
	}
	if err := cfg.Validate(); err != nil {
		return model.Config{}, fmt.Errorf("--like %s with the flags given: %w", like, err)
	}
	return cfg, nil
}

// writeSynthDir writes the synthetic model of cfg to dir atomically: into a temporary
// sibling directory first, renamed into place at the end, so a failure leaves nothing at
// dir. dir must not exist. It returns the configuration written.
func writeSynthDir(cfg model.Config, seed uint64, dtype, dir string) (model.Config, error) {
	if _, err := os.Stat(dir); err == nil {
		return model.Config{}, fmt.Errorf("%s already exists; remove it or choose another --out", dir)
	}
	parent := filepath.Dir(filepath.Clean(dir))
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return model.Config{}, err
	}
	tmp, err := os.MkdirTemp(parent, "."+filepath.Base(dir)+".tmp-*")
	if err != nil {
		return model.Config{}, err
	}
	cfg, err = model.WriteSynthetic(tmp, cfg, seed, dtype)
	if err == nil {
		err = os.Chmod(tmp, 0o755)
	}
	if err == nil {
		err = os.Rename(tmp, dir)
	}
	if err != nil {
		os.RemoveAll(tmp)
		return model.Config{}, err
	}
	return cfg, nil
}

// writeRandomTokens writes n uniformly random token ids as JSON Lines of 1024 ids a line,
// each line starting with BOS (id 1).
func writeRandomTokens(path string, n, vocab int, seed uint64) error {
	if n < 1 {
		return fmt.Errorf("--data-tokens must be positive")
	}
	rng := rand.New(rand.NewPCG(seed, 2))
	var b strings.Builder
	for lo := 0; lo < n; lo += 1024 {
		ids := make([]int, min(1024, n-lo))
		for i := range ids {
			ids[i] = rng.IntN(vocab)
		}
		ids[0] = 1
		line, _ := json.Marshal(map[string][]int{"input_ids": ids})
		b.Write(line)
		b.WriteByte('\n')
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, []byte(b.String()), 0o644)
}
