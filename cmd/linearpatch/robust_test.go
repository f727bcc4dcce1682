package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"linearpatch/cache"
	"linearpatch/model"
	"linearpatch/protocol"
	"linearpatch/shards"
)

// TestStudentBrokenRunDir: the offline student refuses a truncated training-free patch with
// a clear error (it used to panic in tensor.FromData), and a shard missing from the cache
// manifest is logged while waited for and then given up with an error (it used to wait
// forever without a word).
func TestStudentBrokenRunDir(t *testing.T) {
	fx := newPipelineFixture(t)
	runDir := cacheOnlyRun(t, fx)

	t.Run("truncated patch0", func(t *testing.T) {
		dir := filepath.Join(fx.dir, "truncated")
		copyRunDir(t, runDir, dir)
		p0 := filepath.Join(dir, protocol.Patch0File)
		b, err := os.ReadFile(p0)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p0, b[:1000], 0o644); err != nil {
			t.Fatal(err)
		}
		_, err = runCLI(t, append([]string{"student", "--run-dir", dir, "--out", filepath.Join(dir, "out")}, studentArgs...)...)
		if err == nil || !strings.Contains(err.Error(), "250 values") || !strings.Contains(err.Error(), protocol.Patch0File) {
			t.Fatalf("student with a truncated %s: %v, want an error naming the file and its 250 values", protocol.Patch0File, err)
		}
		if _, err := os.Stat(filepath.Join(dir, "out")); err == nil {
			t.Error("a failed student left --out behind")
		}
	})

	t.Run("shard missing from the manifest", func(t *testing.T) {
		dir := filepath.Join(fx.dir, "missing")
		copyRunDir(t, runDir, dir)
		path := filepath.Join(dir, "cache", cache.ManifestFile)
		mf, err := shards.LoadManifest(path)
		if err != nil {
			t.Fatal(err)
		}
		gone := mf.Shards[1].Shard
		mf.Shards = append(mf.Shards[:1], mf.Shards[2:]...)
		if err := mf.Save(path); err != nil {
			t.Fatal(err)
		}
		p := startProc(t, "student", nil, append([]string{"student", "--run-dir", dir, "--out", filepath.Join(dir, "out"), "--shard-wait", "2s"}, studentArgs...)...)
		err = p.wait(t, 60*time.Second)
		out := p.out.String()
		if err == nil {
			t.Fatalf("the student finished without shard %d:\n%s", gone, tail(out, 2000))
		}
		for _, want := range []string{"waiting for a shard", "shard not in the manifest", "nothing has been added for 2s"} {
			if !strings.Contains(out, want) {
				t.Errorf("the student's output lacks %q:\n%s", want, tail(out, 2000))
			}
		}
	})
}

