package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"linearpatch/cache"
	"linearpatch/coordinator"
	"linearpatch/model"
	"linearpatch/model/tensor"
	"linearpatch/patch"
	"linearpatch/shards"
	"linearpatch/student"
	"linearpatch/teacher"
	"linearpatch/worker"
)

func newRunCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "run --model PATH --calib FILE --train FILE --num-prune n --out DIR",
		Short: "Run the whole pipeline: stats → training-free patch → activation cache (→ student) → export",
		Long: `Run the pipeline in one process: an embedded NATS server (or --nats), the coordinator,
--teachers teacher workers and the cache writer. The stats phase computes the calibration
statistics of prune over the same windows, sharded over the teachers, and fits the
training-free patch; the cache phase stores, for every window of --train, the hidden state
entering the cut and the teacher's top-k targets as Arrow shard files; the student starts
once the patch is fitted and distills it from the shards as they land (--distill=false
skips it); the pruned model with the distilled (or training-free) patch is exported to
--out. Flags mirror prune.

State lives in --run-dir (default: DIR.run): re-running the same command resumes the run
from its shard checkpoints.`,
		Args: cobra.NoArgs,
		RunE: runRun,
	}
	addPruneFlags(cmd)
	addRunFlags(cmd)
	addNATSFlags(cmd)
	addStudentFlags(cmd)
	cmd.Flags().Bool("distill", true, "distill the patch from the cache (the student stage) and export the kd model")
	cmd.Flags().Int("teachers", 2, "teacher workers in this process (0: rely on external `linearpatch teacher` processes)")
	return cmd
}

func newCoordinatorCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "coordinator --model PATH --calib FILE --train FILE --num-prune n --out DIR [--nats URL]",
		Short: "Plan a run and drive it; teachers and the cache writer run as separate processes",
		Long: `The coordinator of run, alone: it plans the run (or resumes it from the KV bucket),
publishes shard tasks, merges the stats phase's statistics into the training-free patch,
tracks progress and exports the result to --out. Start ` + "`linearpatch teacher`" + ` processes (on
any machine that reaches NATS) and one ` + "`linearpatch cache`" + ` process beside it. Without --nats
it embeds the NATS server, listening on --nats-listen (use 0.0.0.0:4222 for other machines).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := resolve(cmd)
			if err != nil {
				return err
			}
			return runPipeline(cmd, s, 0, false)
		},
	}
	addPruneFlags(cmd)
	addRunFlags(cmd)
	addNATSFlags(cmd)
	return cmd
}

// addRunFlags declares the pipeline settings shared by run and coordinator.
func addRunFlags(cmd *cobra.Command) {
	f := cmd.Flags()
	f.String("train", "", "distillation data: text or JSON Lines (the last 5% of its windows are held out for validation)")
	f.Int("shard-windows", 32, "windows per shard")
	f.Int("top-k", 50, "teacher top-k targets per token")
	f.String("act-dtype", "float16", "cached activation dtype: float16, bfloat16 or float32")
	f.Bool("cache-final", false, "also cache the last layer's output X_L (for full-kl and mse losses)")
	f.String("compression", "zstd", "shard file compression: zstd, lz4 or none")
	f.String("run-dir", "", "run state directory (default: --out with .run appended)")
	f.Duration("lease", 30*time.Second, "a shard counts as leased this long after its teacher's last report")
}

// runSetup is what run and coordinator share: the resolved spec, the model's config, the
// plan and the run directory.
type runSetup struct {
	spec   pruneSpec
	cfg    model.Config
	plan   *coordinator.Plan
	calib  []int
	train  []int
	runDir string
}

func prepareRun(s settings) (*runSetup, error) {
	spec, err := pruneSpecFrom(s)
	if err != nil {
		return nil, err
	}
	if spec.all {
		return nil, errors.New("--method all is for prune; run distills one patch: choose rotate, diag, lstsq or none")
	}
	if _, err := shards.ParseDType(s.str("act-dtype")); err != nil {
		return nil, err
	}
	if _, err := shards.ParseCompression(s.str("compression")); err != nil {
		return nil, err
	}
	cfg, err := model.ReadModelConfig(spec.modelPath)
	if err != nil {
		return nil, err
	}
	L := cfg.Layers
	if spec.numPrune >= L-1 && !spec.allowEdges || spec.numPrune >= L {
		return nil, fmt.Errorf("--num-prune %d: the model has %d layers; at most %d can be pruned (%d with --allow-edges)", spec.numPrune, L, max(L-2, 0), L-1)
	}
	if teacher.NeedsGram(string(spec.methods[0])) {
		if gb := int64(L-spec.numPrune+1) * 2 * int64(cfg.Dim) * int64(cfg.Dim) * 8; gb > 1<<30 {
			return nil, fmt.Errorf("--method lstsq: the Gram sums of every candidate block need %d MiB; use prune for this model", gb>>20)
		}
	}
	if string(spec.methods[0]) == string(patch.MethodRotate) && !patch.SupportedHadamard(cfg.Dim) {
		_, err := patch.NewHadamard(cfg.Dim)
		return nil, err
	}
	fp, err := model.Fingerprint(spec.modelPath)
	if err != nil {
		return nil, err
	}
	calib, err := loadStream(spec.modelPath, spec.calib, cfg.Vocab)
	if err != nil {
		return nil, err
	}
	var train []int
	if s.str("train") != "" {
		if train, err = loadStream(spec.modelPath, s.str("train"), cfg.Vocab); err != nil {
			return nil, err
		}
	}
	set := coordinator.Settings{
		Model: spec.modelPath, Fingerprint: fp, Calib: spec.calib, CalibWindows: spec.calibWindows, Train: s.str("train"),
		SeqLen: spec.seqLen, NumPrune: spec.numPrune, Method: string(spec.methods[0]), Ridge: spec.ridge,
		AllowEdges: spec.allowEdges, ShardWindows: s.num("shard-windows"), TopK: s.num("top-k"),
		ActDType: s.str("act-dtype"), CacheFinal: s.flag("cache-final"), ValidFrac: 0.05,
	}
	if set.TopK > cfg.Vocab {
		return nil, fmt.Errorf("--top-k %d exceeds the vocabulary (%d)", set.TopK, cfg.Vocab)
	}
	plan, err := coordinator.NewPlan(set, len(calib)/spec.seqLen, len(train)/spec.seqLen)
	if err != nil {
		return nil, err
	}
	runDir := s.str("run-dir")
	if runDir == "" {
		runDir = strings.TrimSuffix(filepath.Clean(spec.out), "/") + ".run"
	}
	if err := os.MkdirAll(runDir, 0o755); err != nil {
		return nil, err
	}
	if b, err := os.ReadFile(filepath.Join(runDir, "run.id")); err == nil && strings.TrimSpace(string(b)) != plan.RunID {
		return nil, fmt.Errorf("%s holds run %s; these settings make run %s: use another --run-dir (or --out)", runDir, strings.TrimSpace(string(b)), plan.RunID)
	}
	if err := os.WriteFile(filepath.Join(runDir, "run.id"), []byte(plan.RunID), 0o644); err != nil {
		return nil, err
	}
	if err := coordinator.WritePlan(runDir, plan); err != nil {
		return nil, err
	}
	return &runSetup{spec: spec, cfg: cfg, plan: plan, calib: calib, train: train, runDir: runDir}, nil
}

// publishPlan stores the plan and the token streams (first run) or checks that the stored
// plan is this one (resume).
func publishPlan(ctx context.Context, js jetstream.JetStream, names worker.Names, rs *runSetup) error {
	kv, err := js.KeyValue(ctx, names.KVBucket())
	if err != nil {
		return err
	}
	b, _ := json.Marshal(rs.plan)
	if e, err := kv.Get(ctx, coordinator.KeyPlan); err == nil {
		var stored coordinator.Plan
		if err := json.Unmarshal(e.Value(), &stored); err != nil {
			return fmt.Errorf("stored plan: %w", err)
		}
		if stored.RunID != rs.plan.RunID {
			return fmt.Errorf("the run directory holds run %s, these settings make run %s: use another --run-dir", stored.RunID, rs.plan.RunID)
		}
		slog.Info("resuming run", "run", rs.plan.RunID)
		return nil
	}
	obj, err := js.ObjectStore(ctx, names.ObjectStore())
	if err != nil {
		return err
	}
	if _, err := obj.PutBytes(ctx, coordinator.ObjCalibTokens, coordinator.EncodeInt32s(rs.calib)); err != nil {
		return err
	}
	if rs.train != nil {
		if _, err := obj.PutBytes(ctx, coordinator.ObjTrainTokens, coordinator.EncodeInt32s(rs.train)); err != nil {
			return err
		}
	}
	if _, err := kv.Create(ctx, coordinator.KeyPlan, b); err != nil && !errors.Is(err, jetstream.ErrKeyExists) {
		return err
	}
	slog.Info("new run", "run", rs.plan.RunID, "stats_shards", len(rs.plan.Stats), "cache_shards", len(rs.plan.Cache),
		"train_windows", rs.plan.TrainWindows, "valid_windows", rs.plan.ValidWindows)
	return nil
}

// runResult is run's JSON output.
type runResult struct {
	RunID  string             `json:"run_id"`
	RunDir string             `json:"run_dir"`
	Start  int                `json:"start"`
	End    int                `json:"end"`
	Method string             `json:"method"`
	Cosine []float64          `json:"cosine"`
	Scale  []float64          `json:"scale,omitempty"`
	Out    string             `json:"out"`
	Cache  *cacheSummary      `json:"cache,omitempty"`
	KD     *kdSummary         `json:"kd,omitempty"`
	PPL    map[string]float64 `json:"ppl,omitempty"`
	Secs   float64            `json:"seconds"`
}

type kdSummary struct {
	Steps      int     `json:"steps"`
	Tokens     int64   `json:"tokens"`
	FinalValid float64 `json:"final_valid_loss"`
	Seconds    float64 `json:"seconds"`
	Curve      string  `json:"curve"`
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o644)
}

type cacheSummary struct {
	Dir           string  `json:"dir"`
	Shards        int     `json:"shards"`
	Windows       int     `json:"windows"`
	Tokens        int     `json:"tokens"`
	Bytes         int64   `json:"bytes"`
	BytesPerToken float64 `json:"bytes_per_token"`
	TrainWindows  int     `json:"train_windows"`
	ValidWindows  int     `json:"valid_windows"`
	ActDType      string  `json:"act_dtype"`
	TopK          int     `json:"top_k"`
}

func runRun(cmd *cobra.Command, _ []string) error {
	s, err := resolve(cmd)
	if err != nil {
		return err
	}
	return runPipeline(cmd, s, s.num("teachers"), true)
}

// runPipeline drives a run with nTeachers in-process teachers and, when withWriter, the
// cache writer in-process.
func runPipeline(cmd *cobra.Command, s settings, nTeachers int, withWriter bool) error {
	began := time.Now()
	rs, err := prepareRun(s)
	if err != nil {
		return err
	}
	ctx := cmd.Context()
	conn, err := connectNATS(ctx, s, rs.runDir, true, "linearpatch-run")
	if err != nil {
		return err
	}
	defer conn.Close()
	names, err := worker.NewNames(rs.plan.RunID)
	if err != nil {
		return err
	}
	if err := worker.Setup(ctx, conn.js, names, streamConfig(s)); err != nil {
		return err
	}
	if err := publishPlan(ctx, conn.js, names, rs); err != nil {
		return err
	}

	var m *model.Model
	if nTeachers < 0 {
		return errors.New("--teachers must be ≥ 0")
	}
	if nTeachers > 0 {
		if m, err = model.Load(rs.spec.modelPath); err != nil {
			return err
		}
	}
	var fit coordinator.FitResult
	copts := coordinator.Options{Plan: rs.plan, NC: conn.nc, JS: conn.js, Names: names,
		RunDir: rs.runDir, Lease: s.v.GetDuration("lease"), OnFit: func(f coordinator.FitResult) { fit = f }}
	// The student starts as soon as the patch is fitted and trains on shards as they land;
	// the coordinator's student phase waits for it.
	distilling := withWriter && rs.plan.TrainWindows > 0 && s.flag("distill")
	var trainCfg student.TrainConfig
	studentDone := make(chan error, 1)
	var kd *distillResult
	if distilling {
		if trainCfg, err = trainConfig(s, rs.plan.Settings.TopK); err != nil {
			return err
		}
		obj, err := conn.js.ObjectStore(ctx, names.ObjectStore())
		if err != nil {
			return err
		}
		copts.OnFit = func(f coordinator.FitResult) {
			fit = f
			go func() {
				plan, fitted, p0, err := coordinator.ReadRunDir(rs.runDir)
				if err == nil {
					kd, err = distill(ctx, distillSpec{runDir: rs.runDir, modelPath: rs.spec.modelPath, plan: plan, fit: *fitted,
						p0: p0, cfg: trainCfg, resume: true, mirror: obj, log: slog.Default()})
				}
				studentDone <- err
			}()
		}
		copts.Student = func(ctx context.Context) error {
			select {
			case err := <-studentDone:
				return err
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	coord, err := coordinator.New(copts, rs.cfg.Dim, rs.cfg.Vocab)
	if err != nil {
		return err
	}
	writer, err := cache.NewWriter(cache.Options{JS: conn.js, Names: names, Dir: filepath.Join(rs.runDir, "cache"),
		Compression: shards.Compression(s.str("compression")), Dim: rs.cfg.Dim, Vocab: rs.cfg.Vocab})
	if err != nil {
		return err
	}

	bg, bgctx := errgroup.WithContext(ctx)
	workCtx, stopWork := context.WithCancel(bgctx)
	defer stopWork()
	for i := range nTeachers {
		comp, err := teacher.NewCompute(m)
		if err != nil {
			return err
		}
		tw, err := teacher.NewWorker(teacher.Options{Name: fmt.Sprintf("local-%d", i), NC: conn.nc, JS: conn.js, Names: names,
			Compute: comp, Stream: streamConfig(s)})
		if err != nil {
			return err
		}
		bg.Go(func() error { return ignoreCanceled(tw.Run(workCtx)) })
	}
	if rs.plan.Cache != nil && withWriter {
		bg.Go(func() error { return ignoreCanceled(writer.Run(workCtx)) })
	}
	bar := newPhaseBars(coord, rs.plan)
	bg.Go(func() error { bar.run(workCtx); return nil })
	runErr := coord.Run(bgctx)
	stopWork()
	if err := bg.Wait(); err != nil && runErr == nil {
		runErr = err
	}
	bar.finish()
	if runErr != nil {
		return runErr
	}

	res := runResult{RunID: rs.plan.RunID, RunDir: rs.runDir, Start: fit.Start, End: fit.End, Method: fit.Method,
		Cosine: fit.Cosine, Scale: fit.Scale, Out: rs.spec.out}
	if rs.plan.Cache != nil {
		if mf, err := shards.LoadManifest(filepath.Join(rs.runDir, "cache", cache.ManifestFile)); err == nil {
			res.Cache = summarize(mf, filepath.Join(rs.runDir, "cache"), rs.plan)
		}
	}
	if m == nil {
		if m, err = model.Load(rs.spec.modelPath); err != nil {
			return err
		}
	}
	p0, err := loadPatch0(ctx, conn.js, names, fit, m.Dim)
	if err != nil {
		return err
	}
	variants := []patch.Variant{{Name: string(patch.MethodNone)}}
	if fit.Method != string(patch.MethodNone) {
		variants = append(variants, patch.Variant{Name: fit.Method, P: p0})
	}
	chosen := p0
	var extra []string
	if kd != nil {
		if err := exportPatched(rs, fit, m, kd.P, "kd", kdExtra(kd, trainCfg)); err != nil {
			return err
		}
		variants, chosen = kdVariants(fit, p0, kd.P), kd.P
		res.KD = &kdSummary{Steps: kd.Result.Steps, Tokens: kd.Result.Tokens, FinalValid: kd.Result.FinalValid,
			Seconds: kd.Result.Elapsed.Seconds(), Curve: kd.CurvePNG}
		extra = append(extra, "Distillation: training loss per step (and its 50-step mean) and validation loss: ![KD curve](kd_curve.png)")
	} else if err := exportPatched(rs, fit, m, p0, fit.Method, nil); err != nil {
		return err
	}
	scores, err := evaluateRun(ctx, rs, m, fit, variants, chosen, extra...)
	if err == nil && kd != nil && rs.spec.report != "" {
		err = copyFile(kd.CurvePNG, filepath.Join(rs.spec.report, "kd_curve.png"))
	}
	if err != nil {
		return err
	}
	if scores != nil {
		res.PPL = map[string]float64{}
		for n, sc := range scores {
			res.PPL[n] = sc.PPL
		}
	}
	res.Secs = time.Since(began).Seconds()
	printRunSummary(cmd.OutOrStdout(), res)
	if scores != nil {
		printScores(cmd.OutOrStdout(), scores)
	}
	if rs.spec.json {
		return json.NewEncoder(cmd.OutOrStdout()).Encode(res)
	}
	return nil
}

func ignoreCanceled(err error) error {
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

func summarize(mf *shards.Manifest, dir string, p *coordinator.Plan) *cacheSummary {
	cs := &cacheSummary{Dir: dir, Shards: len(mf.Shards), TrainWindows: p.TrainWindows, ValidWindows: p.ValidWindows,
		ActDType: string(mf.Meta.ActDType), TopK: mf.Meta.K}
	for _, e := range mf.Shards {
		cs.Windows += e.Windows
		cs.Tokens += e.Tokens
		cs.Bytes += e.Bytes
	}
	if cs.Tokens > 0 {
		cs.BytesPerToken = float64(cs.Bytes) / float64(cs.Tokens)
	}
	return cs
}

// loadPatch0 reads the training-free patch the coordinator stored (nil for none).
func loadPatch0(ctx context.Context, js jetstream.JetStream, names worker.Names, fit coordinator.FitResult, dim int) (*tensor.Matrix, error) {
	if !fit.HasP {
		return nil, nil
	}
	obj, err := js.ObjectStore(ctx, names.ObjectStore())
	if err != nil {
		return nil, err
	}
	b, err := obj.GetBytes(ctx, coordinator.ObjPatch0)
	if err != nil {
		return nil, fmt.Errorf("training-free patch: %w", err)
	}
	v, err := coordinator.DecodeFloat32s(b)
	if err != nil {
		return nil, err
	}
	if len(v) != dim*dim {
		return nil, fmt.Errorf("training-free patch has %d values, want %d×%d", len(v), dim, dim)
	}
	return tensor.FromData(dim, dim, v), nil
}

// exportPatched writes the pruned model with patch P (method names it) to --out.
func exportPatched(rs *runSetup, fit coordinator.FitResult, m *model.Model, P *tensor.Matrix, method string, extra map[string]any) error {
	if extra == nil {
		extra = map[string]any{}
	}
	extra["run_id"] = rs.plan.RunID
	rec := patch.Record{
		Source: patch.SourceModel{Path: rs.spec.modelPath, Fingerprint: rs.plan.Settings.Fingerprint, Layers: m.Config.Layers, Dim: m.Dim},
		Start:  fit.Start, End: fit.End, Method: method, Scale: fit.Scale, Cosine: fit.Cosine, Ridge: rs.spec.ridge,
		Calibration: patch.Calibration{File: rs.spec.calib, Windows: rs.plan.CalibWindows, SeqLen: rs.spec.seqLen, Tokens: fit.Tokens},
		Extra:       extra,
	}
	return patch.Export(rs.spec.out, m, P, rec)
}

// evaluateRun compares the variants on --eval (nil scores without it) and writes the
// report when --report is set.
func evaluateRun(ctx context.Context, rs *runSetup, m *model.Model, fit coordinator.FitResult, variants []patch.Variant, chosen *tensor.Matrix, extra ...string) (map[string]patch.Score, error) {
	var scores map[string]patch.Score
	if rs.spec.eval != "" {
		windows, err := loadWindows(rs.spec.modelPath, rs.spec.eval, m.Vocab, rs.spec.seqLen, rs.spec.evalWindows)
		if err != nil {
			return nil, err
		}
		bar := newProgress("evaluate", "windows", len(windows))
		scores, err = patch.Compare(ctx, m, windows, fit.Start, fit.End, variants, bar.Set)
		bar.Finish()
		if err != nil {
			return nil, err
		}
	}
	if rs.spec.report != "" {
		calib := model.Windows(rs.calib, rs.spec.seqLen, 8)
		h, _ := patch.NewHadamard(m.Dim)
		prof, err := patch.ProfileCut(ctx, m, h, calib, fit.Start, fit.End, chosen)
		if err != nil {
			return nil, err
		}
		in := patch.ReportInput{Model: rs.spec.modelPath, NumPrune: rs.spec.numPrune, Start: fit.Start, End: fit.End,
			Method: variants[len(variants)-1].Name, AllowEdges: rs.spec.allowEdges, Cosine: fit.Cosine, Scores: scores, Profile: prof,
			Extra: append([]string{fmt.Sprintf("Run %s; calibration: %d windows of %d tokens from `%s`.", rs.plan.RunID, rs.plan.CalibWindows, rs.spec.seqLen, rs.spec.calib)}, extra...)}
		if err := patch.WriteReport(rs.spec.report, in); err != nil {
			return nil, err
		}
	}
	return scores, nil
}

// printScores prints the comparison table.
func printScores(w io.Writer, scores map[string]patch.Score) {
	dense := scores[patch.DenseName].PPL
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| model | perplexity | vs dense | KL to dense | top-1 agreement |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|")
	for _, n := range patch.SortedNames(scores) {
		sc := scores[n]
		fmt.Fprintf(w, "| %s | %.4f | %+.2f%% | %.5f | %.2f%% |\n", n, sc.PPL, 100*(sc.PPL/dense-1), sc.KL, 100*sc.Top1)
	}
}

func printRunSummary(w io.Writer, r runResult) {
	fmt.Fprintf(w, "run %s (state in %s) finished in %.1fs\n\n", r.RunID, r.RunDir, r.Secs)
	fmt.Fprintf(w, "training-free patch: block [%d, %d), method %s\n\n", r.Start, r.End, r.Method)
	fmt.Fprintln(w, "| start | cosine |")
	fmt.Fprintln(w, "|---:|---:|")
	for i, c := range r.Cosine {
		mark := ""
		if i == r.Start {
			mark = " ←"
		}
		fmt.Fprintf(w, "| %d | %.6f%s |\n", i, c, mark)
	}
	if k := r.KD; k != nil {
		fmt.Fprintf(w, "\nstudent: %d steps over %d tokens in %.1fs, final validation loss %.5f (curve: %s)\n", k.Steps, k.Tokens, k.Seconds, k.FinalValid, k.Curve)
	}
	if c := r.Cache; c != nil {
		fmt.Fprintf(w, "\ncache: %d shards in %s — %d windows (%d train, %d validation), %d tokens, %.1f MiB, %.1f B/token (activations %s, top-%d targets)\n",
			c.Shards, c.Dir, c.Windows, c.TrainWindows, c.ValidWindows, c.Tokens, float64(c.Bytes)/(1<<20), c.BytesPerToken, c.ActDType, c.TopK)
	}
	fmt.Fprintf(w, "\nmodel written to %s\n", r.Out)
}
