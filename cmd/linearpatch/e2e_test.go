package main

import (
	"bytes"
	"context"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"linearpatch/model"
	"linearpatch/patch"
	"linearpatch/protocol"
	"linearpatch/shards"
)

// End-to-end runs of the paths users take beyond the defaults, on the small synthetic model
// of the process tests, through the real pipeline: the embedded NATS server, teachers
// computing the records, the cache writer, the student and the export.

// runE2E runs `run` on fx with extra flags, into fx.dir/name; it returns the output and run
// directories and the JSON result.
func (fx pipelineFixture) runE2E(t *testing.T, name string, extra ...string) (out, runDir string, res runResult) {
	t.Helper()
	out, runDir = filepath.Join(fx.dir, name, "out"), filepath.Join(fx.dir, name, "run")
	args := append(append([]string{"run"}, fx.settingsArgs()...), "--out", out, "--run-dir", runDir, "--teachers", "2", "--json")
	stdout, err := runCLI(t, append(args, extra...)...)
	if err != nil {
		t.Fatalf("run %v: %v\n%s", extra, err, tail(stdout, 3000))
	}
	lastJSON(t, stdout, &res)
	return out, runDir, res
}

// checkCacheAgainstModel opens every shard of the run's cache and compares the first row of
// each window (its tokens start the window, so attention sees all it needs) with the
// original model's hidden states: X_Start for x_cut and, when the cache has it, X_L for
// x_final, within tol relative to the row's largest magnitude. It returns the manifest.
func checkCacheAgainstModel(t *testing.T, runDir, modelPath string, tol float64) *shards.Manifest {
	t.Helper()
	dir := filepath.Join(runDir, "cache")
	mf, err := shards.LoadManifest(filepath.Join(dir, "manifest.json"))
	if err != nil {
		t.Fatal(err)
	}
	m, err := model.Load(modelPath)
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, e := range mf.Shards {
		r, err := shards.OpenShardFile(e.Path(dir), mf.Meta, e.SHA256)
		if err != nil {
			t.Fatalf("shard %d: %v", e.Shard, err)
		}
		for i := range r.Rows() {
			c, err := r.Row(i)
			if err != nil {
				t.Fatalf("shard %d row %d: %v", e.Shard, i, err)
			}
			if c.TokenLo != 0 {
				continue
			}
			if mf.Meta.Final != (c.XFinal != nil) {
				t.Fatalf("shard %d: meta final %v, row has x_final %v", e.Shard, mf.Meta.Final, c.XFinal != nil)
			}
			ids := make([]int, len(c.InputIDs))
			for j, id := range c.InputIDs {
				ids[j] = int(id)
			}
			hs := m.HiddenStates([][]int{ids}, []int{mf.Meta.Start, m.Config.Layers})
			compare := func(what string, got []float32, want []float32) {
				scale := 0.0
				for _, v := range want {
					scale = max(scale, math.Abs(float64(v)))
				}
				for j := range want {
					if d := math.Abs(float64(got[j]) - float64(want[j])); d > tol*scale {
						t.Fatalf("shard %d window %d: %s[%d] = %v, the model gives %v (tolerance %g of %g)", e.Shard, c.Window, what, j, got[j], want[j], tol, scale)
					}
				}
			}
			compare("x_cut", c.XCut, hs[mf.Meta.Start].Data)
			if mf.Meta.Final {
				compare("x_final", c.XFinal, hs[m.Config.Layers].Data)
			}
			checked++
		}
		r.Close()
	}
	if checked == 0 {
		t.Fatal("no cache row was checked")
	}
	return mf
}

