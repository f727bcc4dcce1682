package main

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"linearpatch/model"
)

// cacheOnlyRun makes a run directory with a complete cache and no student.
func cacheOnlyRun(t *testing.T, fx pipelineFixture) string {
	t.Helper()
	runDir := filepath.Join(fx.dir, "cacheonly", "run")
	args := append(append([]string{"run"}, fx.settingsArgs()...), "--out", filepath.Join(fx.dir, "cacheonly", "out"),
		"--run-dir", runDir, "--teachers", "2", "--distill=false")
	if _, err := runCLI(t, args...); err != nil {
		t.Fatal(err)
	}
	return runDir
}

// copyRunDir copies what the offline student reads from a run directory.
func copyRunDir(t *testing.T, src, dst string) {
	t.Helper()
	err := filepath.Walk(src, func(path string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		if rel == "nats" || rel == "student" {
			return filepath.SkipDir
		}
		target := filepath.Join(dst, rel)
		if info.IsDir() {
			return os.MkdirAll(target, 0o755)
		}
		return copyFile(path, target)
	})
	if err != nil {
		t.Fatal(err)
	}
}

var studentArgs = []string{"--epochs", "40", "--checkpoint-every", "7", "--lr", "1e-3"}

// TestStudentKillResume kills the student process at random moments (10 seeded trials) and
// resumes it: the final patch is bit-identical to an uninterrupted run's.
func TestStudentKillResume(t *testing.T) {
	fx := newPipelineFixture(t)
	runDir := cacheOnlyRun(t, fx)
	refDir := filepath.Join(fx.dir, "ref-student")
	copyRunDir(t, runDir, refDir)
	if _, err := runCLI(t, append([]string{"student", "--run-dir", refDir, "--out", filepath.Join(refDir, "out")}, studentArgs...)...); err != nil {
		t.Fatal(err)
	}
	want := readPatch(t, filepath.Join(refDir, "out"))
	trials := 10
	if testing.Short() {
		trials = 3
	}
	for seed := range trials {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(seed), 5))
			dir := filepath.Join(fx.dir, fmt.Sprint("student-trial", seed))
			copyRunDir(t, runDir, dir)
			first := filepath.Join(dir, "first")
			p := startProc(t, "student", nil, append([]string{"student", "--run-dir", dir, "--out", first}, studentArgs...)...)
			waitFile(t, filepath.Join(dir, "student", "checkpoint.bin"), 30*time.Second)
			time.Sleep(time.Duration(rng.IntN(400)) * time.Millisecond)
			p.kill()
			_ = p.wait(t, 10*time.Second)
			if _, err := os.Stat(first); err == nil {
				t.Fatal("the student finished before it was killed: the trial tests nothing (make the run longer)")
			}
			out := filepath.Join(dir, "resumed")
			if _, err := runCLI(t, append([]string{"student", "--run-dir", dir, "--out", out, "--resume"}, studentArgs...)...); err != nil {
				t.Fatal(err)
			}
			got := readPatch(t, out)
			for i := range want {
				if got[i] != want[i] {
					t.Fatalf("element %d of the resumed patch is %v, uninterrupted %v", i, got[i], want[i])
				}
			}
		})
	}
	// Resuming with other settings is refused.
	if _, err := runCLI(t, "student", "--run-dir", refDir, "--out", filepath.Join(refDir, "other"), "--resume", "--epochs", "40", "--checkpoint-every", "7", "--lr", "5e-4"); err == nil {
		t.Fatal("a resume with another learning rate was accepted")
	}
}

// TestStudentLoadsOnlySuffix: the student's loader reads no tensor of the layers before the cut.
func TestStudentLoadsOnlySuffix(t *testing.T) {
	path := shared(t, "models/tinystories-8L")
	var read []string
	if _, err := model.Load(path, model.WithLayers(5, 8), model.WithoutEmbeddings(), model.WithReadLog(&read)); err != nil {
		t.Fatal(err)
	}
	if len(read) == 0 {
		t.Fatal("nothing read")
	}
	if bad := prefixTensors(read, 5, false); len(bad) > 0 {
		t.Fatalf("prefix tensors read: %v", bad)
	}
	if bad := prefixTensors([]string{"model.layers.4.mlp.up_proj.weight", "model.embed_tokens.weight"}, 5, false); len(bad) != 2 {
		t.Fatalf("prefixTensors missed prefix names: %v", bad)
	}
}

// TestKDGolden distills tinystories-8L end to end (run: stats → cache → student → export)
// and checks the distilled patch against the reference: below the training-free rotate
// patch and within 2% of golden/tinystories-8L-kd.json.
func TestKDGolden(t *testing.T) {
	if testing.Short() {
		t.Skip("a full distillation epoch (2510 steps): the OpenBLAS build runs it")
	}
	var g struct {
		PPL struct{ Rotate, KD float64 } `json:"ppl_valid"`
	}
	readJSON(t, shared(t, "golden/tinystories-8L-kd.json"), &g)
	dir := t.TempDir()
	out, err := runCLI(t, "run", "--model", shared(t, "models/tinystories-8L"), "--calib", shared(t, "data/tinystories/train.txt"),
		"--train", shared(t, "data/tinystories/train.txt"), "--num-prune", "2", "--eval", shared(t, "data/tinystories/valid.txt"),
		"--out", filepath.Join(dir, "out"), "--json")
	if err != nil {
		t.Fatal(err)
	}
	var res struct {
		PPL map[string]float64 `json:"ppl"`
	}
	lastJSON(t, out, &res)
	kd, rotate := res.PPL["kd"], res.PPL["rotate"]
	t.Logf("rotate %.4f (golden %.4f), kd %.4f (golden %.4f)", rotate, g.PPL.Rotate, kd, g.PPL.KD)
	if !(kd < rotate) {
		t.Errorf("distilled perplexity %.4f is not below the training-free rotate patch's %.4f", kd, rotate)
	}
	if relDiff(kd, g.PPL.KD) > 0.02 {
		t.Errorf("distilled perplexity %.4f, golden %.4f (more than 2%% apart)", kd, g.PPL.KD)
	}
	ev, err := runCLI(t, "eval", "--model", filepath.Join(dir, "out"), "--data", shared(t, "data/tinystories/valid.txt"), "--json")
	if err != nil {
		t.Fatal(err)
	}
	var e struct{ PPL float64 }
	lastJSON(t, ev, &e)
	if relDiff(e.PPL, kd) > 1e-5 {
		t.Errorf("the exported kd model evaluates to %.6f, in memory %.6f", e.PPL, kd)
	}
}
