package main

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/spf13/cobra"

	"linearpatch/model"
	"linearpatch/model/tensor"
)

func newBenchCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure the engine's forward throughput against the machine's sgemm",
		Long: `Build a synthetic model in memory (by default d=1024, 8 layers, ffn 2816, vocab 32000,
16 heads, 8 kv-heads), time full forwards (logits included) of one --seq-len window, and
print tokens/s and GFLOP/s next to the GFLOP/s of a square sgemm measured in the same run.`,
		Args: cobra.NoArgs,
		RunE: runBench,
	}
	addBenchModelFlags(cmd)
	f := cmd.Flags()
	f.Int("batch", 1, "windows per forward")
	f.Int("reps", 5, "timed forwards (after one warm-up)")
	f.Bool("json", false, "print the result as one JSON object on the last line of stdout")
	return cmd
}

type benchResult struct {
	Backend       string  `json:"backend"`
	Threads       int     `json:"threads"`
	SgemmGFLOPS   float64 `json:"sgemm_gflops"`
	TokensPerSec  float64 `json:"tokens_per_s"`
	ForwardGFLOPS float64 `json:"forward_gflops"`
	RatioToSgemm  float64 `json:"ratio_to_sgemm"`
	ForwardMillis float64 `json:"forward_ms"`
}

func runBench(cmd *cobra.Command, _ []string) error {
	s, err := resolve(cmd)
	if err != nil {
		return err
	}
	cfg := benchModelConfig(s)
	m, err := model.Synthetic(cfg, 1)
	if err != nil {
		return err
	}
	T, B, reps := s.num("seq-len"), s.num("batch"), s.num("reps")
	if T < 1 || B < 1 || reps < 1 {
		return fmt.Errorf("--seq-len, --batch and --reps must be positive")
	}
	rng := rand.New(rand.NewPCG(1, 2))
	ids := make([][]int, B)
	for b := range ids {
		ids[b] = make([]int, T)
		for t := range ids[b] {
			ids[b][t] = rng.IntN(cfg.Vocab)
		}
	}
	sgemm := tensor.MeasureSgemm(1024, 10)
	m.Forward(ids) // warm-up: rotary tables, page faults
	start := time.Now()
	for range reps {
		m.Forward(ids)
	}
	per := time.Since(start) / time.Duration(reps)
	flops := model.ForwardFLOPs(m.Config, B, T)
	res := benchResult{
		Backend:       tensor.Backend(),
		Threads:       tensor.Threads(),
		SgemmGFLOPS:   sgemm,
		TokensPerSec:  float64(B*T) / per.Seconds(),
		ForwardGFLOPS: flops / per.Seconds() / 1e9,
		ForwardMillis: float64(per.Microseconds()) / 1e3,
	}
	res.RatioToSgemm = res.ForwardGFLOPS / res.SgemmGFLOPS
	w := cmd.OutOrStdout()
	fmt.Fprintf(w, "backend %s, %d threads\n", res.Backend, res.Threads)
	fmt.Fprintf(w, "model: d=%d, %d layers, ffn %d, vocab %d, %d heads, %d kv-heads; %d×%d tokens per forward\n",
		cfg.Dim, cfg.Layers, cfg.FFN, cfg.Vocab, cfg.Heads, cfg.KVHeads, B, T)
	fmt.Fprintf(w, "sgemm 1024³:     %8.1f GFLOP/s\n", res.SgemmGFLOPS)
	fmt.Fprintf(w, "engine forward:  %8.1f GFLOP/s  %9.0f tokens/s  %7.1f ms per forward\n", res.ForwardGFLOPS, res.TokensPerSec, res.ForwardMillis)
	fmt.Fprintf(w, "ratio to sgemm:  %8.2f\n", res.RatioToSgemm)
	if s.flag("json") {
		return json.NewEncoder(cmd.OutOrStdout()).Encode(res)
	}
	return nil
}

// addBenchModelFlags declares the synthetic model of the benchmarks: by default the engine
// benchmark's (d=1024, 8 layers, ffn 2816, vocab 32000, 16 heads, 8 kv-heads, 512 tokens).
func addBenchModelFlags(cmd *cobra.Command) {
	f := cmd.Flags()
	f.Int("dim", 1024, "hidden size")
	f.Int("layers", 8, "layers")
	f.Int("ffn", 2816, "SwiGLU intermediate size")
	f.Int("vocab", 32000, "vocabulary size")
	f.Int("heads", 16, "attention heads")
	f.Int("kv-heads", 8, "key/value heads")
	f.Int("seq-len", 512, "tokens per window")
}

// benchModelConfig reads the flags of addBenchModelFlags.
func benchModelConfig(s settings) model.Config {
	return model.Config{Arch: "llama", Dim: s.num("dim"), Layers: s.num("layers"), FFN: s.num("ffn"), Vocab: s.num("vocab"),
		Heads: s.num("heads"), KVHeads: s.num("kv-heads"), MaxSeq: s.num("seq-len")}
}
