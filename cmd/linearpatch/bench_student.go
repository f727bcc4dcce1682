package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"linearpatch/model"
	"linearpatch/model/tensor"
	"linearpatch/shards"
	"linearpatch/student"
)

func newBenchStudentCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bench-student",
		Short: "Measure the student's KD step: throughput, GFLOP/s and memory, and project the paper's run",
		Long: `Write a synthetic model (by default the engine benchmark's: d=1024, 8 layers, ffn 2816,
vocab 32000, 16 heads, 8 kv-heads) to a temporary directory, load only the layers after the
cut [--start, --start+--num-prune) with the final norm and the head, as the student does, and
time KD steps (top-k KL, --seq-len tokens, k=--top-k) on random cached activations,
interleaved with forwards of the same work (no backward), and print their ratio. Prints
tokens/s and GFLOP/s next to the engine's forward and the machine's sgemm, the peak live
heap (runtime/metrics) and peak RSS against the size of the suffix weights and of the whole
pruned model, and projects the paper's distillation run (LLaMA-3-8B shapes, 5 layers pruned,
5,000 × 2,048 tokens) onto this machine. Set GOMEMLIMIT to bound the heap.`,
		Args: cobra.NoArgs,
		RunE: runBenchStudent,
	}
	addBenchModelFlags(cmd)
	f := cmd.Flags()
	f.Int("start", 3, "first pruned layer")
	f.Int("num-prune", 2, "pruned layers")
	f.Int("top-k", 50, "teacher top-k")
	f.Int("steps", 3, "timed KD steps (after one warm-up)")
	f.Bool("json", false, "print the result as one JSON object on the last line of stdout")
	return cmd
}

type benchStudentResult struct {
	Backend          string  `json:"backend"`
	Threads          int     `json:"threads"`
	StepMillis       float64 `json:"step_ms"`
	ForwardMillis    float64 `json:"forward_ms"`
	StepForward      float64 `json:"step_over_forward"`     // wall time of a KD step / a forward of the same work, best of --steps each
	StepForwardCPU   float64 `json:"step_over_forward_cpu"` // the same in process CPU time summed over --steps (0: unavailable)
	TokensPerSec     float64 `json:"tokens_per_s"`
	GFLOPS           float64 `json:"gflops"`
	EngineTokensPS   float64 `json:"engine_forward_tokens_per_s"`
	SgemmGFLOPS      float64 `json:"sgemm_gflops"`
	SuffixWeightsMiB float64 `json:"suffix_weights_mib"`
	PrunedModelMiB   float64 `json:"pruned_model_mib"`
	BatchActsMiB     float64 `json:"batch_activations_mib"`
	PeakLiveHeapMiB  float64 `json:"peak_live_heap_mib"`
	PeakRSSMiB       float64 `json:"peak_rss_mib"`
	GOMEMLIMIT       string  `json:"gomemlimit"`
}

