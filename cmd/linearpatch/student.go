package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"linearpatch/metrics"
	"linearpatch/model"
	"linearpatch/model/tensor"
	"linearpatch/patch"
	"linearpatch/protocol"
	"linearpatch/student"
	"linearpatch/teacher"
	"linearpatch/worker"
)

// addStudentFlags declares the distillation settings shared by run and student.
func addStudentFlags(cmd *cobra.Command) {
	f := cmd.Flags()
	f.String("loss", "topk-kl", "distillation loss: topk-kl (the paper), full-kl or mse (both need --cache-final)")
	f.Float64("lr", 1e-4, "AdamW learning rate (cosine decay to lr/20 over the run)")
	f.Float64("weight-decay", 1e-4, "AdamW decoupled weight decay")
	f.Int("epochs", 1, "epochs over the cached training windows")
	f.Int("batch", 1, "windows per step")
	f.Uint64("seed", 1, "data-order seed")
	f.Int("checkpoint-every", 100, "steps between checkpoints")
	f.Int("early-stop", 0, "stop after this many epochs without a better validation loss (0: never)")
	f.Int("valid-every", 0, "steps between validation passes (0: after each epoch)")
}

// trainConfig reads the distillation settings. The flags' defaults are not zero, so a zero
// here was given (flag, environment or config file): for the learning rate, epochs and
// batch it is an error, never the default; a zero seed is a seed.
func trainConfig(s settings, topK int) (student.TrainConfig, error) {
	for _, z := range []struct {
		flag string
		zero bool
	}{{"lr", s.float("lr") == 0}, {"epochs", s.num("epochs") == 0}, {"batch", s.num("batch") == 0}} {
		if z.zero {
			return student.TrainConfig{}, fmt.Errorf("--%s 0: must be positive", z.flag)
		}
	}
	cfg := student.TrainConfig{
		LR: s.float("lr"), WeightDecay: s.float("weight-decay"), Epochs: s.num("epochs"), Batch: s.num("batch"),
		Loss: student.LossKind(s.str("loss")), K: topK, Seed: s.uint64("seed"), CheckpointEvery: s.num("checkpoint-every"),
		EarlyStop: s.num("early-stop"), ValidEvery: s.num("valid-every"),
	}
	if cfg.WeightDecay == 0 {
		cfg.WeightDecay = -1 // an explicit 0 means none (TrainConfig's zero means the default)
	}
	if cfg.CheckpointEvery == 0 {
		cfg.CheckpointEvery = -1
	}
	if err := cfg.Validate(); err != nil {
		return cfg, err
	}
	return cfg, nil
}

// distillSpec is everything the offline student needs.
type distillSpec struct {
	runDir    string
	modelPath string
	plan      *protocol.Plan
	fit       protocol.FitResult
	p0        []float32
	cfg       student.TrainConfig
	resume    bool
	mirror    jetstream.ObjectStore // optional second home of the checkpoints
	log       *slog.Logger
	// A network student (student_net.go) sets these: its own cache directory (default
	// runDir/cache) filled by source, its checkpoint store (default runDir/student, mirrored),
	// the directory of its curve (default runDir/student) and a progress hook.
	cacheDir  string
	source    student.ShardSource
	store     student.CheckpointStore
	workDir   string
	progress  func(student.ProgressInfo)
	shardWait time.Duration    // give up on a shard missing from the manifest after this long without a new one; 0: wait
	metrics   *metrics.Student // optional
	// shared, if set, makes the student share every step's windows with the other students
	// on its exchange (student.Trainer.RunShared; store is then unused).
	shared *sharedDistill
}

// distillResult is the student's outcome.
type distillResult struct {
	P         *tensor.Matrix
	Result    *student.Result
	CurvePNG  string
	ReadNames []string
}

// StudentDir is where the student keeps its checkpoint, curve and result in a run directory.
func studentDir(runDir string) string { return filepath.Join(runDir, "student") }

