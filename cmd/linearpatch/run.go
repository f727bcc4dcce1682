package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
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
	"linearpatch/metrics"
	"linearpatch/model"
	"linearpatch/model/tensor"
	"linearpatch/patch"
	"linearpatch/protocol"
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

State lives in --run-dir (default: DIR.run): a new run directory starts a new run with a
random id (kept in RUN-DIR/run.id); re-running with the same run directory resumes the run
from its shard checkpoints, after checking that the model, tokenizer and data files (by
contents) and the settings are the run's — a mismatch is refused, naming what changed.`,
		Args: cobra.NoArgs,
		RunE: runRun,
	}
	addPruneFlags(cmd)
	addRunFlags(cmd)
	addNATSFlags(cmd)
	addEmbeddedNATSFlags(cmd)
	addTaskFlags(cmd)
	addStudentFlags(cmd)
	cmd.Flags().Bool("distill", true, "distill the patch from the cache (the student stage) and export the kd model")
	cmd.Flags().Int("teachers", 2, "teacher workers in this process (0: rely on external `linearpatch teacher` processes)")
	addRunStudentsFlag(cmd)
	// Only run writes the cache in-process; the coordinator's writer is `linearpatch cache`,
	// whose own --compression decides.
	cmd.Flags().String("compression", "zstd", "shard file compression: zstd, lz4 or none")
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
it embeds the NATS server, listening on --nats-listen (e.g. 0.0.0.0:4222 for other machines,
with --nats-tls-cert/--nats-tls-key, or --nats-insecure-plaintext on a trusted network). The
embedded server accepts only the run's role keys, written on first start to RUN-DIR/creds/
(teacher.nk, cache.nk, student.nk, status.nk; 0600): copy a role's file to the machine that
runs it and pass it with --nats-nkey. A new --run-dir starts a new run with a random id; the
same one resumes it. With --train it also distills (--distill=false: it exports the
training-free patch): it publishes its student flags to the run, waits for a
` + "`linearpatch student --nats`" + ` process (role key student.nk) to publish the distilled
patch, and exports the kd model.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := resolve(cmd)
			if err != nil {
				return err
			}
			if s.flag("distill") && s.str("train") != "" {
				if err := checkDistillSettings(s); err != nil {
					return err
				}
			}
			return runPipeline(cmd, s, 0, false)
		},
	}
	addPruneFlags(cmd)
	addRunFlags(cmd)
	addNATSFlags(cmd)
	addEmbeddedNATSFlags(cmd)
	addTaskFlags(cmd)
	addStudentFlags(cmd)
	cmd.Flags().Bool("distill", true, "with --train: wait for a network student (`linearpatch student --nats`) and export the kd model (false: export the training-free patch)")
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
	f.String("run-dir", "", "run state directory (default: --out with .run appended); a new one starts a new run, the same one resumes its run")
	f.String("run", "", "resume this run (its id) from a run directory on another machine; its inputs and settings must be the run's")
	f.Duration("lease", 30*time.Second, "a shard counts as leased this long after its teacher's last report")
	addMetricsFlag(cmd)
	f.Int("replicas", 1, "replicas of the run's streams, KV bucket and object store on a JetStream cluster (3 on a three-node cluster survives a node's loss; 1 for a single server); a resumed run keeps its own unless this is given")
}

// runSetup is what run and coordinator share: the resolved spec, the model's config, the
// plan and the run directory.
type runSetup struct {
	spec   pruneSpec
	cfg    model.Config
	plan   *protocol.Plan
	calib  []int
	train  []int
	runDir string
	tasks  []*model.Task // --eval-tasks, loaded up front; nil: none
	// created are the paths a failure before the run is published removes (see discard).
	created []string
	resume  bool // --run named a run that must exist already
}