func runBenchStudent(cmd *cobra.Command, _ []string) error {
	s, err := resolve(cmd)
	if err != nil {
		return err
	}
	cfg := benchModelConfig(s)
	T, K, steps := s.num("seq-len"), s.num("top-k"), s.num("steps")
	start, end := s.num("start"), s.num("start")+s.num("num-prune")
	if steps < 1 || T < 2 || K < 1 || start < 1 || end >= cfg.Layers {
		return fmt.Errorf("need --steps ≥ 1, --seq-len ≥ 2, --top-k ≥ 1 and a cut inside the model")
	}
	dir, err := os.MkdirTemp("", "linearpatch-bench-student-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	full, err := model.Synthetic(cfg, 1)
	if err != nil {
		return err
	}
	cfg = full.Config
	// The engine's forward and the machine's sgemm, in the same run.
	ids := make([]int, T)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range ids {
		ids[i] = rng.IntN(cfg.Vocab)
	}
	full.Forward([][]int{ids})
	t0 := time.Now()
	full.Forward([][]int{ids})
	engineTPS := float64(T) / time.Since(t0).Seconds()
	sgemm := tensor.MeasureSgemm(1024, 10)
	if err := full.Save(filepath.Join(dir, "model")); err != nil {
		return err
	}
	full = nil
	runtime.GC()

	var read []string
	m, err := model.Load(filepath.Join(dir, "model"), model.WithLayers(end, cfg.Layers), model.WithoutEmbeddings(), model.WithReadLog(&read))
	if err != nil {
		return err
	}
	if bad := prefixTensors(read, end, cfg.TiedHead); len(bad) > 0 {
		return fmt.Errorf("the suffix loader read %v", bad)
	}
	suffix, err := student.NewSuffix(m, end, nil, student.SuffixOptions{SeqLen: T, Loss: student.LossTopKKL, K: K})
	if err != nil {
		return err
	}
	ex := student.Example{XCut: make([]float32, T*cfg.Dim), TopKIdx: make([]int32, T*K), TopKProb: make([]float32, T*K)}
	for i := range ex.XCut {
		ex.XCut[i] = float32(rng.NormFloat64())
	}
	logits := make([]float32, cfg.Vocab)
	for t := range T {
		for i := range logits {
			logits[i] = float32(3 * rng.NormFloat64())
		}
		shards.TopK(logits, K, ex.TopKIdx[t*K:(t+1)*K], ex.TopKProb[t*K:(t+1)*K])
	}
	var peak uint64
	sample := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	note := func() {
		metrics.Read(sample)
		if v := sample[0].Value.Uint64(); v > peak {
			peak = v
		}
	}
	if _, _, err := suffix.WindowGradient(ex); err != nil {
		return err
	}
	if _, err := suffix.WindowLoss(ex); err != nil {
		return err
	}
	runtime.GC()
	note()
	// KD steps and forwards of the same work (the same layers, final norm, sparse head and
	// loss, no backward) interleaved, so that both see the same machine.
	var stepWall, fwdWall, stepCPU, fwdCPU time.Duration
	bestStep, bestFwd := time.Duration(math.MaxInt64), time.Duration(math.MaxInt64)
	for range steps {
		w0, c0 := time.Now(), cpuTime()
		if _, _, err := suffix.WindowGradient(ex); err != nil {
			return err
		}
		w1, c1 := time.Now(), cpuTime()
		if _, err := suffix.WindowLoss(ex); err != nil {
			return err
		}
		fw := time.Since(w1)
		stepWall, stepCPU = stepWall+w1.Sub(w0), stepCPU+c1-c0
		fwdWall, fwdCPU = fwdWall+fw, fwdCPU+cpuTime()-c1
		bestStep, bestFwd = min(bestStep, w1.Sub(w0)), min(bestFwd, fw)
		runtime.GC()
		note()
	}
	per := stepWall / time.Duration(steps)
	d := float64(cfg.Dim)
	layerW := d*float64(cfg.Heads*cfg.HeadDim)*2 + 2*d*float64(cfg.KVHeads*cfg.HeadDim) + 3*d*float64(cfg.FFN) + 2*d
	suffixW := (float64(cfg.Layers-end)*layerW + d + float64(cfg.Vocab)*d + d*d) * 4
	prunedW := (float64(cfg.Layers-(end-start))*layerW + d + 2*float64(cfg.Vocab)*d + d*d) * 4
	res := benchStudentResult{
		Backend: student.BLASBackend, Threads: tensor.Threads(), StepMillis: float64(per.Microseconds()) / 1e3,
		ForwardMillis: float64((fwdWall / time.Duration(steps)).Microseconds()) / 1e3,
		StepForward:   bestStep.Seconds() / bestFwd.Seconds(),
		TokensPerSec:  float64(T) / per.Seconds(), GFLOPS: student.StepFLOPs(cfg, end, T, K, student.LossTopKKL) / per.Seconds() / 1e9,
		EngineTokensPS: engineTPS, SgemmGFLOPS: sgemm,
		SuffixWeightsMiB: suffixW / (1 << 20), PrunedModelMiB: prunedW / (1 << 20),
		BatchActsMiB:    batchActivations(cfg, end, T, K) / (1 << 20),
		PeakLiveHeapMiB: float64(peak) / (1 << 20), PeakRSSMiB: peakRSSMiB(), GOMEMLIMIT: os.Getenv("GOMEMLIMIT"),
	}
	if fwdCPU > 0 {
		res.StepForwardCPU = stepCPU.Seconds() / fwdCPU.Seconds()
	}
	w := cmd.OutOrStdout()
	fmt.Fprintf(w, "student KD step (topk-kl, k=%d) on d=%d, %d layers, vocab %d; cut [%d, %d): layers %d..%d, final norm and head loaded\n",
		K, cfg.Dim, cfg.Layers, cfg.Vocab, start, end, end, cfg.Layers-1)
	fmt.Fprintf(w, "backend %s, %d threads\n\n", res.Backend, res.Threads)
	fmt.Fprintln(w, "| measure | value |")
	fmt.Fprintln(w, "|---|---:|")
	fmt.Fprintf(w, "| KD step, %d tokens | %.0f ms |\n", T, res.StepMillis)
	fmt.Fprintf(w, "| forward of the same work (layers, norm, sparse head, loss; no backward) | %.0f ms |\n", res.ForwardMillis)
	fmt.Fprintf(w, "| KD step / forward, wall time, best of %d each (target ≤ 2.2) | %.2f× |\n", steps, res.StepForward)
	fmt.Fprintf(w, "| KD step / forward, process CPU time (all threads) | %.2f× |\n", res.StepForwardCPU)
	fmt.Fprintf(w, "| student tokens/s | %.0f |\n", res.TokensPerSec)
	fmt.Fprintf(w, "| student GFLOP/s | %.1f |\n", res.GFLOPS)
	fmt.Fprintf(w, "| engine forward tokens/s (whole model) | %.0f |\n", res.EngineTokensPS)
	fmt.Fprintf(w, "| sgemm 1024³ GFLOP/s | %.1f |\n", res.SgemmGFLOPS)
	fmt.Fprintf(w, "| suffix weights (fp32) | %.1f MiB |\n", res.SuffixWeightsMiB)
	fmt.Fprintf(w, "| one batch's activations (inputs and the graph's saved tensors, estimated) | %.1f MiB |\n", res.BatchActsMiB)
	fmt.Fprintf(w, "| peak live heap | %.1f MiB (%.2f× suffix weights + one batch's activations) |\n", res.PeakLiveHeapMiB, res.PeakLiveHeapMiB/(res.SuffixWeightsMiB+res.BatchActsMiB))
	fmt.Fprintf(w, "| peak RSS (GOMEMLIMIT=%s) | %.1f MiB |\n", res.GOMEMLIMIT, res.PeakRSSMiB)
	fmt.Fprintf(w, "| whole pruned model (what the official code holds) | %.1f MiB |\n\n", res.PrunedModelMiB)
	printPaperProjection(w, res.GFLOPS)
	if s.flag("json") {
		return json.NewEncoder(w).Encode(res)
	}
	return nil
}

// cpuTime returns the process's user and system CPU time over all threads (0 where
// unavailable): a cost that other processes' load on a shared machine inflates less than
// wall time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// peakRSSMiB reads VmHWM from /proc/self/status (0 where unavailable).
func peakRSSMiB() float64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 64)
			return kb / 1024
		}
	}
	return 0
}

