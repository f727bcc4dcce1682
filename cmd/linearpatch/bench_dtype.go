package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"linearpatch/model"
	"linearpatch/model/tensor"
	"linearpatch/teacher"
)

func newBenchDTypeCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bench-dtype (--model DIR | --like CONFIG.json [--layers N] [--dtype bf16])",
		Short: "Measure half-precision-resident weights: teacher peak RSS and forward speed against float32",
		Long: `Load a BF16 or F16 model (weights stay two bytes each, mapped from the safetensors files)
and measure, in one run:

  - the peak RSS (VmHWM) of a teacher computing one --seq-len window of the cache phase
    (the whole forward, top-k targets and the cut's states), against the weight files' size;
  - the forward's tokens/s with the half-precision weights against the same weights
    converted to float32, on --ratio-seq-len tokens. To keep memory low, the float32 side
    converts one part at a time (each layer, then the head) and the two forwards are timed
    part by part, alternating, the best of --reps runs per part.

With --like, a synthetic model of that config.json's shapes (--layers of them, random
weights, --dtype) is first written under --work, one safetensors shard per layer so that
writing it never holds more than one layer, and the measurement runs in a fresh process
(so the RSS is the teacher's alone). Targets (issue 10): ratio ≥ 0.9; peak RSS ≤ weight
files + 2.5 GiB.`,
		Args: cobra.NoArgs,
		RunE: runBenchDType,
	}
	f := cmd.Flags()
	f.String("model", "", "a Hugging Face model directory with BF16 or F16 weights")
	f.String("like", "", "write and measure a synthetic model of this config.json's shapes instead")
	f.Int("layers", 4, "with --like: transformer layers")
	f.String("dtype", "bf16", "with --like: bf16 or f16")
	f.String("work", "", "with --like: directory for the synthetic model (default: a temporary one, removed after)")
	f.Int("seq-len", 2048, "tokens of the teacher window whose peak RSS is measured")
	f.Int("ratio-seq-len", 512, "tokens of the forwards timed for the speed ratio (0: skip the ratio)")
	f.Int("reps", 2, "timed runs per part and dtype (the best counts)")
	f.Bool("json", false, "print the result as one JSON object on the last line of stdout")
	return cmd
}

type benchDTypeResult struct {
	Model            string  `json:"model"`
	DType            string  `json:"dtype"`
	Backend          string  `json:"backend"`
	Threads          int     `json:"threads"`
	WeightFileBytes  int64   `json:"weight_file_bytes"`
	WindowTokens     int     `json:"window_tokens"`
	WindowSeconds    float64 `json:"window_s"`
	WindowCPUSeconds float64 `json:"window_cpu_s"` // user + system CPU time of the window (all threads)
	PeakRSSBytes     int64   `json:"peak_rss_bytes"`
	RSSOverFiles     int64   `json:"rss_over_files_bytes"`
	RatioTokens      int     `json:"ratio_tokens"`
	HalfTokensPerSec float64 `json:"half_tokens_per_s"`
	F32TokensPerSec  float64 `json:"f32_tokens_per_s"`
	Ratio            float64 `json:"ratio"`
}

