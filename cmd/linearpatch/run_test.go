package main

import (
	"math"
	"path/filepath"
	"strings"
	"testing"

	"linearpatch/model"
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