// printPaperProjection projects the paper's distillation (LLaMA-3-8B, 5 of 32 layers pruned,
// 5,000 windows × 2,048 tokens, 1 epoch, top-50 targets) at the measured GFLOP/s.
func printPaperProjection(w io.Writer, gflops float64) {
	cfg := model.Config{Dim: 4096, Layers: 32, FFN: 14336, Vocab: 128256, Heads: 32, KVHeads: 8, HeadDim: 128}
	const windows, T, K = 5000, 2048, 50
	d := float64(cfg.Dim)
	layerW := d*float64(cfg.Heads*cfg.HeadDim)*2 + 2*d*float64(cfg.KVHeads*cfg.HeadDim) + 3*d*float64(cfg.FFN) + 2*d
	fmt.Fprintln(w, "Projection of the paper's run (LLaMA-3-8B shapes, 5 layers pruned, 5,000 × 2,048 tokens, 1 epoch) at the measured rate:")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| cut | student | FLOP per window | time here | weights held |")
	fmt.Fprintln(w, "|---|---|---:|---:|---:|")
	for _, cut := range []struct{ start int }{{25}, {20}, {1}} {
		end := cut.start + 5
		ours := student.StepFLOPs(cfg, end, T, K, student.LossTopKKL)
		official := student.StepFLOPs(cfg, 0, T, K, student.LossFullKL) * float64(cfg.Layers-5) / float64(cfg.Layers)
		oursW := (float64(cfg.Layers-end)*layerW + float64(cfg.Vocab)*d) * 4
		offW := (float64(cfg.Layers-5)*layerW + 2*float64(cfg.Vocab)*d) * 2
		fmt.Fprintf(w, "| [%d, %d) | ours: layers %d..31, sparse head, fp32 | %.2f TFLOP | %s | %.1f GiB |\n",
			cut.start, end, end, ours/1e12, fmtHours(windows*ours/(gflops*1e9)), oursW/(1<<30))
		fmt.Fprintf(w, "| [%d, %d) | official: whole pruned model, full-vocabulary head, bf16 | %.2f TFLOP | %s | %.1f GiB |\n",
			cut.start, end, official/1e12, fmtHours(windows*official/(gflops*1e9)), offW/(1<<30))
	}
	fmt.Fprintln(w)
}

func fmtHours(sec float64) string {
	return fmt.Sprintf("%.1f h", sec/3600)
}

// batchActivations estimates the bytes a KD step over one window keeps alive: its inputs
// (X_i, top-k ids and probabilities) and, per suffix layer, the tensors the backward pass
// needs (norm outputs, q/k/v, attention output, gate/up/SwiGLU, residuals), plus the final
// norm and the k head logits per token. All float32.
func batchActivations(cfg model.Config, end, T, K int) float64 {
	d := float64(cfg.Dim)
	q, kv := float64(cfg.Heads*cfg.HeadDim), float64(cfg.KVHeads*cfg.HeadDim)
	perLayer := 4*d + 2*q + 2*kv + 3*float64(cfg.FFN)
	return float64(T) * (2*d + 2*float64(K) + float64(cfg.Layers-end)*perLayer + 2*d + float64(K)) * 4
}