func prepareRun(ctx context.Context, s settings) (*runSetup, error) {
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
	tasks, err := loadTasks(spec.modelPath, spec.evalTasks, cfg.Vocab, cfg.MaxSeq)
	if err != nil {
		return nil, err
	}
	// Calibration and training data are read by the lines protocol; of the calibration
	// data only the windows the plan uses.
	calib, err := loadStream(ctx, spec.modelPath, spec.calib, cfg.Vocab, spec.data.lines(), spec.calibWindows*spec.seqLen)
	if err != nil {
		return nil, err
	}
	var train []int
	if s.str("train") != "" {
		if train, err = loadStream(ctx, spec.modelPath, s.str("train"), cfg.Vocab, spec.data.lines(), 0); err != nil {
			return nil, err
		}
	}
	tokHash, err := tokenizerSHA256(spec.modelPath)
	if err != nil {
		return nil, err
	}
	calibHash, err := fileSHA256(spec.calib)
	if err != nil {
		return nil, err
	}
	var trainHash string
	if s.str("train") != "" {
		if trainHash, err = fileSHA256(s.str("train")); err != nil {
			return nil, err
		}
	}
	set := protocol.Settings{
		Model: spec.modelPath, Fingerprint: fp, Tokenizer: tokHash, Calib: spec.calib, CalibSHA256: calibHash,
		CalibWindows: spec.calibWindows, Train: s.str("train"), TrainSHA256: trainHash,
		SeqLen: spec.seqLen, NumPrune: spec.numPrune, Method: string(spec.methods[0]), Ridge: spec.ridge,
		AllowEdges: spec.allowEdges, ShardWindows: s.num("shard-windows"), TopK: s.num("top-k"),
		ActDType: s.str("act-dtype"), CacheFinal: s.flag("cache-final"), ValidFrac: 0.05,
		TextColumn: s.str("text-column"),
	}
	if set.TopK > cfg.Vocab {
		return nil, fmt.Errorf("--top-k %d exceeds the vocabulary (%d)", set.TopK, cfg.Vocab)
	}
	runDir := s.str("run-dir")
	if runDir == "" {
		runDir = strings.TrimSuffix(filepath.Clean(spec.out), "/") + ".run"
	}
	// A run is named by a random id kept in its run directory: a new run directory starts a
	// new run; the same one (or --run ID, for a run directory on another machine) resumes
	// it, if nothing that determines its tokens and targets changed.
	stored, err := protocol.ReadRunState(runDir)
	if err != nil {
		return nil, err
	}
	runID := s.str("run")
	switch {
	case stored != nil && runID != "" && runID != stored.RunID:
		return nil, fmt.Errorf("--run %s: %s holds run %s; use another --run-dir", runID, runDir, stored.RunID)
	case stored != nil:
		if err := stored.CheckResume(set); err != nil {
			return nil, fmt.Errorf("%s: %w", runDir, err)
		}
		runID = stored.RunID
	case runID != "":
		if err := worker.ValidateRunID(runID); err != nil {
			return nil, err
		}
	default:
		runID = protocol.NewRunID()
	}
	plan, err := protocol.NewPlan(runID, set, len(calib)/spec.seqLen, len(train)/spec.seqLen)
	if err != nil {
		return nil, err
	}
	created := createdOnFailure(runDir)
	if err := os.MkdirAll(runDir, 0o755); err != nil {
		return nil, err
	}
	if err := protocol.WriteRunState(runDir, plan); err != nil {
		return nil, err
	}
	return &runSetup{spec: spec, cfg: cfg, plan: plan, calib: calib, train: train, runDir: runDir, tasks: tasks,
		created: created, resume: stored == nil && s.str("run") != ""}, nil
}