// nanModel writes a small synthetic model whose head holds a NaN, and token data for it.
func nanModel(t *testing.T) (modelDir, data string) {
	t.Helper()
	dir := t.TempDir()
	m, err := model.Synthetic(model.Config{Dim: 32, FFN: 64, Layers: 2, Heads: 2, Vocab: 64, MaxSeq: 64}, 3)
	if err != nil {
		t.Fatal(err)
	}
	m.Head.Data[5] = float32(math.NaN())
	modelDir = filepath.Join(dir, "model")
	if err := m.Save(modelDir); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for i := range 64 {
		fmt.Fprintf(&b, "{\"input_ids\": [%d, %d, %d, %d]}\n", i%64, (i*7)%64, (i*13)%64, (i*5)%64)
	}
	data = filepath.Join(dir, "data.jsonl")
	if err := os.WriteFile(data, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return modelDir, data
}

// TestEvalNaNPerplexity: a model whose logits hold NaN makes eval fail with a clear error,
// with and without --json (it used to print "perplexity NaN" and exit 0, or fail inside
// the JSON encoder).
func TestEvalNaNPerplexity(t *testing.T) {
	modelDir, data := nanModel(t)
	for _, json := range []bool{false, true} {
		args := []string{"eval", "--model", modelDir, "--data", data, "--seq-len", "16"}
		if json {
			args = append(args, "--json")
		}
		out, err := runCLI(t, args...)
		if !errors.Is(err, model.ErrNotFinite) {
			t.Fatalf("eval --json=%t of a NaN model: %v (output %q), want model.ErrNotFinite", json, err, out)
		}
		if strings.Contains(out, "perplexity") || strings.Contains(out, "ppl") {
			t.Errorf("eval --json=%t printed a score: %q", json, out)
		}
	}
}

// TestStudentCorruptShardOnce: a shard file that fails its checksum is reported once, with
// the reason, not twice.
func TestStudentCorruptShardOnce(t *testing.T) {
	fx := newPipelineFixture(t)
	runDir := cacheOnlyRun(t, fx)
	dir := filepath.Join(fx.dir, "corrupt")
	copyRunDir(t, runDir, dir)
	mf, err := shards.LoadManifest(filepath.Join(dir, "cache", cache.ManifestFile))
	if err != nil {
		t.Fatal(err)
	}
	path := mf.Shards[0].Path(filepath.Join(dir, "cache"))
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0x40
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	p := startProc(t, "student", nil, append([]string{"student", "--run-dir", dir, "--out", filepath.Join(dir, "out")}, studentArgs...)...)
	if err := p.wait(t, 120*time.Second); err == nil {
		t.Fatal("the student trained on a corrupted shard")
	}
	out := p.out.String()
	t.Logf("output:\n%s", out)
	if n := strings.Count(out, "checksum mismatch"); n != 1 {
		t.Errorf("the checksum error appears %d times, want once:\n%s", n, tail(out, 3000))
	}
}

// TestRunStudentFailureOnce: a student that fails inside run (here: resuming a checkpoint
// made with another learning rate) is reported once, by the command's error, not also
// logged by the coordinator.
func TestRunStudentFailureOnce(t *testing.T) {
	fx := newPipelineFixture(t)
	runDir := filepath.Join(fx.dir, "run")
	args := append(append([]string{"run"}, fx.settingsArgs()...), "--run-dir", runDir, "--teachers", "1", "--epochs", "1", "--checkpoint-every", "2",
		"--ack-wait", "2s", "--lease", "4s") // a run killed mid-cache resumes without long waits
	p := startProc(t, "first", nil, append(args, "--out", filepath.Join(fx.dir, "out1"))...)
	waitFile(t, filepath.Join(runDir, "student", "checkpoint.bin"), 60*time.Second)
	p.kill()
	_ = p.wait(t, 10*time.Second)
	p = startProc(t, "second", nil, append(args, "--out", filepath.Join(fx.dir, "out2"), "--lr", "5e-4")...)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("second run:\n%s", tail(p.out.String(), 5000))
		}
	})
	if err := p.wait(t, 120*time.Second); err == nil {
		t.Fatal("a resume with another learning rate was accepted")
	}
	out := p.out.String()
	if !strings.Contains(out, "config.lr") {
		t.Fatalf("the failure does not name the differing setting:\n%s", tail(out, 3000))
	}
	t.Logf("second run:\n%s", tail(out, 1500))
	if strings.Contains(out, "student failed") {
		t.Errorf("the student's failure is logged by the coordinator as well as returned:\n%s", tail(out, 3000))
	}
	if !strings.Contains(out, "linearpatch: ") {
		t.Errorf("no error reported:\n%s", tail(out, 3000))
	}
}

// TestPruneOutputsTogether: an --out below a file is refused before any work (the
// calibration file does not even exist here: a late check would fail on it first), and an
// --out inside --report (whose report used to fail after the model was exported, leaving a
// complete --out) is refused up front with nothing left behind.
func TestPruneOutputsTogether(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	model := shared(t, "models/stories260K/stories260K.bin")
	for _, cmd := range []string{"prune", "run"} {
		out := filepath.Join(file, "out")
		_, err := runCLI(t, cmd, "--model", model, "--calib", filepath.Join(dir, "missing.jsonl"), "--num-prune", "1", "--out", out)
		if err == nil || !strings.Contains(err.Error(), out) {
			t.Errorf("%s --out below a file: %v, want an error naming %s before the calibration data is read", cmd, err, out)
		}
	}
	calib := shared(t, "data/stories260K/calib.jsonl")
	report := filepath.Join(dir, "report")
	out := filepath.Join(report, "model")
	_, err := runCLI(t, "prune", "--model", model, "--calib", calib, "--num-prune", "1", "--calib-windows", "4", "--seq-len", "64",
		"--out", out, "--report", report)
	if err == nil {
		t.Fatal("prune with --out inside --report succeeded")
	}
	for _, p := range []string{out, report} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("the failed prune left %s behind", p)
		}
	}
}

// signalDuring starts linearpatch with args, sends sig after delay and returns how long the
// process took to exit after the signal and its output. It fails the test when the
// process finished before the signal (the trial would test nothing) or exited 0.
func signalDuring(t *testing.T, sig syscall.Signal, delay time.Duration, args ...string) (time.Duration, string) {
	t.Helper()
	p := startProc(t, args[0], nil, args...)
	time.Sleep(delay)
	select {
	case err := <-p.done:
		p.done <- err
		t.Fatalf("%s finished before the signal (err %v): the trial tests nothing:\n%s", args[0], err, tail(p.out.String(), 2000))
	default:
	}
	sent := time.Now()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	err := p.wait(t, 120*time.Second)
	took := time.Since(sent)
	out := p.out.String()
	if err == nil {
		t.Fatalf("%s exited 0 after %v:\n%s", args[0], sig, tail(out, 2000))
	}
	return took, out
}