// checkExport reloads the exported model and evaluates it through the CLI: the perplexity
// is the in-memory pruned model's, and linearpatch.json names the method and, for a patch
// from rotate, the Hadamard construction.
func checkExport(t *testing.T, fx pipelineFixture, out, method, initMethod string) patch.Record {
	t.Helper()
	rec, err := patch.ReadRecord(out)
	if err != nil {
		t.Fatal(err)
	}
	if rec.Method != method || rec.InitMethod != initMethod {
		t.Fatalf("linearpatch.json: method %q from %q, want %q from %q", rec.Method, rec.InitMethod, method, initMethod)
	}
	if (method == "rotate" || initMethod == "rotate") != (rec.Hadamard != "") || rec.Hadamard != "" && !strings.HasPrefix(rec.Hadamard, "S_64/√64") {
		t.Fatalf("linearpatch.json hadamard %q for %s from %q", rec.Hadamard, method, initMethod)
	}
	got, err := model.Load(out)
	if err != nil {
		t.Fatalf("reloading the export: %v", err)
	}
	orig, err := model.Load(fx.model)
	if err != nil {
		t.Fatal(err)
	}
	if got.Config.Layers != orig.Config.Layers-rec.NumPrune || (rec.PatchTensor != "") != (got.Patch != nil) {
		t.Fatalf("export has %d layers (original %d, %d pruned), patch %v", got.Config.Layers, orig.Config.Layers, rec.NumPrune, got.Patch != nil)
	}
	var P = got.Patch
	pruned := orig.Pruned(rec.Start, rec.End, nil)
	if P != nil {
		pruned = orig.Pruned(rec.Start, rec.End, P.P)
	}
	stream, err := model.ReadTokenStream(fx.train, nil, orig.Vocab)
	if err != nil {
		t.Fatal(err)
	}
	want, err := pruned.EvalPerplexity(context.Background(), model.Windows(stream, 32, 8), nil)
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := runCLI(t, "eval", "--model", out, "--data", fx.train, "--seq-len", "32", "--max-windows", "8", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var ev struct{ PPL float64 }
	lastJSON(t, stdout, &ev)
	if math.IsNaN(ev.PPL) || relDiff(ev.PPL, want.PPL) > 1e-5 {
		t.Fatalf("the reloaded export's perplexity %v, the in-memory pruned model's %v", ev.PPL, want.PPL)
	}
	return rec
}

// TestRunCacheFinalLosses: --cache-final through real teachers caches X_L (checked against
// the model), and the student trains end to end on --loss full-kl (and mse) from it.
func TestRunCacheFinalLosses(t *testing.T) {
	fx := newPipelineFixture(t)
	losses := []string{"full-kl", "mse"}
	if testing.Short() {
		losses = losses[:1]
	}
	for _, loss := range losses {
		t.Run(loss, func(t *testing.T) {
			out, runDir, res := fx.runE2E(t, loss, "--cache-final", "--loss", loss)
			mf := checkCacheAgainstModel(t, runDir, fx.model, 1e-3)
			if !mf.Meta.Final {
				t.Fatal("the cache has no x_final")
			}
			if res.KD == nil || res.KD.Steps == 0 || math.IsNaN(res.KD.FinalValid) || math.IsInf(res.KD.FinalValid, 0) {
				t.Fatalf("student: %+v", res.KD)
			}
			rec := checkExport(t, fx, out, "kd", "rotate")
			kd, _ := rec.Extra["kd"].(map[string]any)
			cfg, _ := kd["config"].(map[string]any)
			if cfg["loss"] != loss {
				t.Fatalf("linearpatch.json records loss %v, want %s", cfg["loss"], loss)
			}
		})
	}
}

// TestRunActDTypeCompression: --act-dtype and --compression reach the cache files through
// the pipeline: the manifest says the dtype, the activations match the model within the
// dtype's precision, the files carry the codec's frames (none: no frame at all), and the
// student reads them.
func TestRunActDTypeCompression(t *testing.T) {
	fx := newPipelineFixture(t)
	lz4Frame, zstdFrame := []byte{0x04, 0x22, 0x4d, 0x18}, []byte{0x28, 0xb5, 0x2f, 0xfd}
	cases := []struct {
		dtype, comp string
		tol         float64
	}{{"bfloat16", "lz4", 1.0 / 64}, {"float32", "none", 1e-5}}
	if testing.Short() {
		cases = cases[:1]
	}
	for _, c := range cases {
		t.Run(c.dtype+"-"+c.comp, func(t *testing.T) {
			_, runDir, res := fx.runE2E(t, c.dtype, "--act-dtype", c.dtype, "--compression", c.comp)
			mf := checkCacheAgainstModel(t, runDir, fx.model, c.tol)
			if string(mf.Meta.ActDType) != c.dtype || res.Cache == nil || res.Cache.ActDType != c.dtype {
				t.Fatalf("cache dtype %s (summary %+v), want %s", mf.Meta.ActDType, res.Cache, c.dtype)
			}
			if res.KD == nil || res.KD.Steps == 0 {
				t.Fatalf("the student did not train on the %s cache: %+v", c.dtype, res.KD)
			}
			for _, e := range mf.Shards {
				b, err := os.ReadFile(e.Path(filepath.Join(runDir, "cache")))
				if err != nil {
					t.Fatal(err)
				}
				hasLZ4, hasZstd := bytes.Contains(b, lz4Frame), bytes.Contains(b, zstdFrame)
				if c.comp == "lz4" && (!hasLZ4 || hasZstd) || c.comp == "none" && (hasLZ4 || hasZstd) {
					t.Fatalf("shard %d with --compression %s: lz4 frames %v, zstd frames %v", e.Shard, c.comp, hasLZ4, hasZstd)
				}
			}
		})
	}
}

// TestEarlyStopExportsBest: with a learning rate so large that training only hurts, the
// best validation loss is P0's (step 0) and --early-stop exports P0 — not the last patch.
func TestEarlyStopExportsBest(t *testing.T) {
	fx := newPipelineFixture(t)
	out, runDir, res := fx.runE2E(t, "earlystop", "--early-stop", "1", "--epochs", "3", "--lr", "10")
	if res.KD == nil || res.KD.Steps == 0 {
		t.Fatalf("student: %+v", res.KD)
	}
	_, _, p0, err := protocol.ReadRunDir(runDir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := model.Load(out)
	if err != nil {
		t.Fatal(err)
	}
	if got.Patch == nil || !slices.Equal(got.Patch.P.Data, p0) {
		t.Fatal("the exported patch is not the best one (P0, at step 0): --early-stop exported another")
	}
	rec, err := patch.ReadRecord(out)
	if err != nil {
		t.Fatal(err)
	}
	kd, _ := rec.Extra["kd"].(map[string]any)
	exported, _ := kd["exported"].(map[string]any)
	if exported == nil || exported["step"] != float64(0) {
		t.Fatalf("linearpatch.json does not record the exported step 0: %v", kd)
	}
}

// TestAllowEdgesExportReload: --allow-edges lets prune and run cut a block that touches an
// edge of the model (3 of 4 layers), and the export reloads and evaluates as the in-memory
// pruned model.
func TestAllowEdgesExportReload(t *testing.T) {
	fx := newPipelineFixture(t)
	out := filepath.Join(fx.dir, "edges-prune")
	args := []string{"prune", "--model", fx.model, "--calib", fx.calib, "--num-prune", "3", "--seq-len", "32", "--calib-windows", "8", "--out", out}
	if _, err := runCLI(t, args...); err == nil || !strings.Contains(err.Error(), "allow-edges") {
		t.Fatalf("prune of 3 of 4 layers without --allow-edges: %v", err)
	}
	if _, err := runCLI(t, append(args, "--allow-edges")...); err != nil {
		t.Fatal(err)
	}
	rec := checkExport(t, fx, out, "rotate", "")
	if rec.Start != 0 && rec.End != 4 {
		t.Fatalf("block [%d, %d) touches no edge", rec.Start, rec.End)
	}
	if testing.Short() {
		return
	}
	runOut, _, res := fx.runE2E(t, "edges-run", "--num-prune", "3", "--allow-edges", "--distill=false")
	if res.End-res.Start != 3 {
		t.Fatalf("run cut [%d, %d)", res.Start, res.End)
	}
	checkExport(t, fx, runOut, "rotate", "")
}
