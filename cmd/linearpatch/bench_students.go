package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"linearpatch/model"
	"linearpatch/shards"
	"linearpatch/student"
	"linearpatch/studentnet"
	"linearpatch/worker"
)

func newBenchStudentsCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bench-students",
		Short: "Measure data-parallel distillation: N student processes sharing the steps vs one",
		Long: `Write the synthetic model of bench-student (d=1024 by default) and a cache of random
activations to a temporary directory, start an embedded NATS server, and distill --steps
steps of --batch windows twice: with one student process and with --students processes,
each with one thread (GOMAXPROCS=1, --threads 1), all sharing the steps through the run's
exchange as network students do. Prints the windows/s of each, their ratio, the bytes of
gradients moved per step (stored and fetched), and projects the paper's distillation onto
N students of M cores from the measured per-core rate. The two runs end with the same P
(checked). On a shared machine the ratio reflects the other load too.`,
		Args: cobra.NoArgs,
		RunE: runBenchStudents,
	}
	addBenchModelFlags(cmd)
	f := cmd.Flags()
	f.Int("start", 3, "first pruned layer")
	f.Int("num-prune", 2, "pruned layers")
	f.Int("top-k", 50, "teacher top-k")
	f.Int("steps", 3, "optimizer steps per run")
	f.Int("batch", 4, "windows per step")
	f.Int("students", 2, "student processes of the shared run")
	f.Bool("json", false, "print the result as one JSON object on the last line of stdout")
	// The child process's flags.
	f.String("child-nats", "", "")
	f.String("child-run", "", "")
	f.String("child-dir", "", "")
	f.Int("child-index", 0, "")
	for _, n := range []string{"child-nats", "child-run", "child-dir", "child-index"} {
		_ = f.MarkHidden(n)
	}
	return cmd
}

// benchChild is what a student process of bench-students reports.
type benchChild struct {
	Windows int     `json:"windows"`
	Seconds float64 `json:"seconds"`
	Compute float64 `json:"compute_seconds"` // in WindowGradient (the rest: waiting, fetching, applying)
	Up      int64   `json:"bytes_up"`
	Down    int64   `json:"bytes_down"`
	PSHA    string  `json:"p_sha256"`
}

type benchStudentsResult struct {
	Dim            int     `json:"dim"`
	Batch          int     `json:"batch"`
	Steps          int     `json:"steps"`
	Students       int     `json:"students"`
	OneWindowsPS   float64 `json:"one_windows_per_s"`
	ManyWindowsPS  float64 `json:"many_windows_per_s"`
	Ratio          float64 `json:"ratio"`
	BytesPerStep   float64 `json:"bytes_per_step"`        // with --students: gradients stored and fetched, all students
	OneBytesStep   float64 `json:"one_bytes_per_step"`    // with one student (stored only)
	GradBytesWin   float64 `json:"grad_bytes_per_window"` // d×d float32
	PerCoreWindows float64 `json:"per_core_windows_per_s"`
}

func benchCut(s settings, cfg model.Config) (int, int, error) {
	start, end := s.num("start"), s.num("start")+s.num("num-prune")
	if start < 1 || end >= cfg.Layers {
		return 0, 0, fmt.Errorf("the cut [%d, %d) is not inside the %d layers", start, end, cfg.Layers)
	}
	return start, end, nil
}

func benchShardMeta(cfg model.Config, start, end, K int) shards.Meta {
	return shards.Meta{RunID: "bench", Fingerprint: "synthetic-1", Start: start, End: end, Dim: cfg.Dim, K: K, Vocab: cfg.Vocab,
		ActDType: shards.Float32}
}