// wallTime runs linearpatch with args to completion and returns its wall time.
func wallTime(t *testing.T, args ...string) time.Duration {
	t.Helper()
	start := time.Now()
	if out, err := exec.Command(binPath, args...).CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", args, err, tail(string(out), 2000))
	}
	return time.Since(start)
}

// TestSignalStopsLongWork: SIGINT inside one long window (a 16-layer model, 2048 tokens:
// seconds here) and SIGTERM while tokenizing a large text file stop the process within
// about a layer's time; eval used to finish the window and exit 0 with its result, and
// tokenize to read the whole file first.
func TestSignalStopsLongWork(t *testing.T) {
	dir := t.TempDir()
	modelDir, data := filepath.Join(dir, "model"), filepath.Join(dir, "data.jsonl")
	if _, err := runCLI(t, "synth", "--out", modelDir, "--dim", "256", "--layers", "16", "--heads", "4", "--ffn", "1024",
		"--vocab", "256", "--max-seq", "4096", "--data", data, "--data-tokens", "4096"); err != nil {
		t.Fatal(err)
	}
	// The signal must land inside the window whatever the machine's speed: time the start
	// (a 16-token window) and the whole run, and signal a third into the window.
	eval := []string{"eval", "--model", modelDir, "--data", data, "--max-windows", "1"}
	startup := wallTime(t, append(eval, "--seq-len", "16")...)
	window := wallTime(t, append(eval, "--seq-len", "2048")...) - startup
	t.Logf("start-up %v, one 2048-token window %v", startup, window)
	if window < 200*time.Millisecond {
		t.Fatalf("the window takes only %v here: too short to signal inside it (make the model larger)", window)
	}
	took, out := signalDuring(t, syscall.SIGINT, startup+window/3, append(eval, "--seq-len", "2048")...)
	t.Logf("eval stopped %v after SIGINT", took)
	if limit := window/3 + time.Second; took > limit || !strings.Contains(out, "context canceled") {
		t.Errorf("eval took %v to stop after SIGINT inside a window (want < %v, with context canceled):\n%s", took, limit, tail(out, 2000))
	}

	text, err := os.ReadFile(shared(t, "data/tinystories/train.txt"))
	if err != nil {
		t.Fatal(err)
	}
	big := filepath.Join(dir, "big.txt")
	if err := os.WriteFile(big, bytes.Repeat(text, 20), 0o644); err != nil { // 40 MB: many seconds to tokenize anywhere
		t.Fatal(err)
	}
	took, out = signalDuring(t, syscall.SIGTERM, time.Second, "tokenize", "--model", shared(t, "models/tinystories-8L"), "--data", big)
	t.Logf("tokenize stopped %v after SIGTERM", took)
	if took > 4*time.Second || !strings.Contains(out, "context canceled") {
		t.Errorf("tokenize took %v to stop after SIGTERM (want < 4s, with context canceled):\n%s", took, tail(out, 2000))
	}
}

// terminate sends SIGTERM to p and waits for it to exit, failing when it takes more than
// a few seconds; it returns the exit error.
func terminate(t *testing.T, p *proc) error {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err := p.wait(t, 15*time.Second)
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("%s took %v to stop after SIGTERM", p.name, took)
	}
	return err
}

