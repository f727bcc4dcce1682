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

	"linearpatch/coordinator"
	"linearpatch/model"
	"linearpatch/model/tensor"
	"linearpatch/patch"
	"linearpatch/student"
	"linearpatch/teacher"
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

// trainConfig reads the distillation settings.
func trainConfig(s settings, topK int) (student.TrainConfig, error) {
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
	plan      *coordinator.Plan
	fit       coordinator.FitResult
	p0        []float32
	cfg       student.TrainConfig
	resume    bool
	mirror    jetstream.ObjectStore // optional second home of the checkpoints
	log       *slog.Logger
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
	var read []string
	m, err := model.Load(d.modelPath, model.WithLayers(d.fit.End, cfg.Layers), model.WithoutEmbeddings(), model.WithReadLog(&read))
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
	suffix, err := student.NewSuffix(m, d.fit.End, p0, student.SuffixOptions{SeqLen: p.Settings.SeqLen, Batch: d.cfg.Batch, Loss: d.cfg.Loss, K: d.cfg.K})
	if err != nil {
		return nil, err
	}
	var train, valid []student.ShardSpec
	for _, s := range p.Cache {
		spec := student.ShardSpec{Shard: s.ID, Windows: s.Windows}
		if s.Split == coordinator.SplitValid {
			valid = append(valid, spec)
		} else {
			train = append(train, spec)
		}
	}
	data, err := student.NewShardData(filepath.Join(d.runDir, "cache"), meta, train, valid, student.WithManifestPoll(500*time.Millisecond))
	if err != nil {
		return nil, err
	}
	defer data.Release()
	var store student.CheckpointStore = student.NewFileCheckpointStore(studentDir(d.runDir))
	if d.mirror != nil {
		store = mirroredStore{primary: store, mirror: d.mirror, log: d.log}
	}
	var bar *progress
	trainer, err := student.NewTrainer(suffix, data, d.cfg, store, student.WithLogger(d.log),
		student.WithFingerprintExtra(map[string]string{"p0_method": d.fit.Method, "run": p.RunID}),
		student.WithProgress(func(pi student.ProgressInfo) {
			if bar == nil {
				bar = newProgress("distill", "steps", pi.TotalSteps)
			}
			bar.Set(pi.Step)
			if pi.Step%50 == 0 || pi.Step == pi.TotalSteps {
				d.log.Debug("distill", "step", pi.Step, "loss", pi.Loss, "grad_norm", pi.GradNorm, "lr", pi.LR,
					"tokens_per_s", fmt.Sprintf("%.0f", pi.TokensPerSec), "eta", pi.ETA.Round(time.Second))
			}
		}))
	if err != nil {
		return nil, err
	}
	res, err := trainer.Run(ctx, d.resume)
	if bar != nil {
		bar.Finish()
	}
	if err != nil {
		return nil, err
	}
	curve := filepath.Join(studentDir(d.runDir), "kd_curve.png")
	if err := student.WriteCurvePNG(curve, res.TrainLoss, res.ValidLoss); err != nil {
		return nil, err
	}
	return &distillResult{P: tensor.FromData(m.Dim, m.Dim, res.P), Result: res, CurvePNG: curve, ReadNames: read}, nil
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

const checkpointObject = "student.checkpoint"

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
	b, oerr := s.mirror.GetBytes(ctx, checkpointObject)
	if oerr != nil {
		return nil, student.ErrNoCheckpoint
	}
	return student.UnmarshalCheckpoint(b)
}

func newStudentCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "student --run-dir DIR --out OUT",
		Short: "Distill the patch offline from a run's activation cache",
		Long: `Train only the d×d patch P from the cached activations of a run (run-dir/cache),
starting from the run's training-free patch: X_i·P → layers j..L−1 → final norm → head,
top-k KL to the teacher (the paper's loss; --loss full-kl and mse need a cache made with
--cache-final). Only the layers after the cut, the final norm and the head are loaded.
Checkpoints (P, Adam moments, step, data position, config fingerprint) go to
run-dir/student every --checkpoint-every steps; --resume continues from the last one and
refuses one made with other settings. The distilled model is exported to --out (method kd).`,
		Args: cobra.NoArgs,
		RunE: runStudent,
	}
	cmd.Flags().String("run-dir", "", "the run directory (required)")
	cmd.Flags().String("model", "", "the original model (default: the run's)")
	cmd.Flags().String("out", "", "output directory for the distilled model (must not exist; required)")
	cmd.Flags().Bool("resume", false, "continue from the run directory's checkpoint")
	cmd.Flags().String("eval", "", "evaluation data: compare dense, none, the training-free patch and kd")
	cmd.Flags().Int("eval-windows", 0, "evaluate only the first N windows of --eval (0: all)")
	cmd.Flags().Bool("json", false, "print the result as one JSON object on the last line of stdout")
	addStudentFlags(cmd)
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
}

func runStudent(cmd *cobra.Command, _ []string) error {
	s, err := resolve(cmd)
	if err != nil {
		return err
	}
	runDir, out := s.str("run-dir"), s.str("out")
	if runDir == "" || out == "" {
		return errors.New("--run-dir and --out are required")
	}
	if _, err := os.Stat(out); err == nil {
		return fmt.Errorf("%s already exists; remove it or choose another --out", out)
	}
	plan, fit, p0, err := coordinator.ReadRunDir(runDir)
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
	ctx := cmd.Context()
	res, err := distill(ctx, distillSpec{runDir: runDir, modelPath: modelPath, plan: plan, fit: *fit, p0: p0, cfg: cfg,
		resume: s.flag("resume"), log: slog.Default()})
	if err != nil {
		return err
	}
	m, err := model.Load(modelPath)
	if err != nil {
		return err
	}
	rs := &runSetup{spec: pruneSpec{modelPath: modelPath, out: out, calib: plan.Settings.Calib, seqLen: plan.Settings.SeqLen,
		ridge: plan.Settings.Ridge, numPrune: plan.Settings.NumPrune, eval: s.str("eval"), evalWindows: s.num("eval-windows")}, plan: plan, runDir: runDir}
	if err := exportPatched(rs, *fit, m, res.P, "kd", kdExtra(res, cfg)); err != nil {
		return err
	}
	out2 := studentJSON{Out: out, Steps: res.Result.Steps, FinalValid: res.Result.FinalValid, Tokens: res.Result.Tokens,
		Seconds: res.Result.Elapsed.Seconds(), Curve: res.CurvePNG}
	var p0m *tensor.Matrix
	if p0 != nil {
		p0m = tensor.FromData(m.Dim, m.Dim, p0)
	}
	scores, err := evaluateRun(ctx, rs, m, *fit, kdVariants(*fit, p0m, res.P), res.P)
	if err != nil {
		return err
	}
	w := cmd.OutOrStdout()
	fmt.Fprintf(w, "distilled %d steps (%d tokens) in %.1fs; final validation loss %.5f; curve %s; model written to %s\n",
		res.Result.Steps, res.Result.Tokens, res.Result.Elapsed.Seconds(), res.Result.FinalValid, res.CurvePNG, out)
	if scores != nil {
		out2.PPL = map[string]float64{}
		for n, sc := range scores {
			out2.PPL[n] = sc.PPL
		}
		printScores(w, scores)
	}
	if s.flag("json") {
		return json.NewEncoder(w).Encode(out2)
	}
	return nil
}

// kdVariants are the models a distilled run is compared on: plain pruning, the
// training-free patch and the distilled one.
func kdVariants(fit coordinator.FitResult, p0, pkd *tensor.Matrix) []patch.Variant {
	v := []patch.Variant{{Name: string(patch.MethodNone)}}
	if p0 != nil {
		v = append(v, patch.Variant{Name: fit.Method, P: p0})
	}
	return append(v, patch.Variant{Name: "kd", P: pkd})
}

// kdExtra is what linearpatch.json records about a distillation.
func kdExtra(res *distillResult, cfg student.TrainConfig) map[string]any {
	return map[string]any{
		"kd": map[string]any{"config": cfg, "steps": res.Result.Steps, "tokens": res.Result.Tokens,
			"final_valid_loss": res.Result.FinalValid, "seconds": res.Result.Elapsed.Seconds()},
	}
}
