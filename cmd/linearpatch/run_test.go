package main

import (
	"bytes"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"linearpatch/model"
	"linearpatch/worker"
)

// TestRunStatsMatchesPrune: the stats phase split over 2 teachers selects the same block
// and fits the same patch as prune's single pass (within 1e-6).
func TestRunStatsMatchesPrune(t *testing.T) {
	dir := t.TempDir()
	m := shared(t, "models/stories260K/stories260K.bin")
	calib := shared(t, "data/stories260K/calib.jsonl")
	for _, method := range []string{"rotate", "lstsq"} {
		t.Run(method, func(t *testing.T) {
			common := []string{"--model", m, "--calib", calib, "--num-prune", "1", "--method", method, "--json"}
			pruneOut := filepath.Join(dir, method, "prune")
			out, err := runCLI(t, append([]string{"prune", "--out", pruneOut}, common...)...)
			if err != nil {
				t.Fatal(err)
			}
			var pr pruneJSON
			lastJSON(t, out, &pr)
			runOut := filepath.Join(dir, method, "run")
			out, err = runCLI(t, append([]string{"run", "--out", runOut, "--teachers", "2", "--shard-windows", "16"}, common...)...)
			if err != nil {
				t.Fatal(err)
			}
			var rr struct{ Start, End int }
			lastJSON(t, out, &rr)
			if rr.Start != pr.Start || rr.End != pr.End {
				t.Fatalf("run selected [%d, %d), prune [%d, %d)", rr.Start, rr.End, pr.Start, pr.End)
			}
			a, b := readPatch(t, pruneOut), readPatch(t, runOut)
			worst := 0.0
			for i := range a {
				worst = math.Max(worst, math.Abs(float64(a[i]-b[i])))
			}
			if worst > 1e-6 {
				t.Fatalf("patches differ by up to %.3g", worst)
			}
		})
	}
}

func readPatch(t *testing.T, dir string) []float32 {
	t.Helper()
	f, err := model.OpenSafetensors(filepath.Join(dir, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p, _, err := f.ReadTensor(model.PatchTensorName)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestRunRefusesExistingOut: an existing --out is a clear error before any work.
func TestRunRefusesExistingOut(t *testing.T) {
	dir := t.TempDir()
	_, err := runCLI(t, "run", "--model", shared(t, "models/stories260K/stories260K.bin"), "--calib",
		shared(t, "data/stories260K/calib.jsonl"), "--num-prune", "1", "--out", dir)
	if err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("run into an existing --out: %v", err)
	}
}

// TestRunIdentity: a run is named by a random id kept in its run directory. The same run
// directory resumes the run; a new one starts a new run with a new id; resuming after a data
// file's contents changed is refused naming it; a run directory of an older version is
// refused naming the version.
func TestRunIdentity(t *testing.T) {
	fx := newPipelineFixture(t)
	runID := func(args ...string) string {
		t.Helper()
		out, err := runCLI(t, append(append([]string{"run"}, fx.settingsArgs()...), append(args, "--teachers", "1", "--distill=false", "--json")...)...)
		if err != nil {
			t.Fatal(err)
		}
		var r struct {
			RunID string `json:"run_id"`
		}
		lastJSON(t, out, &r)
		if r.RunID == "" {
			t.Fatalf("no run id in\n%s", out)
		}
		return r.RunID
	}
	rd1 := filepath.Join(fx.dir, "rd1")
	a := runID("--out", filepath.Join(fx.dir, "out1"), "--run-dir", rd1)
	if b := runID("--out", filepath.Join(fx.dir, "out1b"), "--run-dir", rd1); b != a {
		t.Errorf("the same run directory gave run %s, then %s", a, b)
	}
	if c := runID("--out", filepath.Join(fx.dir, "out2")); c == a {
		t.Errorf("a new run directory resumed run %s", a)
	}

	// Same path, other contents: refused, naming the training data.
	b, err := os.ReadFile(fx.train)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(fx.train, append(b, b[:bytes.IndexByte(b, '\n')+1]...), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = runCLI(t, append(append([]string{"run"}, fx.settingsArgs()...), "--out", filepath.Join(fx.dir, "out3"), "--run-dir", rd1, "--teachers", "1")...)
	if err == nil || !strings.Contains(err.Error(), "train_sha256") || !strings.Contains(err.Error(), a) {
		t.Errorf("resume with an edited --train: %v", err)
	}
	if err := os.WriteFile(fx.train, b, 0o644); err != nil {
		t.Fatal(err)
	}

	// A run directory written by the version that hashed settings into the run id.
	old := filepath.Join(fx.dir, "old.run")
	if err := os.MkdirAll(old, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, content := range map[string]string{"run.id": "r0123456789ab", "plan.json": `{"run_id": "r0123456789ab", "settings": {}}`} {
		if err := os.WriteFile(filepath.Join(old, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	_, err = runCLI(t, append(append([]string{"run"}, fx.settingsArgs()...), "--out", filepath.Join(fx.dir, "out4"), "--run-dir", old, "--teachers", "1")...)
	if err == nil || !strings.Contains(err.Error(), "version 1") {
		t.Errorf("an old run directory: %v", err)
	}
}

// TestRunResumeByID: on an external server, a run directory elsewhere resumes a run named by
// --run ID only with the run's inputs and settings; an unknown id is refused.
func TestRunResumeByID(t *testing.T) {
	fx := newPipelineFixture(t)
	srv, err := worker.StartEmbedded(t.Context(), t.TempDir(), worker.WithAllowAnonymous())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Shutdown)
	run := func(args ...string) (string, error) {
		return runCLI(t, append(append([]string{"run", "--nats", srv.URL()}, fx.settingsArgs()...), append(args, "--teachers", "1", "--distill=false", "--json")...)...)
	}
	idOf := func(out string) string {
		var r struct {
			RunID string `json:"run_id"`
		}
		lastJSON(t, out, &r)
		return r.RunID
	}
	out, err := run("--out", filepath.Join(fx.dir, "o1"), "--run-dir", filepath.Join(fx.dir, "rd1"))
	if err != nil {
		t.Fatal(err)
	}
	a := idOf(out)

	b, err := os.ReadFile(fx.train)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(fx.train, append(b, b[:bytes.IndexByte(b, '\n')+1]...), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = run("--out", filepath.Join(fx.dir, "o2"), "--run-dir", filepath.Join(fx.dir, "rd2"), "--run", a)
	if err == nil || !strings.Contains(err.Error(), "train_sha256") {
		t.Errorf("--run %s with an edited --train: %v", a, err)
	}
	if err := os.WriteFile(fx.train, b, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err = run("--out", filepath.Join(fx.dir, "o3"), "--run-dir", filepath.Join(fx.dir, "rd3"), "--run", a)
	if err != nil {
		t.Fatalf("--run %s with the run's inputs: %v", a, err)
	}
	if got := idOf(out); got != a {
		t.Errorf("--run %s resumed run %s", a, got)
	}
	_, err = run("--out", filepath.Join(fx.dir, "o4"), "--run-dir", filepath.Join(fx.dir, "rd4"), "--run", "r000000000000000000000000")
	if err == nil || !strings.Contains(err.Error(), "no such run") {
		t.Errorf("--run of an unknown id: %v", err)
	}
	if _, err := os.Stat(filepath.Join(fx.dir, "rd4", "run.id")); !os.IsNotExist(err) {
		t.Errorf("the refused run directory holds a run id (%v)", err)
	}
}