// distill trains the patch from the run's cache. It loads only the layers after the cut,
// the final norm and the head, and refuses to go on if any other tensor was read.
func distill(ctx context.Context, d distillSpec) (*distillResult, error) {
	p := d.plan
	if p.TrainWindows == 0 {
		return nil, errors.New("student: the run has no training windows (give --train)")
	}
	fp, err := model.Fingerprint(d.modelPath)
	if err != nil {
		return nil, err
	}
	if fp != p.Settings.Fingerprint {
		return nil, fmt.Errorf("student: %s is not the model run %s was planned for", d.modelPath, p.RunID)
	}
	cfg, err := model.ReadModelConfig(d.modelPath)
	if err != nil {
		return nil, err
	}
	if d.p0 != nil && len(d.p0) != cfg.Dim*cfg.Dim {
		return nil, fmt.Errorf("student: the training-free patch (%s) holds %d values, want %d×%d for the model's width: truncated or from another model",
			filepath.Join(d.runDir, protocol.Patch0File), len(d.p0), cfg.Dim, cfg.Dim)
	}
	var read []string
	m, err := model.LoadContext(ctx, d.modelPath, model.WithLayers(d.fit.End, cfg.Layers), model.WithoutEmbeddings(), model.WithReadLog(&read))
	if err != nil {
		return nil, err
	}
	if bad := prefixTensors(read, d.fit.End, cfg.TiedHead); len(bad) > 0 {
		return nil, fmt.Errorf("student: the loader read prefix tensors %v", bad)
	}
	meta, err := teacher.CacheMeta(p, m, d.fit.Start, d.fit.End)
	if err != nil {
		return nil, err
	}
	var p0 *tensor.Matrix
	if d.p0 != nil {
		p0 = tensor.FromData(m.Dim, m.Dim, d.p0)
	}
	suffix, err := student.NewSuffix(m, d.fit.End, p0, student.SuffixOptions{SeqLen: p.Settings.SeqLen, Loss: d.cfg.Loss, K: d.cfg.K})
	if err != nil {
		return nil, err
	}
	var train, valid []student.ShardSpec
	trainN, validN := 0, 0
	for _, s := range p.Cache {
		// A plan's shards hold at most its shard size; the training order is sized by them
		// (the manifest, when there, is checked by NewShardData before that).
		if s.Windows < 1 || s.Windows > p.Settings.ShardWindows {
			return nil, fmt.Errorf("student: plan.json: cache shard %d has %d windows, outside 1..%d (shard_windows)", s.ID, s.Windows, p.Settings.ShardWindows)
		}
		spec := student.ShardSpec{Shard: s.ID, Windows: s.Windows}
		if s.Split == protocol.SplitValid {
			valid = append(valid, spec)
			validN += s.Windows
		} else {
			train = append(train, spec)
			trainN += s.Windows
		}
	}
	if trainN != p.TrainWindows || validN != p.ValidWindows {
		return nil, fmt.Errorf("student: plan.json: its cache shards hold %d train and %d valid windows, it says %d and %d", trainN, validN, p.TrainWindows, p.ValidWindows)
	}
	cacheDir, workDir := d.cacheDir, d.workDir
	if cacheDir == "" {
		cacheDir = filepath.Join(d.runDir, "cache")
	}
	if workDir == "" {
		workDir = studentDir(d.runDir)
	}
	dataOpts := []student.DataOption{student.WithManifestPoll(500 * time.Millisecond),
		student.WithManifestStall(d.shardWait, 30*time.Second, d.log)}
	if d.source != nil {
		dataOpts = []student.DataOption{student.WithSource(d.source)}
	}
	data, err := student.NewShardData(cacheDir, meta, train, valid, dataOpts...)
	if err != nil {
		return nil, err
	}
	defer data.Release()
	store := d.store
	if store == nil {
		store = student.NewFileCheckpointStore(studentDir(d.runDir))
		if d.mirror != nil {
			store = mirroredStore{primary: store, mirror: d.mirror, log: d.log}
		}
	}
	var bar *progress
	trainer, err := student.NewTrainer(suffix, data, d.cfg, store, student.WithLogger(d.log),
		student.WithFingerprintExtra(map[string]string{"p0_method": d.fit.Method, "run": p.RunID}),
		student.WithProgress(func(pi student.ProgressInfo) {
			if bar == nil {
				bar = newProgress("distill", "steps", pi.TotalSteps)
			}
			bar.Set(pi.Step)
			d.metrics.Step(metrics.StepInfo{Step: pi.Step, TotalSteps: pi.TotalSteps, Loss: pi.Loss, ValidLoss: pi.ValidLoss,
				LR: pi.LR, TokensPerSec: pi.TokensPerSec, ETA: pi.ETA})
			if d.progress != nil {
				d.progress(pi)
			}
			if pi.Step%50 == 0 || pi.Step == pi.TotalSteps {
				d.log.Debug("distill", "step", pi.Step, "loss", pi.Loss, "grad_norm", pi.GradNorm, "lr", pi.LR,
					"tokens_per_s", fmt.Sprintf("%.0f", pi.TokensPerSec), "eta", pi.ETA.Round(time.Second))
			}
		}))
	if err != nil {
		return nil, err
	}
	var res *student.Result
	if d.shared != nil {
		res, err = trainer.RunShared(ctx, d.shared.ex, d.shared.opts)
	} else {
		res, err = trainer.Run(ctx, d.resume)
	}
	if bar != nil {
		bar.Finish()
	}
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(workDir, 0o755); err != nil {
		return nil, err
	}
	curve := filepath.Join(workDir, "kd_curve.png")
	if err := student.WriteCurvePNG(curve, res.TrainLoss, res.ValidLoss); err != nil {
		return nil, err
	}
	return &distillResult{P: tensor.FromData(m.Dim, m.Dim, exportedPatch(res, d.cfg)), Result: res, CurvePNG: curve, ReadNames: read}, nil
}