func runBenchDType(cmd *cobra.Command, _ []string) error {
	s, err := resolve(cmd)
	if err != nil {
		return err
	}
	dir, like := s.str("model"), s.str("like")
	if (dir == "") == (like == "") {
		return errors.New("give exactly one of --model and --like")
	}
	if s.num("seq-len") < 1 || s.num("ratio-seq-len") < 0 || s.num("reps") < 1 {
		return errors.New("--seq-len and --reps must be positive, --ratio-seq-len not negative")
	}
	if dir != "" {
		return measureDType(cmd, dir, s.num("seq-len"), s.num("ratio-seq-len"), s.num("reps"), s.flag("json"))
	}
	dt, ok := tensor.ParseDType(strings.ToUpper(s.str("dtype")))
	if !ok || dt == tensor.F32 {
		return fmt.Errorf("--dtype %q: want bf16 or f16", s.str("dtype"))
	}
	work := s.str("work")
	if work == "" {
		tmp, err := os.MkdirTemp("", "linearpatch-bench-dtype-*")
		if err != nil {
			return err
		}
		defer os.RemoveAll(tmp)
		work = tmp
	}
	out := filepath.Join(work, fmt.Sprintf("%s-%dL-%s", filepath.Base(filepath.Dir(filepath.Clean(like))), s.num("layers"), dt))
	if _, err := os.Stat(filepath.Join(out, "config.json")); err != nil {
		began := time.Now()
		if err := writeSynthHalf(like, out, s.num("layers"), dt, 1); err != nil {
			return err
		}
		fmt.Fprintf(cmd.OutOrStdout(), "wrote %s in %.0f s\n", out, time.Since(began).Seconds())
	}
	// A fresh process, so that the peak RSS is the teacher's and not the writer's.
	self, err := os.Executable()
	if err != nil {
		return err
	}
	args := []string{"bench-dtype", "--model", out, "--seq-len", strconv.Itoa(s.num("seq-len")),
		"--ratio-seq-len", strconv.Itoa(s.num("ratio-seq-len")), "--reps", strconv.Itoa(s.num("reps"))}
	if s.flag("json") {
		args = append(args, "--json")
	}
	child := exec.CommandContext(cmd.Context(), self, args...)
	child.Stdout, child.Stderr = cmd.OutOrStdout(), cmd.ErrOrStderr()
	return child.Run()
}

// measureDType is the measurement of bench-dtype on a model directory.
func measureDType(cmd *cobra.Command, dir string, T, TR, reps int, asJSON bool) error {
	w := cmd.OutOrStdout()
	files, err := filepath.Glob(filepath.Join(dir, "*.safetensors"))
	if err != nil {
		return err
	}
	var fileBytes int64
	for _, f := range files {
		st, err := os.Stat(f)
		if err != nil {
			return err
		}
		fileBytes += st.Size()
	}
	m, err := model.Load(dir)
	if err != nil {
		return err
	}
	if !m.Embed.IsHalf() {
		return fmt.Errorf("%s: the weights are %v; bench-dtype measures BF16 or F16 weights", dir, m.Embed.DType)
	}
	res := benchDTypeResult{Model: dir, DType: m.Embed.DType.String(), Backend: tensor.Backend(),
		Threads: tensor.Threads(), WeightFileBytes: fileBytes, WindowTokens: T, RatioTokens: TR}

	// 1. A teacher's cache-phase window: the whole forward, the cut's states, top-k targets.
	c, err := teacher.NewCompute(m)
	if err != nil {
		return err
	}
	rng := rand.New(rand.NewPCG(1, 2))
	ids := make([]int, T)
	for i := range ids {
		ids[i] = rng.IntN(m.Vocab)
	}
	began, cpu0 := time.Now(), cpuSeconds()
	if _, err := c.Window(cmd.Context(), ids, m.Config.Layers/2, 50, true); err != nil {
		return err
	}
	res.WindowSeconds = time.Since(began).Seconds()
	res.WindowCPUSeconds = cpuSeconds() - cpu0
	res.PeakRSSBytes, err = peakRSS()
	if err != nil {
		return err
	}
	res.RSSOverFiles = res.PeakRSSBytes - fileBytes
	fmt.Fprintf(w, "teacher window of %d tokens (%s, %d layers): %.1f s (%.1f CPU-s), %.1f tokens/s; peak RSS %.2f GiB = weight files %.2f GiB + %.2f GiB (target ≤ + 2.5 GiB)\n",
		T, res.DType, m.Config.Layers, res.WindowSeconds, res.WindowCPUSeconds, float64(T)/res.WindowSeconds,
		gib(res.PeakRSSBytes), gib(fileBytes), gib(res.RSSOverFiles))

	if TR == 0 {
		return printDTypeJSON(w, res, asJSON)
	}

	// 2. Forward speed, half-precision weights against float32, part by part.
	rids := make([]int, TR)
	for i := range rids {
		rids[i] = rng.IntN(m.Vocab)
	}
	x0 := m.Embeddings([][]int{rids})
	states := []*tensor.Matrix{x0.Clone()} // states[l] enters layer l
	for l := range m.Config.Layers {
		x := states[l].Clone()
		m.RunLayers(x, TR, l, l+1, nil)
		states = append(states, x)
	}
	var half, f32 time.Duration
	timeBest := func(f func()) time.Duration {
		best := time.Duration(math.MaxInt64)
		for range reps {
			start := time.Now()
			f()
			best = min(best, time.Since(start))
		}
		return best
	}
	for l := range m.Config.Layers {
		conv := *m
		conv.Layers = append([]*model.Layer(nil), m.Layers...)
		conv.Layers[l] = m.Layers[l].WithDType(tensor.F32)
		for _, v := range []struct {
			m   *model.Model
			sum *time.Duration
		}{{m, &half}, {&conv, &f32}} {
			*v.sum += timeBest(func() {
				x := states[l].Clone()
				v.m.RunLayers(x, TR, l, l+1, nil)
			})
		}
		conv.Layers = nil
		runtime.GC()
		debug.FreeOSMemory()
	}
	headF32 := *m
	headF32.Head = m.Head.F32()
	xL := states[m.Config.Layers]
	half += timeBest(func() { m.Logits(xL) })
	f32 += timeBest(func() { headF32.Logits(xL) })
	res.HalfTokensPerSec = float64(TR) / half.Seconds()
	res.F32TokensPerSec = float64(TR) / f32.Seconds()
	res.Ratio = res.HalfTokensPerSec / res.F32TokensPerSec
	fmt.Fprintf(w, "forward of %d tokens (layers + head, best of %d per part): %s %.0f tokens/s, float32 %.0f tokens/s, ratio %.3f (target ≥ 0.9)\n",
		TR, reps, res.DType, res.HalfTokensPerSec, res.F32TokensPerSec, res.Ratio)
	return printDTypeJSON(w, res, asJSON)
}

