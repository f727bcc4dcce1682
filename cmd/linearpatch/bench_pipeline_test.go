package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"linearpatch/shards"
)

// Teacher-scaling benchmark settings: the engine benchmark's synthetic model, windows of
// benchSeqLen tokens, one window per shard.
const (
	benchSeqLen       = 128
	benchCalibWindows = 4
	benchTrainWindows = 24 // LINEARPATCH_BENCH_WINDOWS overrides
)

// scalingConfig is one teacher configuration of BenchmarkTeacherScaling.
type scalingConfig struct {
	name     string
	teachers int
	threads  int
}

// scalingResult is what one configuration measured.
type scalingResult struct {
	tokens    int64
	secs      float64
	fileBytes int64
	// CPU-seconds during the cache phase: of the teachers, of the coordinator and cache
	// writer, and of everything else on the machine (other users included).
	teacherCPU, pipelineCPU, foreignCPU float64
}

func (r *scalingResult) add(o scalingResult) {
	r.tokens += o.tokens
	r.secs += o.secs
	r.fileBytes += o.fileBytes
	r.teacherCPU += o.teacherCPU
	r.pipelineCPU += o.pipelineCPU
	r.foreignCPU += o.foreignCPU
}

func (r scalingResult) tokensPerSec() float64 { return float64(r.tokens) / r.secs }

// BenchmarkTeacherScaling runs the pipeline as processes (coordinator with its embedded
// NATS, cache writer, teachers) on the engine benchmark's synthetic model (d = 1024, 8
// layers, ffn 2816, vocab 32000, 16 heads, 8 kv-heads) and reports the cache phase's
// tokens/s for 1 teacher × 1 thread, 2 teachers × 1 thread and 1 teacher × 2 threads, and
// the ratios to the first.
//
// The cache phase is timed from the coordinator's own log: from its "phase phase=cache"
// line (every stats shard done, the training-free patch fitted, cache tasks about to be
// published) to its "phase phase=done" line (every cache shard's file written by the
// cache writer and recorded). Tokens are those of the cache manifest. So the rate covers
// the whole cache path — teacher forward and top-k, encoding, JetStream, the writer's
// decode and shard files — but not process start-up, model loading or the stats phase;
// the benchmark fails if a teacher was not ready before the cache phase began.
//
// The machine's cores are shared, so the benchmark also reads /proc at the two log lines:
// the CPU-seconds the teachers, the coordinator and writer, and everything else (other
// users) used during the cache phase. Tokens per teacher CPU-second is the teachers' rate
// whatever share of the machine they got; other-load-cores says how much they did not get.
//
// One op is a round of the three configurations, each a fresh run; rounds rotate the
// order, so on a shared machine a burst of foreign load does not always hit the same
// configuration (-benchtime 2x for two rounds; the default benchtime runs one). The
// metrics are totals over all rounds (tokens / seconds).
//
// It needs LINEARPATCH_BENCH_PIPELINE=1 (several minutes a round; `make bench` sets it).
// LINEARPATCH_BENCH_WINDOWS sets the training windows per run (default 24 × 128 tokens).
func BenchmarkTeacherScaling(b *testing.B) {
	if os.Getenv("LINEARPATCH_BENCH_PIPELINE") != "1" {
		b.Skip("set LINEARPATCH_BENCH_PIPELINE=1 to run the pipeline benchmark (several minutes)")
	}
	trainWindows := benchTrainWindows
	if v := os.Getenv("LINEARPATCH_BENCH_WINDOWS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 2 {
			b.Fatalf("LINEARPATCH_BENCH_WINDOWS=%q: want an integer ≥ 2", v)
		}
		trainWindows = n
	}
	dir := b.TempDir()
	modelDir := filepath.Join(dir, "model")
	if _, err := runCLI(b, "synth", "--out", modelDir, "--dim", "1024", "--layers", "8", "--heads", "16", "--kv-heads", "8",
		"--ffn", "2816", "--vocab", "32000", "--seed", "11"); err != nil {
		b.Fatal(err)
	}
	calib, train := filepath.Join(dir, "calib.jsonl"), filepath.Join(dir, "train.jsonl")
	writeBenchTokens(b, calib, benchCalibWindows, 32000, 1)
	writeBenchTokens(b, train, trainWindows, 32000, 2)

	configs := []scalingConfig{{"1x1", 1, 1}, {"2x1", 2, 1}, {"1x2", 1, 2}}
	results := make([]scalingResult, len(configs))
	rounds := 0
	for ; b.Loop(); rounds++ {
		round := rounds
		for j := range configs {
			i := (round + j) % len(configs)
			r := runCacheBench(b, filepath.Join(dir, fmt.Sprintf("r%d-%s", round, configs[i].name)), modelDir, calib, train, configs[i])
			results[i].add(r)
		}
	}
	base := results[0].tokensPerSec()
	for i, c := range configs {
		b.ReportMetric(results[i].tokensPerSec(), c.name+"-tokens/s")
		if i > 0 {
			b.ReportMetric(results[i].tokensPerSec()/base, c.name+"-vs-1x1")
		}
	}
	b.ReportMetric(float64(results[0].fileBytes)/float64(results[0].tokens), "file-B/token")
	var foreign, secs float64
	for _, r := range results {
		foreign += r.foreignCPU
		secs += r.secs
	}
	b.ReportMetric(foreign/secs, "other-load-cores")
	fmt.Printf("\nteacher scaling (cache phase), d=1024 synthetic model, %d round(s) of %d windows × %d tokens, shard-windows 1, k=50, float16, zstd\n\n",
		rounds, trainWindows, benchSeqLen)
	fmt.Println("| teachers × threads | tokens | cache phase s | tokens/s | vs 1×1 | file B/token | teacher cores | tokens per teacher CPU-s | coordinator+cache cores | other load, cores |")
	fmt.Println("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	for i, c := range configs {
		r := results[i]
		fmt.Printf("| %d × %d | %d | %.1f | %.1f | %.2f× | %.1f | %.2f | %.1f | %.2f | %.2f |\n", c.teachers, c.threads, r.tokens, r.secs,
			r.tokensPerSec(), r.tokensPerSec()/base, float64(r.fileBytes)/float64(r.tokens),
			r.teacherCPU/r.secs, float64(r.tokens)/r.teacherCPU, r.pipelineCPU/r.secs, r.foreignCPU/r.secs)
	}
	fmt.Println("\n(cores: CPU-seconds during the cache phase / its wall time, from /proc; other load is the rest of the")
	fmt.Println("machine's busy time, other users' jobs included. tokens per teacher CPU-s does not depend on how")
	fmt.Println("much of the machine the teachers got: equal values mean the teachers scale with the cores they get.)")
	fmt.Println()
}