// exportedPatch is the patch a distillation exports: with --early-stop the best one by
// validation loss that it tracked, else the last.
func exportedPatch(res *student.Result, cfg student.TrainConfig) []float32 {
	if cfg.EarlyStop > 0 && res.BestP != nil {
		return res.BestP
	}
	return res.P
}

// checkDistillSettings validates run's distillation settings before any work: the
// training hyper-parameters, and that a loss on the last layer's output has it cached.
func checkDistillSettings(s settings) error {
	cfg, err := trainConfig(s, s.num("top-k"))
	if err != nil {
		return err
	}
	if cfg.Loss != student.LossTopKKL && !s.flag("cache-final") {
		return fmt.Errorf("--loss %s needs the last layer's output in the cache: add --cache-final", cfg.Loss)
	}
	return nil
}

// prefixTensors returns the names among read that belong before layer end (the embedding
// matrix counts only when the head is not tied to it).
func prefixTensors(read []string, end int, tied bool) []string {
	var bad []string
	for _, n := range read {
		if n == "model.embed_tokens.weight" && !tied {
			bad = append(bad, n)
			continue
		}
		if rest, ok := strings.CutPrefix(n, "model.layers."); ok {
			if i, err := strconv.Atoi(rest[:strings.IndexByte(rest, '.')]); err == nil && i < end {
				bad = append(bad, n)
			}
		}
	}
	return bad
}

// mirroredStore saves checkpoints to the run directory and to the run's object store; it
// loads from the directory, or from the object store when the directory has none (a
// student resumed on another machine).
type mirroredStore struct {
	primary student.CheckpointStore
	mirror  jetstream.ObjectStore
	log     *slog.Logger
}

const checkpointObject = worker.StudentCheckpointObject

func (s mirroredStore) Save(ctx context.Context, c *student.Checkpoint) error {
	if err := s.primary.Save(ctx, c); err != nil {
		return err
	}
	b, err := c.MarshalBinary()
	if err != nil {
		return err
	}
	if _, err := s.mirror.PutBytes(ctx, checkpointObject, b); err != nil {
		s.log.Warn("checkpoint not mirrored to the object store", "err", err)
	}
	return nil
}

func (s mirroredStore) Load(ctx context.Context) (*student.Checkpoint, error) {
	c, err := s.primary.Load(ctx)
	if !errors.Is(err, student.ErrNoCheckpoint) {
		return c, err
	}
	b, _, oerr := worker.GetObject(ctx, s.mirror, checkpointObject)
	if oerr != nil {
		return nil, student.ErrNoCheckpoint
	}
	return student.UnmarshalCheckpoint(b)
}

func newStudentCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "student --run-dir DIR --out OUT | student --nats URL --run ID --model PATH",
		Short: "Distill the patch: offline from a run directory, or as a network worker of a run",
		Long: `Train only the d×d patch P from the cached activations of a run (run-dir/cache),
starting from the run's training-free patch: X_i·P → layers j..L−1 → final norm → head,
top-k KL to the teacher (the paper's loss; --loss full-kl and mse need a cache made with
--cache-final). Only the layers after the cut, the final norm and the head are loaded.
Checkpoints (P, Adam moments, step, data position, config fingerprint) go to
run-dir/student every --checkpoint-every steps; --resume continues from the last one and
refuses one made with other settings. The distilled model is exported to --out (method kd).

With --nats URL --run ID it is a worker of a running run, on any machine with the model
files: the plan, the run's distillation settings (the coordinator's flags; giving them here
is an error), the training-free patch and every cache shard come through NATS (shards from
the data stream, rebuilt into --dir), checkpoints go to the run's gradient store (a student
killed and restarted anywhere resumes bit-identically), and the distilled patch is
published to the run, whose coordinator exports it. Any number of such students (up to
--batch) share every step's windows, with the same result bit for bit as one: each claims
windows of the step (renewing its claims every --student-lease/3; a claim not renewed for
a lease is recomputed by another), publishes their gradients, fetches the others' and
applies the step itself.`,
		Args: cobra.NoArgs,
		RunE: runStudent,
	}
	cmd.Flags().String("run-dir", "", "the run directory (required offline; with --nats only its run.id is read, when --run is not given)")
	cmd.Flags().String("model", "", "the original model (default: the run's)")
	cmd.Flags().String("out", "", "output directory for the distilled model (must not exist; required)")
	cmd.Flags().Bool("resume", false, "continue from the run directory's checkpoint")
	cmd.Flags().String("eval", "", "evaluation data: compare dense, none, the training-free patch and kd")
	cmd.Flags().Int("eval-windows", 0, "evaluate only the first N windows of --eval (0: all)")
	cmd.Flags().StringSlice("eval-tasks", nil, "multiple-choice task files (JSON Lines, see eval --tasks): adds accuracy and retained % to the comparison")
	addDataFlags(cmd, true)
	cmd.Flags().Bool("json", false, "print the result as one JSON object on the last line of stdout")
	cmd.Flags().Duration("shard-wait", 2*time.Minute, "give up on a shard missing from the cache manifest once no shard has been added for this long (0: wait forever)")
	addStudentFlags(cmd)
	addMetricsFlag(cmd)
	addNetStudentFlags(cmd)
	return cmd
}

// studentJSON is student's JSON output.
type studentJSON struct {
	Out        string             `json:"out"`
	Steps      int                `json:"steps"`
	FinalValid float64            `json:"final_valid"`
	Tokens     int64              `json:"tokens"`
	Seconds    float64            `json:"seconds"`
	Curve      string             `json:"curve"`
	PPL        map[string]float64 `json:"ppl,omitempty"`
	// Protocol is the perplexity protocol of PPL; Tasks and Retained the zero-shot accuracy.
	Protocol model.Protocol               `json:"protocol,omitempty"`
	Tasks    map[string]model.TasksResult `json:"tasks,omitempty"`
	Retained map[string]retainedJSON      `json:"retained,omitempty"`
}