func printDTypeJSON(w io.Writer, res benchDTypeResult, asJSON bool) error {
	if asJSON {
		b, _ := json.Marshal(res)
		fmt.Fprintln(w, string(b))
	}
	return nil
}

func gib(b int64) float64 { return float64(b) / (1 << 30) }

// peakRSS returns the process's peak resident set size (VmHWM of /proc/self/status: mapped
// weight pages that were touched count, as they should).
func peakRSS() (int64, error) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, fmt.Errorf("bench-dtype: peak RSS needs Linux's /proc: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("bench-dtype: VmHWM %q: %w", rest, err)
			}
			return kb << 10, nil
		}
	}
	return 0, errors.New("bench-dtype: no VmHWM in /proc/self/status")
}

// writeSynthHalf writes a model with the shapes of the config.json at like, layers layers
// and random weights in dt (projections N(0, 1/fan_in), embeddings and head N(0, 1) and
// N(0, 1/d), norms 1) as out: config.json (like's, with num_hidden_layers and torch_dtype
// replaced) and one safetensors shard per layer plus one for the embeddings and one for the
// head, so that no more than one of them is in memory. LLaMA, Mistral, Qwen2 and Qwen3 configs.
// The directory appears whole (renamed from a temporary sibling).
func writeSynthHalf(like, out string, layers int, dt tensor.DType, seed uint64) error {
	cfg, err := model.ReadConfig(like)
	if err != nil {
		return err
	}
	if cfg.Arch != "llama" && cfg.Arch != "mistral" && cfg.Arch != "qwen2" && cfg.Arch != "qwen3" {
		return fmt.Errorf("bench-dtype: --like %s: model_type %s (llama, mistral, qwen2 or qwen3 here)", like, cfg.Arch)
	}
	if layers < 1 {
		return fmt.Errorf("bench-dtype: --layers %d must be positive", layers)
	}
	raw, err := os.ReadFile(like)
	if err != nil {
		return err
	}
	var hf map[string]any
	if err := json.Unmarshal(raw, &hf); err != nil {
		return fmt.Errorf("bench-dtype: %s: %w", like, err)
	}
	hf["num_hidden_layers"] = layers
	hf["torch_dtype"] = map[tensor.DType]string{tensor.BF16: "bfloat16", tensor.F16: "float16"}[dt]
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(out), "."+filepath.Base(out)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp) // after the rename, nothing is left to remove
	rng := rand.New(rand.NewPCG(seed, 0x62656e6368))
	normal := func(name string, rows, cols int, std float64) model.NamedTensor {
		bits := make([]uint16, rows*cols)
		for i := range bits {
			v := float32(rng.NormFloat64() * std)
			if dt == tensor.BF16 {
				bits[i] = tensor.Float32ToBFloat16(v)
			} else {
				bits[i] = tensor.Float32ToFloat16(v)
			}
		}
		return model.NamedTensor{Name: name, Shape: []int{rows, cols}, Half: bits, DType: dt.String()}
	}
	ones := func(name string, n int) model.NamedTensor {
		v := make([]float32, n)
		for i := range v {
			v[i] = 1
		}
		return model.NamedTensor{Name: name, Shape: []int{n}, Data: v, DType: dt.String()}
	}
	d, q, kv := cfg.Dim, cfg.Heads*cfg.HeadDim, cfg.KVHeads*cfg.HeadDim
	weightMap := map[string]string{}
	shards := layers + 2
	write := func(k int, ts []model.NamedTensor) error {
		name := fmt.Sprintf("model-%05d-of-%05d.safetensors", k+1, shards)
		for _, t := range ts {
			weightMap[t.Name] = name
		}
		return model.WriteSafetensors(filepath.Join(tmp, name), ts, map[string]string{"format": "pt"})
	}
	if err := write(0, []model.NamedTensor{normal("model.embed_tokens.weight", cfg.Vocab, d, 1)}); err != nil {
		return err
	}
	for l := range layers {
		p := fmt.Sprintf("model.layers.%d.", l)
		in := func(fan int) float64 { return 1 / math.Sqrt(float64(fan)) }
		ts := []model.NamedTensor{
			ones(p+"input_layernorm.weight", d),
			normal(p+"self_attn.q_proj.weight", q, d, in(d)),
			normal(p+"self_attn.k_proj.weight", kv, d, in(d)),
			normal(p+"self_attn.v_proj.weight", kv, d, in(d)),
			normal(p+"self_attn.o_proj.weight", d, q, in(q)),
			ones(p+"post_attention_layernorm.weight", d),
			normal(p+"mlp.gate_proj.weight", cfg.FFN, d, in(d)),
			normal(p+"mlp.up_proj.weight", cfg.FFN, d, in(d)),
			normal(p+"mlp.down_proj.weight", d, cfg.FFN, in(cfg.FFN)),
		}
		if cfg.QKNorm {
			ts = append(ts, ones(p+"self_attn.q_norm.weight", cfg.HeadDim), ones(p+"self_attn.k_norm.weight", cfg.HeadDim))
		}
		if cfg.QKVBias {
			for _, b := range []struct {
				n    string
				size int
			}{{"q", q}, {"k", kv}, {"v", kv}} {
				t := normal(p+"self_attn."+b.n+"_proj.bias", 1, b.size, 0.02)
				t.Shape = []int{b.size}
				ts = append(ts, t)
			}
		}
		if err := write(l+1, ts); err != nil {
			return err
		}
	}
	last := []model.NamedTensor{ones("model.norm.weight", d)}
	if !cfg.TiedHead {
		last = append(last, normal("lm_head.weight", cfg.Vocab, d, 1/math.Sqrt(float64(d))))
	}
	if err := write(layers+1, last); err != nil {
		return err
	}
	idx, _ := json.MarshalIndent(map[string]any{"metadata": map[string]any{}, "weight_map": weightMap}, "", "  ")
	cj, _ := json.MarshalIndent(hf, "", "  ")
	if err := os.WriteFile(filepath.Join(tmp, "model.safetensors.index.json"), idx, 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, "config.json"), cj, 0o644); err != nil {
		return err
	}
	if err := os.Chmod(tmp, 0o755); err != nil { // MkdirTemp made it private
		return err
	}
	return os.Rename(tmp, out)
}