// writeBenchTokens writes windows × benchSeqLen uniformly random token ids as one JSON line.
func writeBenchTokens(tb testing.TB, path string, windows, vocab int, seed uint64) {
	tb.Helper()
	rng := rand.New(rand.NewPCG(seed, 17))
	ids := make([]int, windows*benchSeqLen)
	for i := range ids {
		ids[i] = rng.IntN(vocab)
	}
	j, err := json.Marshal(map[string][]int{"input_ids": ids})
	if err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(path, append(j, '\n'), 0o644); err != nil {
		tb.Fatal(err)
	}
}

// startBenchProc starts the binary like startProc, for any testing.TB, at info level.
func startBenchProc(tb testing.TB, name string, args ...string) *proc {
	tb.Helper()
	p := &proc{name: name, cmd: exec.Command(binPath, args...), out: &syncBuffer{}, done: make(chan error, 1)}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.Env = append(os.Environ(), "LINEARPATCH_LOG_LEVEL=info")
	if err := p.cmd.Start(); err != nil {
		tb.Fatalf("start %s: %v", name, err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	tb.Cleanup(func() {
		p.kill()
		<-p.done
	})
	return p
}

// waitProc waits up to d for p to exit and returns its error.
func waitProc(tb testing.TB, p *proc, d time.Duration) error {
	tb.Helper()
	select {
	case err := <-p.done:
		p.done <- err
		return err
	case <-time.After(d):
		tb.Fatalf("%s did not finish in %v\n%s", p.name, d, tail(p.out.String(), 3000))
		return nil
	}
}

// runCacheBench runs one configuration from scratch in dir and measures its cache phase.
func runCacheBench(tb testing.TB, dir, modelDir, calib, train string, c scalingConfig) scalingResult {
	tb.Helper()
	runDir := filepath.Join(dir, "run")
	if err := os.MkdirAll(runDir, 0o755); err != nil {
		tb.Fatal(err)
	}
	coord := startBenchProc(tb, "coordinator", "coordinator", "--nats-listen", "127.0.0.1:0", "--threads", "1",
		"--model", modelDir, "--calib", calib, "--train", train, "--num-prune", "2", "--method", "rotate",
		"--seq-len", strconv.Itoa(benchSeqLen), "--calib-windows", strconv.Itoa(benchCalibWindows), "--shard-windows", "1",
		"--top-k", "50", "--act-dtype", "float16", "--distill=false",
		"--out", filepath.Join(dir, "out"), "--run-dir", runDir, "--json")
	deadline := time.Now().Add(60 * time.Second)
	for {
		_, errURL := os.Stat(filepath.Join(runDir, "nats.url"))
		_, errID := os.Stat(filepath.Join(runDir, "run.id"))
		if errURL == nil && errID == nil {
			break
		}
		if time.Now().After(deadline) {
			tb.Fatalf("the coordinator wrote no nats.url and run.id in 60s\n%s", tail(coord.out.String(), 3000))
		}
		time.Sleep(20 * time.Millisecond)
	}
	all := []*proc{coord, startBenchProc(tb, "cache", "cache", "--threads", "1", "--run-dir", runDir, "--model", modelDir)}
	var teachers []*proc
	for i := range c.teachers {
		p := startBenchProc(tb, fmt.Sprintf("teacher %d", i), "teacher", "--threads", strconv.Itoa(c.threads),
			"--run-dir", runDir, "--model", modelDir, "--name", fmt.Sprintf("t%d", i))
		teachers = append(teachers, p)
		all = append(all, p)
	}
	watch := watchCPU(coord, teachers, all)
	dump := func() string {
		var s strings.Builder
		for _, p := range all {
			fmt.Fprintf(&s, "==== %s ====\n%s\n", p.name, tail(p.out.String(), 2000))
		}
		return s.String()
	}
	if err := waitProc(tb, coord, 10*time.Minute); err != nil {
		tb.Fatalf("coordinator: %v\n%s", err, dump())
	}
	began, err := logTime(coord.out.String(), "phase", "phase=cache")
	if err != nil {
		tb.Fatalf("%v\n%s", err, dump())
	}
	ended, err := logTime(coord.out.String(), "phase", "phase=done")
	if err != nil {
		tb.Fatalf("%v\n%s", err, dump())
	}
	for _, p := range teachers {
		ready, err := logTime(p.out.String(), `"teacher ready"`, "")
		if err != nil {
			tb.Fatalf("%s: %v\n%s", p.name, err, dump())
		}
		if ready.After(began) {
			tb.Fatalf("%s was ready %v after the cache phase began: the measurement would include its start-up", p.name, ready.Sub(began))
		}
	}
	mf, err := shards.LoadManifest(filepath.Join(runDir, "cache", "manifest.json"))
	if err != nil {
		tb.Fatal(err)
	}
	var r scalingResult
	for _, e := range mf.Shards {
		if e.Split == "stats" {
			continue
		}
		r.tokens += int64(e.Tokens)
		r.fileBytes += e.Bytes
	}
	if r.tokens == 0 {
		tb.Fatalf("the cache manifest holds no tokens\n%s", dump())
	}
	r.secs = ended.Sub(began).Seconds()
	if cpu, ok := <-watch; ok {
		r.teacherCPU, r.pipelineCPU, r.foreignCPU = cpu.teacherCPU, cpu.pipelineCPU, cpu.foreignCPU
	} else {
		tb.Logf("%s: no CPU accounting (the cache phase was not seen in time)", c.name)
	}
	for _, p := range all[1:] {
		_ = waitProc(tb, p, time.Minute) // teachers and the writer exit once the run is done
	}
	return r
}

// watchCPU samples, from /proc, the CPU time of the processes and of the whole machine
// when the coordinator logs the cache phase's start and again at its end, and sends the
// differences (closing the channel without a value if it missed either line).
func watchCPU(coord *proc, teachers, all []*proc) <-chan scalingResult {
	out := make(chan scalingResult, 1)
	type sample struct{ teachers, pipeline, machine float64 }
	take := func() sample {
		var s sample
		for _, p := range all {
			t := procCPU(p.cmd.Process.Pid)
			if slices.Contains(teachers, p) {
				s.teachers += t
			} else {
				s.pipeline += t
			}
		}
		s.machine = machineBusy()
		return s
	}
	waitLine := func(attr string) bool {
		for {
			if _, err := logTime(coord.out.String(), "phase", attr); err == nil {
				return true
			}
			select {
			case err := <-coord.done:
				coord.done <- err
				_, err = logTime(coord.out.String(), "phase", attr)
				return err == nil
			case <-time.After(5 * time.Millisecond):
			}
		}
	}
	go func() {
		defer close(out)
		if !waitLine("phase=cache") {
			return
		}
		a := take()
		if !waitLine("phase=done") {
			return
		}
		z := take()
		ours := (z.teachers - a.teachers) + (z.pipeline - a.pipeline)
		out <- scalingResult{teacherCPU: z.teachers - a.teachers, pipelineCPU: z.pipeline - a.pipeline,
			foreignCPU: max(0, z.machine-a.machine-ours)}
	}()
	return out
}

// procCPU returns the user+system CPU seconds of process pid so far (0 if it is gone).
func procCPU(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	_, rest, ok := strings.Cut(string(b), ") ")
	f := strings.Fields(rest)
	if !ok || len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / clockTicks
}

// clockTicks is USER_HZ, the unit of /proc CPU times (100 on every Linux architecture Go supports).
const clockTicks = 100

// machineBusy returns the machine's busy CPU seconds so far (all CPUs; /proc/stat's user,
// nice, system, irq, softirq and steal).
func machineBusy() float64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return 0
	}
	var busy float64
	for _, i := range []int{1, 2, 3, 6, 7, 8} {
		v, _ := strconv.ParseFloat(f[i], 64)
		busy += v
	}
	return busy / clockTicks
}

// logTime returns the time= of the first slog text line of log whose msg is msg and that
// contains attr (if not empty).
func logTime(log, msg, attr string) (time.Time, error) {
	sc := bufio.NewScanner(strings.NewReader(log))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "time=") || !strings.Contains(line+" ", " msg="+msg+" ") ||
			attr != "" && !strings.Contains(line+" ", " "+attr+" ") {
			continue
		}
		f, _, _ := strings.Cut(strings.TrimPrefix(line, "time="), " ")
		return time.Parse(time.RFC3339Nano, f)
	}
	return time.Time{}, fmt.Errorf("no log line msg=%s %s", msg, attr)
}
