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
		Use:   "synth --out DIR --dim D --layers L --heads H --kv-heads K --ffn F --vocab V",
		Short: "Write a Hugging Face model directory with seeded random weights",
		Long: `Write a LLaMA model with seeded random weights (config.json + model.safetensors) for
benchmarks and tests. It has no tokenizer: give it JSON Lines token data.`,
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
			cfg := model.Config{
				Arch: "llama", Dim: s.num("dim"), Layers: s.num("layers"), Heads: s.num("heads"),
				KVHeads: s.num("kv-heads"), FFN: s.num("ffn"), Vocab: s.num("vocab"),
				HeadDim: s.num("head-dim"), MaxSeq: s.num("max-seq"), TiedHead: s.flag("tied"),
				QKVBias: s.flag("qkv-bias"),
			}
			if cfg.QKVBias {
				cfg.Arch = "qwen2"
			}
			m, err := model.Synthetic(cfg, s.uint64("seed"))
			if err != nil {
				return err
			}
			if err := saveModelDir(m, out); err != nil {
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

// saveModelDir writes m to dir atomically: into a temporary sibling directory first, renamed
// into place at the end, so a failure leaves nothing at dir. dir must not exist.
func saveModelDir(m *model.Model, dir string) error {
	if _, err := os.Stat(dir); err == nil {
		return fmt.Errorf("%s already exists; remove it or choose another --out", dir)
	}
	parent := filepath.Dir(filepath.Clean(dir))
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(parent, "."+filepath.Base(dir)+".tmp-*")
	if err != nil {
		return err
	}
	if err := m.Save(tmp); err != nil {
		os.RemoveAll(tmp)
		return err
	}
	if err := os.Rename(tmp, dir); err != nil {
		os.RemoveAll(tmp)
		return err
	}
	return nil
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