func runStudent(cmd *cobra.Command, _ []string) error {
	s, err := resolve(cmd)
	if err != nil {
		return err
	}
	if netStudentMode(s) {
		return runNetStudent(cmd, s)
	}
	runDir, out := s.str("run-dir"), s.str("out")
	if runDir == "" || out == "" {
		return errors.New("--run-dir and --out are required")
	}
	if _, err := os.Stat(out); err == nil {
		return fmt.Errorf("%s already exists; remove it or choose another --out", out)
	}
	if err := patch.CheckDest(out); err != nil { // before the distillation, not after it
		return err
	}
	if w := s.v.GetDuration("shard-wait"); w < 0 {
		return fmt.Errorf("--shard-wait %v must be ≥ 0", w)
	}
	plan, fit, p0, err := protocol.ReadRunDir(runDir)
	if err != nil {
		return err
	}
	cfg, err := trainConfig(s, plan.Settings.TopK)
	if err != nil {
		return err
	}
	modelPath := s.str("model")
	if modelPath == "" {
		modelPath = plan.Settings.Model
	}
	ds, err := evalDataSpec(s)
	if err != nil {
		return err
	}
	var tasks []*model.Task
	if files := s.list("eval-tasks"); len(files) > 0 { // checked before the training
		mcfg, err := model.ReadModelConfig(modelPath)
		if err != nil {
			return err
		}
		if tasks, err = loadTasks(modelPath, files, mcfg.Vocab, mcfg.MaxSeq); err != nil {
			return err
		}
	}
	ctx := cmd.Context()
	reg, stopMetrics, err := startMetrics(ctx, s)
	if err != nil {
		return err
	}
	defer stopMetrics()
	res, err := distill(ctx, distillSpec{runDir: runDir, modelPath: modelPath, plan: plan, fit: *fit, p0: p0, cfg: cfg,
		resume: s.flag("resume"), log: slog.Default(), shardWait: s.v.GetDuration("shard-wait"), metrics: reg.Student()})
	if err != nil {
		return err
	}
	m, err := model.LoadContext(ctx, modelPath)
	if err != nil {
		return err
	}
	rs := &runSetup{spec: pruneSpec{modelPath: modelPath, out: out, calib: plan.Settings.Calib, seqLen: plan.Settings.SeqLen,
		ridge: plan.Settings.Ridge, numPrune: plan.Settings.NumPrune, eval: s.str("eval"), evalWindows: s.num("eval-windows"), data: ds},
		plan: plan, runDir: runDir, tasks: tasks}
	exported, err := exportPatched(rs, *fit, m, res.P, "kd", kdExtra(res, cfg))
	if err != nil {
		return err
	}
	defer exported.Discard()
	out2 := studentJSON{Out: out, Steps: res.Result.Steps, FinalValid: res.Result.FinalValid, Tokens: res.Result.Tokens,
		Seconds: res.Result.Elapsed.Seconds(), Curve: res.CurvePNG}
	var p0m *tensor.Matrix
	if p0 != nil {
		p0m = tensor.FromData(m.Dim, m.Dim, p0)
	}
	ev, report, err := evaluateRun(ctx, rs, m, *fit, kdVariants(*fit, p0m, res.P), res.P)
	if err != nil {
		return err
	}
	if report != nil {
		defer report.Discard()
	}
	if err := commitOutputs(out, exported, report); err != nil {
		return err
	}
	w := cmd.OutOrStdout()
	fmt.Fprintf(w, "distilled %d steps (%d tokens) in %.1fs; final validation loss %.5f; curve %s; model written to %s\n",
		res.Result.Steps, res.Result.Tokens, res.Result.Elapsed.Seconds(), res.Result.FinalValid, res.CurvePNG, out)
	if ev.scores != nil {
		out2.PPL, out2.Protocol = map[string]float64{}, ev.protocol
		for n, sc := range ev.scores {
			out2.PPL[n] = sc.PPL
		}
	}
	out2.Tasks, out2.Retained = ev.tasks, ev.retained()
	printScores(w, ev)
	if s.flag("json") {
		return json.NewEncoder(w).Encode(out2)
	}
	return nil
}

// kdVariants are the models a distilled run is compared on: plain pruning, the
// training-free patch and the distilled one.
func kdVariants(fit protocol.FitResult, p0, pkd *tensor.Matrix) []patch.Variant {
	v := []patch.Variant{{Name: string(patch.MethodNone)}}
	if p0 != nil {
		v = append(v, patch.Variant{Name: fit.Method, P: p0})
	}
	return append(v, patch.Variant{Name: "kd", P: pkd})
}

// kdExtra is what linearpatch.json records about a distillation.
func kdExtra(res *distillResult, cfg student.TrainConfig) map[string]any {
	kd := map[string]any{"config": cfg, "steps": res.Result.Steps, "tokens": res.Result.Tokens,
		"final_valid_loss": res.Result.FinalValid, "seconds": res.Result.Elapsed.Seconds()}
	if cfg.EarlyStop > 0 && res.Result.BestP != nil {
		kd["exported"] = map[string]any{"step": res.Result.BestStep, "valid_loss": res.Result.BestValid}
	}
	return map[string]any{"kd": kd}
}

// checkRunSettings validates the settings only run has (its teachers and its student)
// before any work, so that a bad one never fails a run after its cache is built.
func checkRunSettings(s settings) error {
	if s.num("teachers") < 0 {
		return errors.New("--teachers must be ≥ 0")
	}
	if s.flag("distill") && s.str("train") != "" {
		return checkDistillSettings(s)
	}
	return nil
}