// publishPlan stores the plan and the token streams (first run) or checks that the stored
// plan is this one (resume).
func publishPlan(ctx context.Context, js jetstream.JetStream, names worker.Names, rs *runSetup) error {
	kv, err := js.KeyValue(ctx, names.KVBucket())
	if err != nil {
		return err
	}
	b, _ := json.Marshal(rs.plan)
	if e, err := kv.Get(ctx, protocol.KeyPlan); err == nil {
		var stored protocol.Plan
		if err := json.Unmarshal(e.Value(), &stored); err != nil {
			return fmt.Errorf("stored plan: %w", err)
		}
		if err := stored.CheckResume(rs.plan.Settings); err != nil {
			return err
		}
		slog.Info("resuming run", "run", rs.plan.RunID)
		return nil
	}
	if rs.resume {
		// The run directory was new: leave it holding no run, so it cannot later start a
		// run under the id given here.
		_ = os.Remove(filepath.Join(rs.runDir, protocol.RunIDFile))
		_ = os.Remove(filepath.Join(rs.runDir, protocol.PlanFile))
		return fmt.Errorf("--run %s: no such run on this NATS server (a new run gets a new id: leave --run out)", rs.plan.RunID)
	}
	obj, err := js.ObjectStore(ctx, names.ObjectStore())
	if err != nil {
		return err
	}
	if _, err := obj.PutBytes(ctx, protocol.ObjCalibTokens, protocol.EncodeInt32s(rs.calib)); err != nil {
		return err
	}
	if rs.train != nil {
		if _, err := obj.PutBytes(ctx, protocol.ObjTrainTokens, protocol.EncodeInt32s(rs.train)); err != nil {
			return err
		}
	}
	if _, err := kv.Create(ctx, protocol.KeyPlan, b); err != nil && !errors.Is(err, jetstream.ErrKeyExists) {
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
	// Protocol is the perplexity protocol of PPL; Tasks and Retained the zero-shot accuracy.
	Protocol model.Protocol               `json:"protocol,omitempty"`
	Tasks    map[string]model.TasksResult `json:"tasks,omitempty"`
	Retained map[string]retainedJSON      `json:"retained,omitempty"`
	Secs     float64                      `json:"seconds"`
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
	if err := checkRunSettings(s); err != nil {
		return err
	}
	if err := checkRunStudents(s); err != nil {
		return err
	}
	return runPipeline(cmd, s, s.num("teachers"), true)
}

// runPipeline drives a run with nTeachers in-process teachers and, when withWriter, the
// cache writer in-process.
func runPipeline(cmd *cobra.Command, s settings, nTeachers int, withWriter bool) error {
	began := time.Now()
	if err := checkReplicas(s); err != nil {
		return err
	}
	ctx := cmd.Context()
	reg, stopMetrics, err := startMetrics(ctx, s)
	if err != nil {
		return err
	}
	defer stopMetrics()
	rs, err := prepareRun(ctx, s)
	if err != nil {
		return err
	}
	names, err := worker.NewNames(rs.plan.RunID)
	if err != nil {
		return rs.discard(err)
	}
	conn, err := connectNATS(ctx, s, rs.runDir, &names, worker.RoleCoordinator, "linearpatch-run")
	if err != nil {
		return rs.discard(err)
	}
	defer conn.Close()
	sc, err := setupConfig(ctx, s, conn.js, names)
	if err != nil {
		conn.Close()
		return rs.discard(err)
	}
	if err := worker.Setup(ctx, conn.js, names, sc); err != nil {
		conn.Close()
		return rs.discard(err)
	}
	if err := publishPlan(ctx, conn.js, names, rs); err != nil {
		conn.Close()
		return rs.discard(err)
	}

	var m *model.Model
	if nTeachers < 0 {
		return errors.New("--teachers must be ≥ 0")
	}
	if nTeachers > 0 {
		if m, err = model.LoadContext(ctx, rs.spec.modelPath); err != nil {
			return err
		}
	}
	var fit protocol.FitResult
	copts := coordinator.Options{Plan: rs.plan, NC: conn.nc, JS: conn.js, Names: names,
		RunDir: rs.runDir, Lease: s.v.GetDuration("lease"), OnFit: func(f protocol.FitResult) { fit = f },
		Metrics: reg.Coordinator()}
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
		_, sjs, err := conn.as(ctx, worker.RoleStudent, "linearpatch-student")
		if err != nil {
			return err
		}
		obj, err := sjs.ObjectStore(ctx, names.ObjectStore())
		if err != nil {
			return err
		}
		kv, err := conn.js.KeyValue(ctx, names.KVBucket())
		if err != nil {
			return err
		}
		rep := newStudentReporter(kv, slog.Default()) // for status
		copts.OnFit = func(f protocol.FitResult) {
			fit = f
			go func() {
				plan, fitted, p0, err := protocol.ReadRunDir(rs.runDir)
				if err == nil {
					spec := distillSpec{runDir: rs.runDir, modelPath: rs.spec.modelPath, plan: plan, fit: *fitted,
						p0: p0, cfg: trainCfg, resume: true, mirror: obj, log: slog.Default(), progress: rep.progress, metrics: reg.Student()}
					if n := s.num("students"); n > 1 {
						kd, err = distillShared(ctx, n, sjs, kv, names, spec)
					} else {
						kd, err = distill(ctx, spec)
					}
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
	if !withWriter && rs.plan.TrainWindows > 0 && s.flag("distill") {
		if err := netStudentHook(ctx, s, conn, names, rs, &copts, &trainCfg, &kd); err != nil {
			return err
		}
	}
	coord, err := coordinator.New(copts, rs.cfg.Dim, rs.cfg.Vocab)
	if err != nil {
		return err
	}
	_, wjs, err := conn.as(ctx, worker.RoleCache, "linearpatch-cache")
	if err != nil {
		return err
	}
	// A coordinator alone exposes no cache writer metrics: its writer is another process.
	var writerMetrics *metrics.CacheWriter
	if withWriter {
		writerMetrics = reg.CacheWriter()
	}
	writer, err := cache.NewWriter(cache.Options{JS: wjs, Names: names, Dir: filepath.Join(rs.runDir, "cache"),
		Compression: shards.Compression(s.str("compression")), Dim: rs.cfg.Dim, Vocab: rs.cfg.Vocab, Metrics: writerMetrics})
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
		tnc, tjs, err := conn.as(ctx, worker.RoleTeacher, fmt.Sprintf("linearpatch-teacher-local-%d", i))
		if err != nil {
			return err
		}
		tw, err := teacher.NewWorker(teacher.Options{Name: fmt.Sprintf("local-%d", i), NC: tnc, JS: tjs, Names: names,
			Compute: comp, Stream: streamConfig(s), Metrics: reg.Teacher()})
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
		if m, err = model.LoadContext(ctx, rs.spec.modelPath); err != nil {
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
	var exported *patch.Staged
	if kd != nil {
		if exported, err = exportPatched(rs, fit, m, kd.P, "kd", kdExtra(kd, trainCfg)); err != nil {
			return err
		}
		variants, chosen = kdVariants(fit, p0, kd.P), kd.P
		res.KD = &kdSummary{Steps: kd.Result.Steps, Tokens: kd.Result.Tokens, FinalValid: kd.Result.FinalValid,
			Seconds: kd.Result.Elapsed.Seconds(), Curve: kd.CurvePNG}
		extra = append(extra, "Distillation: training loss per step (and its 50-step mean) and validation loss: ![KD curve](kd_curve.png)")
	} else if exported, err = exportPatched(rs, fit, m, p0, fit.Method, nil); err != nil {
		return err
	}
	defer exported.Discard()
	ev, report, err := evaluateRun(ctx, rs, m, fit, variants, chosen, extra...)
	if err != nil {
		return err
	}
	if report != nil {
		defer report.Discard()
		if kd != nil {
			if err := copyFile(kd.CurvePNG, filepath.Join(report.Dir(), "kd_curve.png")); err != nil {
				return err
			}
		}
	}
	if err := commitOutputs(rs.spec.out, exported, report); err != nil {
		return err
	}
	if ev.scores != nil {
		res.PPL, res.Protocol = map[string]float64{}, ev.protocol
		for n, sc := range ev.scores {
			res.PPL[n] = sc.PPL
		}
	}
	res.Tasks, res.Retained = ev.tasks, ev.retained()
	res.Secs = time.Since(began).Seconds()
	printRunSummary(cmd.OutOrStdout(), res)
	printScores(cmd.OutOrStdout(), ev)
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

func summarize(mf *shards.Manifest, dir string, p *protocol.Plan) *cacheSummary {
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
func loadPatch0(ctx context.Context, js jetstream.JetStream, names worker.Names, fit protocol.FitResult, dim int) (*tensor.Matrix, error) {
	if !fit.HasP {
		return nil, nil
	}
	b, err := readRunObject(ctx, js, names, protocol.ObjPatch0)
	if err != nil {
		return nil, fmt.Errorf("training-free patch: %w", err)
	}
	v, err := protocol.DecodeFloat32s(b)
	if err != nil {
		return nil, err
	}
	if len(v) != dim*dim {
		return nil, fmt.Errorf("training-free patch has %d values, want %d×%d", len(v), dim, dim)
	}
	return tensor.FromData(dim, dim, v), nil
}

// commitOutputs renames the staged export and report (nil: none) into place. When the
// report cannot be, the export just committed is removed again: a failure leaves neither.
func commitOutputs(out string, exported, report *patch.Staged) error {
	if err := exported.Commit(); err != nil {
		return err
	}
	if report != nil {
		if err := report.Commit(); err != nil {
			os.RemoveAll(out)
			return err
		}
	}
	return nil
}

// exportPatched stages the pruned model with patch P (method names it) for --out; the
// caller commits it with commitOutputs.
func exportPatched(rs *runSetup, fit protocol.FitResult, m *model.Model, P *tensor.Matrix, method string, extra map[string]any) (*patch.Staged, error) {
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
	if method == "kd" {
		rec.InitMethod = fit.Method
	}
	return patch.StageExport(rs.spec.out, m, P, rec)
}

// evaluateRun compares the variants on --eval and --eval-tasks (empty tables without
// them) and stages the report when --report is set (nil otherwise); the caller commits it
// with commitOutputs.
func evaluateRun(ctx context.Context, rs *runSetup, m *model.Model, fit protocol.FitResult, variants []patch.Variant, chosen *tensor.Matrix, extra ...string) (evalTables, *patch.Staged, error) {
	ev := evalTables{protocol: rs.spec.data.protocol}
	if rs.spec.eval != "" {
		windows, err := loadWindows(ctx, rs.spec.modelPath, rs.spec.eval, m.Vocab, rs.spec.seqLen, rs.spec.evalWindows, rs.spec.data)
		if err != nil {
			return ev, nil, err
		}
		bar := newProgress("evaluate", "windows", len(windows))
		ev.scores, err = patch.Compare(ctx, m, windows, fit.Start, fit.End, variants, bar.Set)
		bar.Finish()
		if err != nil {
			return ev, nil, err
		}
	}
	if rs.tasks != nil {
		var err error
		bar := newProgress("tasks", "batches", model.TaskBatches(rs.tasks, m.Vocab))
		ev.tasks, err = patch.CompareTasks(ctx, m, rs.tasks, fit.Start, fit.End, variants, bar.Set)
		bar.Finish()
		if err != nil {
			return ev, nil, err
		}
	}
	if rs.spec.report != "" {
		calib := model.Windows(rs.calib, rs.spec.seqLen, 8)
		h, _ := patch.NewHadamard(m.Dim)
		prof, err := patch.ProfileCut(ctx, m, h, calib, fit.Start, fit.End, chosen)
		if err != nil {
			return ev, nil, err
		}
		in := patch.ReportInput{Model: rs.spec.modelPath, NumPrune: rs.spec.numPrune, Start: fit.Start, End: fit.End,
			Method: variants[len(variants)-1].Name, AllowEdges: rs.spec.allowEdges, Cosine: fit.Cosine, Scores: ev.scores, Profile: prof,
			Protocol: string(ev.protocol), Tasks: ev.tasks,
			Extra: append([]string{fmt.Sprintf("Run %s; calibration: %d windows of %d tokens from `%s`.", rs.plan.RunID, rs.plan.CalibWindows, rs.spec.seqLen, rs.spec.calib)}, extra...)}
		report, err := patch.StageReport(rs.spec.report, in)
		if err != nil {
			return ev, nil, err
		}
		return ev, report, nil
	}
	return ev, nil, nil
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

// runDirFiles are what a coordinator writes into its run directory before the run is
// published: the run id, the plan, the embedded server's URL and store, and the role credentials.
var runDirFiles = []string{protocol.RunIDFile, protocol.PlanFile, "nats.url", "nats", "creds"}

// createdOnFailure lists what a failure before the run is published must remove from
// runDir: the directory itself when it does not exist yet, else those of runDirFiles it
// does not hold yet.
func createdOnFailure(runDir string) []string {
	if _, err := os.Stat(runDir); errors.Is(err, os.ErrNotExist) {
		return []string{runDir}
	}
	var paths []string
	for _, f := range runDirFiles {
		p := filepath.Join(runDir, f)
		if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
			paths = append(paths, p)
		}
	}
	return paths
}

// discard removes what this command created in the run directory, after a failure before
// the run was published (connecting, setting up the stream, storing the plan), so that
// nothing half-written is left; it returns err.
func (rs *runSetup) discard(err error) error {
	for _, p := range rs.created {
		if rerr := os.RemoveAll(p); rerr != nil {
			slog.Warn("cannot remove what the failed run wrote", "path", p, "err", rerr)
		}
	}
	return err
}

// fileSHA256 is the hex SHA-256 of a file's contents.
func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// tokenizerSHA256 hashes the tokenizer files model.LoadTokenizer may read beside the model
// (tokenizer.model; tokenizer.bin beside a llama2.c .bin); "" when there are none.
func tokenizerSHA256(modelPath string) (string, error) {
	dir := modelPath
	if fi, err := os.Stat(modelPath); err != nil {
		return "", err
	} else if !fi.IsDir() {
		dir = filepath.Dir(modelPath)
	}
	h := sha256.New()
	found := false
	for _, name := range []string{"tokenizer.bin", "tokenizer.model", "tokenizer.json", "tokenizer_config.json"} {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err != nil || !fi.Mode().IsRegular() {
			continue
		}
		sum, err := fileSHA256(p)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "%s\x00%s\x00", name, sum)
		found = true
	}
	if !found {
		return "", nil
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