func runBenchStudents(cmd *cobra.Command, _ []string) error {
	s, err := resolve(cmd)
	if err != nil {
		return err
	}
	if s.str("child-nats") != "" {
		return benchStudentChild(cmd, s)
	}
	cfg := benchModelConfig(s)
	T, K, steps, batch, n := s.num("seq-len"), s.num("top-k"), s.num("steps"), s.num("batch"), s.num("students")
	start, end, err := benchCut(s, cfg)
	if err != nil {
		return err
	}
	if steps < 1 || T < 2 || K < 1 || batch < 1 || n < 2 || n > batch {
		return errors.New("need --steps ≥ 1, --seq-len ≥ 2, --top-k ≥ 1 and 2 ≤ --students ≤ --batch")
	}
	dir, err := os.MkdirTemp("", "linearpatch-bench-students-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	full, err := model.Synthetic(cfg, 1)
	if err != nil {
		return err
	}
	cfg = full.Config
	if err := full.Save(filepath.Join(dir, "model")); err != nil {
		return err
	}
	full = nil
	// A cache of random activations and targets: 2 windows a shard.
	meta := benchShardMeta(cfg, start, end, K)
	cacheDir := filepath.Join(dir, "cache")
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return err
	}
	rng := rand.New(rand.NewPCG(1, 2))
	mf := &shards.Manifest{Meta: meta}
	windows := steps * batch
	for sh := 0; sh*2 < windows; sh++ {
		var rows []shards.Chunk
		for w := sh * 2; w < min(sh*2+2, windows); w++ {
			c := shards.Chunk{Shard: sh, Window: w, Chunks: 1, InputIDs: make([]int32, T), XCut: make([]float32, T*cfg.Dim),
				TopKIdx: make([]int32, T*K), TopKProb: make([]float32, T*K)}
			for i := range c.XCut {
				c.XCut[i] = float32(rng.NormFloat64())
			}
			logits := make([]float32, cfg.Vocab)
			for t := range T {
				c.InputIDs[t] = int32(rng.IntN(cfg.Vocab))
				for i := range logits {
					logits[i] = float32(3 * rng.NormFloat64())
				}
				shards.TopK(logits, K, c.TopKIdx[t*K:(t+1)*K], c.TopKProb[t*K:(t+1)*K])
			}
			rows = append(rows, c)
		}
		fi, err := shards.WriteShardFile(filepath.Join(cacheDir, fmt.Sprintf("train-%05d.arrow", sh)), meta, rows, shards.CompressNone)
		if err != nil {
			return err
		}
		if err := mf.Add(fi.Entry(sh, shards.SplitTrain)); err != nil {
			return err
		}
	}
	if err := mf.Save(filepath.Join(cacheDir, student.ManifestName)); err != nil {
		return err
	}
	ctx := cmd.Context()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv, err := worker.StartEmbedded(ctx, filepath.Join(dir, "nats"), worker.WithAllowAnonymous(), worker.WithServerLogger(quiet))
	if err != nil {
		return err
	}
	defer srv.Shutdown()
	nc, err := worker.Connect(ctx, worker.ConnOptions{URL: srv.URL(), Name: "bench-students"})
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	w := cmd.OutOrStdout()
	fmt.Fprintf(w, "data-parallel distillation: d=%d, %d layers after the cut [%d, %d), T=%d, k=%d; --batch %d, %d steps; students of 1 thread each (%d CPUs here)\n\n",
		cfg.Dim, cfg.Layers-end, start, end, T, K, batch, steps, runtime.NumCPU())
	runOnce := func(students int) ([]benchChild, error) {
		names, err := worker.NewNames(fmt.Sprintf("bench%d", students))
		if err != nil {
			return nil, err
		}
		if err := worker.Setup(ctx, js, names, worker.StreamConfig{}); err != nil {
			return nil, err
		}
		kv, err := js.KeyValue(ctx, names.KVBucket())
		if err != nil {
			return nil, err
		}
		exe, err := os.Executable()
		if err != nil {
			return nil, err
		}
		cctx, cancel := context.WithCancel(ctx)
		defer cancel()
		type out struct {
			r   benchChild
			err error
		}
		res := make(chan out, students)
		for i := range students {
			args := []string{"bench-students", "--child-nats", srv.URL(), "--child-run", names.Run(), "--child-dir", dir,
				"--child-index", strconv.Itoa(i), "--threads", "1", "--batch", strconv.Itoa(batch), "--steps", strconv.Itoa(steps),
				"--start", strconv.Itoa(start), "--num-prune", strconv.Itoa(end - start), "--top-k", strconv.Itoa(K),
				"--seq-len", strconv.Itoa(T), "--dim", strconv.Itoa(cfg.Dim), "--layers", strconv.Itoa(cfg.Layers),
				"--ffn", strconv.Itoa(cfg.FFN), "--vocab", strconv.Itoa(cfg.Vocab), "--heads", strconv.Itoa(cfg.Heads),
				"--kv-heads", strconv.Itoa(cfg.KVHeads)}
			c := exec.CommandContext(cctx, exe, args...)
			c.Env = append(os.Environ(), "GOMAXPROCS=1")
			c.Stderr = os.Stderr
			stdout, err := c.StdoutPipe()
			if err != nil {
				return nil, err
			}
			if err := c.Start(); err != nil {
				return nil, err
			}
			go func() {
				var r benchChild
				var last string
				sc := bufio.NewScanner(stdout)
				for sc.Scan() {
					last = sc.Text()
				}
				err := c.Wait()
				if err == nil {
					err = json.Unmarshal([]byte(last), &r)
				}
				res <- out{r, err}
			}()
		}
		// Start them together: once every student has loaded its model and data.
		for i := 0; i < students; {
			if _, err := kv.Get(ctx, fmt.Sprintf("bench.ready.%d", i)); err == nil {
				i++
				continue
			}
			if err := worker.SleepCtx(ctx, 50*time.Millisecond); err != nil {
				return nil, err
			}
		}
		if _, err := kv.Put(ctx, "bench.go", []byte("1")); err != nil {
			return nil, err
		}
		var all []benchChild
		for range students {
			o := <-res
			if o.err != nil {
				return nil, fmt.Errorf("a student process: %w", o.err)
			}
			all = append(all, o.r)
		}
		return all, nil
	}
	one, err := runOnce(1)
	if err != nil {
		return err
	}
	many, err := runOnce(n)
	if err != nil {
		return err
	}
	rate := func(rs []benchChild) (float64, float64) {
		var secs float64
		var bytes int64
		for _, r := range rs {
			secs = max(secs, r.Seconds)
			bytes += r.Up + r.Down
		}
		return float64(windows) / secs, float64(bytes) / float64(steps)
	}
	for _, r := range many {
		if r.PSHA != one[0].PSHA {
			return fmt.Errorf("the shared run ended with another P (sha256 %s, one student's %s)", r.PSHA, one[0].PSHA)
		}
	}
	r1, b1 := rate(one)
	rn, bn := rate(many)
	res := benchStudentsResult{Dim: cfg.Dim, Batch: batch, Steps: steps, Students: n, OneWindowsPS: r1, ManyWindowsPS: rn, Ratio: rn / r1,
		BytesPerStep: bn, OneBytesStep: b1, GradBytesWin: 4 * float64(cfg.Dim) * float64(cfg.Dim), PerCoreWindows: r1}
	fmt.Fprintln(w, "| students × threads | windows/s | windows each | s per window computed, each | time computing, each | gradient bytes moved per step |")
	fmt.Fprintln(w, "|---|---:|---|---|---|---:|")
	each := func(rs []benchChild, f func(benchChild) string) string {
		var parts []string
		for _, r := range rs {
			parts = append(parts, f(r))
		}
		return strings.Join(parts, ", ")
	}
	row := func(label string, rate float64, rs []benchChild, bytes float64) {
		fmt.Fprintf(w, "| %s | %.3f | %s | %s | %s | %.1f MiB |\n", label, rate,
			each(rs, func(r benchChild) string { return strconv.Itoa(r.Windows) }),
			each(rs, func(r benchChild) string { return fmt.Sprintf("%.2f", r.Compute/float64(max(r.Windows, 1))) }),
			each(rs, func(r benchChild) string { return fmt.Sprintf("%.0f%%", 100*r.Compute/r.Seconds) }), bytes/(1<<20))
	}
	row("1 × 1", r1, one, b1)
	row(fmt.Sprintf("%d × 1", n), rn, many, bn)
	fmt.Fprintf(w, "\n%d students / 1: %.2f× windows/s (target ≥ %.1f× on an idle machine with %d cores); same final P: yes\n",
		n, res.Ratio, 0.9*float64(n), n)
	fmt.Fprintf(w, "gradient of one window: d×d float32 = %.1f MiB; a step of %d windows over %d students stores %d and fetches %d of them\n\n",
		res.GradBytesWin/(1<<20), batch, n, batch, (n-1)*batch)
	printSharedProjection(w, r1, cfg, end, T, K)
	if s.flag("json") {
		return json.NewEncoder(w).Encode(res)
	}
	return nil
}