// TestGracefulSIGTERMEveryWorker sends SIGTERM to a teacher, the cache writer and the
// coordinator of a running distributed run, one after the other, restarting each: every
// process stops within seconds, and the restarted run completes with a cache bit-identical
// to a single-process run. Then the offline student, terminated mid-training, saves its
// step and resumes to a patch bit-identical to an uninterrupted student's.
func TestGracefulSIGTERMEveryWorker(t *testing.T) {
	// Slower windows than startSlowRun's, so that the run is still going at each signal
	// however loaded the machine is.
	fx := newPipelineFixture(t)
	ref := fx.reference(t)
	d := newDistributed(t, fx, "sigterm")
	d.startCoordinator()
	d.startCache()
	d.startTeacher(nil, "", "120ms")
	d.startTeacher(nil, "", "120ms")
	d.waitCacheShards(2)

	teacher := d.teachers[0]
	teacherErr := terminate(t, teacher)
	d.requireMidRun(ref, "a teacher was terminated")
	d.startTeacher(nil, "", "120ms")

	d.waitCacheShards(4)
	writer := d.cache
	writerErr := terminate(t, writer)
	d.requireMidRun(ref, "the cache writer was terminated")
	d.earlier = append(d.earlier, writer)
	d.startCache()

	d.waitCacheShards(6)
	d.requireMidRun(ref, "the coordinator was terminated")
	_ = terminate(t, d.coord)
	d.startCoordinator()
	d.finish(ref)
	for _, c := range []struct {
		p   *proc
		err error
	}{{teacher, teacherErr}, {writer, writerErr}} {
		if out := c.p.out.String(); c.err != nil || strings.Contains(out, "panic") {
			t.Errorf("%s did not stop cleanly after SIGTERM (%v):\n%s", c.p.name, c.err, tail(out, 2000))
		}
	}
	if out := teacher.out.String(); strings.LastIndex(out, "task started") > strings.LastIndex(out, "task acked") &&
		!strings.Contains(out, "interrupted by shutdown, nak") {
		t.Errorf("the terminated teacher neither finished nor released its shard:\n%s", tail(out, 2000))
	}

	// The offline student: terminated mid-training it checkpoints its step; resumed, it ends
	// bit-identical to an uninterrupted student.
	refDir := filepath.Join(d.fx.dir, "student-ref")
	copyRunDir(t, d.runDir, refDir)
	if _, err := runCLI(t, append([]string{"student", "--run-dir", refDir, "--out", filepath.Join(refDir, "out")}, studentArgs...)...); err != nil {
		t.Fatal(err)
	}
	want := readPatch(t, filepath.Join(refDir, "out"))
	dir := filepath.Join(d.fx.dir, "student-term")
	copyRunDir(t, d.runDir, dir)
	first := filepath.Join(dir, "first")
	p := startProc(t, "student", nil, append([]string{"student", "--run-dir", dir, "--out", first}, studentArgs...)...)
	waitFile(t, filepath.Join(dir, "student", "checkpoint.bin"), 30*time.Second)
	time.Sleep(150 * time.Millisecond)
	before := len(p.out.String())
	_ = terminate(t, p)
	if _, err := os.Stat(first); err == nil {
		t.Fatal("the student finished before SIGTERM: the trial tests nothing (make the run longer)")
	}
	// It stops at a step boundary and saves that step (Trainer.Run's abort; nothing to
	// save when the signal came right after a periodic checkpoint and cut the next step).
	if after := p.out.String()[before:]; !strings.Contains(after, "context canceled") || strings.Contains(after, "panic") {
		t.Errorf("the student did not stop on SIGTERM:\n%s", tail(after, 2000))
	} else if !strings.Contains(after, "checkpoint saved") {
		t.Logf("no checkpoint after SIGTERM (the last periodic one held the step):\n%s", tail(after, 1000))
	}
	resumed := filepath.Join(dir, "resumed")
	if _, err := runCLI(t, append([]string{"student", "--run-dir", dir, "--out", resumed, "--resume"}, studentArgs...)...); err != nil {
		t.Fatal(err)
	}
	got := readPatch(t, resumed)
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("element %d of the resumed patch is %v, uninterrupted %v", i, got[i], want[i])
		}
	}
}

// TestStudentHostilePlan: plan.json window counts that disagree with its own shard size,
// with its totals or with the cache manifest are refused before the training order is
// sized by them (1e12 and 3e8 windows used to allocate the shuffle first).
func TestStudentHostilePlan(t *testing.T) {
	fx := newPipelineFixture(t)
	runDir := cacheOnlyRun(t, fx)
	for _, c := range []struct {
		name string
		edit func(p map[string]any)
	}{
		{"1e12 windows", func(p map[string]any) {
			p["cache"].([]any)[0].(map[string]any)["windows"] = 1e12
		}},
		{"3e8 windows, consistent totals and shard size", func(p map[string]any) {
			p["cache"].([]any)[0].(map[string]any)["windows"] = 3e8
			p["train_windows"] = p["train_windows"].(float64) - 2 + 3e8
			p["settings"].(map[string]any)["shard_windows"] = 3e8
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := filepath.Join(fx.dir, strings.ReplaceAll(c.name, " ", "-"))
			copyRunDir(t, runDir, dir)
			path := filepath.Join(dir, protocol.PlanFile)
			var plan map[string]any
			readJSON(t, path, &plan)
			c.edit(plan)
			b, err := json.Marshal(plan)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, b, 0o644); err != nil {
				t.Fatal(err)
			}
			_, err = runCLI(t, append([]string{"student", "--run-dir", dir, "--out", filepath.Join(dir, "out")}, studentArgs...)...)
			t.Logf("%v", err)
			if err == nil || !strings.Contains(err.Error(), "windows") {
				t.Fatalf("student with a hostile plan: %v, want an error about its window counts", err)
			}
		})
	}
}