// printSharedProjection projects the paper's distillation (5,000 windows of 2,048 tokens,
// LLaMA-3-8B cut at [25, 30)) onto N students of M cores each: the measured per-core
// window rate scaled by the FLOP ratio of the paper's window to the benchmark's, with the
// gradient traffic of d×d float32 per window (each student stores the windows it computes
// and fetches the others).
func printSharedProjection(w io.Writer, perCore float64, cfg model.Config, end, T, K int) {
	paper := model.Config{Dim: 4096, Layers: 32, FFN: 14336, Vocab: 128256, Heads: 32, KVHeads: 8, HeadDim: 128}
	const windows, pT, pK, pEnd = 5000, 2048, 50, 30
	ratio := student.StepFLOPs(paper, pEnd, pT, pK, student.LossTopKKL) / student.StepFLOPs(cfg, end, T, K, student.LossTopKKL)
	secPerWindowCore := ratio / perCore // one core
	grad := 4.0 * 4096 * 4096
	fmt.Fprintf(w, "Projection of the paper's distillation (LLaMA-3-8B cut at [25, 30), 5,000 × 2,048 tokens, 1 epoch, --batch = N) from the measured %.3f windows/s per core (a paper window is %.0f× this benchmark's FLOPs; linear in cores, which holds only as far as the measured ratio above does):\n\n",
		perCore, ratio)
	fmt.Fprintln(w, "| students N × cores M | time | steps | step time | gradients moved per step, all students | per student per step | bandwidth each student needs |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---:|")
	for _, nm := range [][2]int{{1, 2}, {1, 16}, {4, 16}, {8, 32}, {16, 64}} {
		N, M := nm[0], nm[1]
		sec := windows * secPerWindowCore / float64(N*M)
		steps := (windows + N - 1) / N
		step := sec / float64(steps)
		all := float64(N) * float64(N) * grad // N windows stored once and fetched by the N−1 others
		each := float64(N) * grad             // a student stores its window and fetches N−1
		fmt.Fprintf(w, "| %d × %d | %s | %d | %.0f s | %.0f MiB | %.0f MiB | %.0f MB/s |\n", N, M, fmtHours(sec), steps, step,
			all/(1<<20), each/(1<<20), each/step/1e6)
	}
	fmt.Fprintln(w)
}

// benchStudentChild is one student process of bench-students: it loads the suffix and
// the cache, says it is ready, waits for the go, distills through the run's exchange and
// prints its benchChild as JSON.
func benchStudentChild(cmd *cobra.Command, s settings) error {
	cfg := benchModelConfig(s)
	T, K, batch := s.num("seq-len"), s.num("top-k"), s.num("batch")
	start, end, err := benchCut(s, cfg)
	if err != nil {
		return err
	}
	dir := s.str("child-dir")
	m, err := model.Load(filepath.Join(dir, "model"), model.WithLayers(end, cfg.Layers), model.WithoutEmbeddings())
	if err != nil {
		return err
	}
	suffix, err := student.NewSuffix(m, end, nil, student.SuffixOptions{SeqLen: T, Loss: student.LossTopKKL, K: K})
	if err != nil {
		return err
	}
	cacheDir := filepath.Join(dir, "cache")
	mf, err := shards.LoadManifest(filepath.Join(cacheDir, student.ManifestName))
	if err != nil {
		return err
	}
	var train []student.ShardSpec
	for _, e := range mf.Shards {
		train = append(train, student.ShardSpec{Shard: e.Shard, Windows: e.Windows})
	}
	data, err := student.NewShardData(cacheDir, benchShardMeta(m.Config, start, end, K), train, nil)
	if err != nil {
		return err
	}
	tcfg := student.TrainConfig{Batch: batch, K: K, Seed: 1, CheckpointEvery: -1}
	tr, err := student.NewTrainer(suffix, data, tcfg, nil)
	if err != nil {
		return err
	}
	ctx := cmd.Context()
	nc, err := worker.Connect(ctx, worker.ConnOptions{URL: s.str("child-nats"), Name: "bench-student"})
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	names, err := worker.NewNames(s.str("child-run"))
	if err != nil {
		return err
	}
	x, err := studentnet.Open(ctx, js, names, batch)
	if err != nil {
		return err
	}
	defer x.Close()
	kv, err := js.KeyValue(ctx, names.KVBucket())
	if err != nil {
		return err
	}
	if _, err := kv.Put(ctx, fmt.Sprintf("bench.ready.%d", s.num("child-index")), []byte("1")); err != nil {
		return err
	}
	if err := waitJSON(ctx, kv, "bench.go", new(int)); err != nil {
		return err
	}
	var r benchChild
	t0 := time.Now()
	res, err := tr.RunShared(ctx, x, student.SharedOptions{Holder: fmt.Sprintf("bench-%d", s.num("child-index")), Poll: netPoll, // as network students
		OnWindow: func(_, _ int, took time.Duration) { r.Windows++; r.Compute += took.Seconds() }})
	if err != nil {
		return err
	}
	r.Seconds = time.Since(t0).Seconds()
	r.Up, r.Down = x.Bytes()
	r.PSHA = hashFloats(res.P)
	return json.NewEncoder(cmd.OutOrStdout()).Encode(r)
}

// hashFloats returns the hex SHA-256 of p's float32 bits, little-endian.
func hashFloats(p []float32) string {
	b := make([]byte, 0, 4*len(p))
	for _, v := range p {
		b = binary.LittleEndian.AppendUint32(b, math.Float32bits(v))
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}
