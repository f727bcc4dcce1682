package student

import (
	"context"
	"crypto/sha256"
	binenc "encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"runtime"
	"slices"
	"sort"
	"strings"
	"time"

	"linearpatch/shards"
)

// ErrDiverged: a step produced a non-finite loss or gradient; P was not updated.
var ErrDiverged = errors.New("student: training diverged")

// TrainConfig are the distillation hyper-parameters; Validate fills the defaults (the
// paper's: AdamW lr 1e-4, weight decay 1e-4, betas 0.9/0.999, eps 1e-8, cosine decay to
// lr/20 over the run, 1 epoch, batch 1, top-k KL with k = 50).
type TrainConfig struct {
	LR          float64  `json:"lr"`           // base learning rate (0: 1e-4)
	WeightDecay float64  `json:"weight_decay"` // decoupled weight decay (0: 1e-4; < 0: none)
	Beta1       float64  `json:"beta1"`        // 0: 0.9
	Beta2       float64  `json:"beta2"`        // 0: 0.999
	Eps         float64  `json:"eps"`          // 0: 1e-8
	MinLRFrac   float64  `json:"min_lr_frac"`  // cosine floor as a fraction of LR (0: 1/20; < 0: decay to 0)
	Epochs      int      `json:"epochs"`       // 0: 1
	Batch       int      `json:"batch"`        // windows per step (0: 1); the step's gradient is the mean of theirs, summed in window order
	Loss        LossKind `json:"loss"`         // "": topk-kl; must equal the suffix's
	K           int      `json:"k"`            // top-k (0: 50); must equal the suffix's for topk-kl
	Seed        uint64   `json:"seed"`         // data-order seed; every value, 0 included, is a seed (DefaultTrainConfig: 1)
	// CheckpointEvery saves a checkpoint every so many steps (0: 100; < 0: only at the end
	// and when interrupted). It is the one field a resume may change.
	CheckpointEvery int `json:"checkpoint_every"`
	// EarlyStop stops after this many epochs in a row without a new best validation loss
	// (0: never). Needs validation windows.
	EarlyStop int `json:"early_stop"`
	// ValidEvery adds a validation pass every so many steps (0: only after each epoch). P0
	// is validated too, as step 0, when the first pass is due. Each pass needs every
	// validation shard: a student started before the cache is complete waits for them.
	ValidEvery int `json:"valid_every"`
}

// DefaultTrainConfig returns the paper's settings (Validate's defaults).
func DefaultTrainConfig() TrainConfig {
	c := TrainConfig{Seed: 1}
	_ = c.Validate()
	return c
}

// Validate fills zero fields with the defaults and checks the ranges. It is idempotent.
// Errors wrap ErrOptions.
func (c *TrainConfig) Validate() error {
	def := func(v *float64, d float64) {
		if *v == 0 {
			*v = d
		}
	}
	def(&c.LR, 1e-4)
	def(&c.WeightDecay, 1e-4)
	def(&c.Beta1, 0.9)
	def(&c.Beta2, 0.999)
	def(&c.Eps, 1e-8)
	def(&c.MinLRFrac, 1.0/20)
	if c.Epochs == 0 {
		c.Epochs = 1
	}
	if c.Batch == 0 {
		c.Batch = 1
	}
	if c.Loss == "" {
		c.Loss = LossTopKKL
	}
	if c.K == 0 {
		c.K = 50
	}
	if c.CheckpointEvery == 0 {
		c.CheckpointEvery = 100
	}
	for _, f := range []struct {
		name string
		v    float64
	}{{"lr", c.LR}, {"weight decay", c.WeightDecay}, {"beta1", c.Beta1}, {"beta2", c.Beta2}, {"eps", c.Eps}, {"min-lr fraction", c.MinLRFrac}} {
		if math.IsNaN(f.v) || math.IsInf(f.v, 0) {
			return fmt.Errorf("%w: %s %v", ErrOptions, f.name, f.v)
		}
	}
	switch {
	case c.LR < 0:
		return fmt.Errorf("%w: learning rate %v", ErrOptions, c.LR)
	case c.Beta1 < 0 || c.Beta1 >= 1 || c.Beta2 < 0 || c.Beta2 >= 1:
		return fmt.Errorf("%w: betas %v, %v outside [0, 1)", ErrOptions, c.Beta1, c.Beta2)
	case c.Eps < 0:
		return fmt.Errorf("%w: eps %v", ErrOptions, c.Eps)
	case c.MinLRFrac > 1:
		return fmt.Errorf("%w: min-lr fraction %v above 1", ErrOptions, c.MinLRFrac)
	case c.Epochs < 0 || c.Batch < 0 || c.K < 0 || c.EarlyStop < 0 || c.ValidEvery < 0:
		return fmt.Errorf("%w: epochs %d, batch %d, k %d, early-stop %d and valid-every %d must not be negative",
			ErrOptions, c.Epochs, c.Batch, c.K, c.EarlyStop, c.ValidEvery)
	}
	switch c.Loss {
	case LossTopKKL, LossFullKL, LossMSE:
	default:
		return fmt.Errorf("%w: loss %q (want topk-kl, full-kl or mse)", ErrOptions, c.Loss)
	}
	return nil
}

func (c *TrainConfig) weightDecay() float64 { return max(c.WeightDecay, 0) }
func (c *TrainConfig) minLRFrac() float64   { return max(c.MinLRFrac, 0) }

// Fingerprint is everything a checkpoint must agree on to be resumed bit-identically: the
// configuration (all of it but CheckpointEvery), the data (the run's shard Meta: run id,
// model fingerprint, cut, width, k, vocabulary, dtype; the plan's shards and window counts;
// the window length), P0, and the arithmetic (BLAS backend, CPU architecture). The shard
// files' checksums are checked as they are used (Checkpoint.ShardSHA256), since the
// student may start before the cache is complete.
type Fingerprint struct {
	Config TrainConfig       `json:"config"`
	Meta   shards.Meta       `json:"meta"`
	SeqLen int               `json:"seq_len"`
	Train  []ShardSpec       `json:"train"`
	Valid  []ShardSpec       `json:"valid"`
	P0     string            `json:"p0_sha256"`
	Build  string            `json:"build"`
	Extra  map[string]string `json:"extra,omitempty"`
}

// Hash returns the lowercase hex SHA-256 of f's JSON encoding.
func (f Fingerprint) Hash() string {
	b, err := json.Marshal(f)
	if err != nil {
		panic(fmt.Sprintf("student: fingerprint: %v", err)) // only finite floats and plain types
	}
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

func (f Fingerprint) clone() Fingerprint {
	f.Train = slices.Clone(f.Train)
	f.Valid = slices.Clone(f.Valid)
	if f.Extra != nil {
		e := make(map[string]string, len(f.Extra))
		for k, v := range f.Extra {
			e[k] = v
		}
		f.Extra = e
	}
	return f
}

// Diff returns, sorted, one line per field in which f and g differ: "path: f's value ≠
// g's value", with JSON paths such as config.lr or meta.run_id.
func (f Fingerprint) Diff(g Fingerprint) []string {
	a, b := flatJSON(f), flatJSON(g)
	var out []string
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			if !ok {
				w = "(absent)"
			}
			out = append(out, fmt.Sprintf("%s: %s ≠ %s", k, v, w))
		}
	}
	for k, w := range b {
		if _, ok := a[k]; !ok {
			out = append(out, fmt.Sprintf("%s: (absent) ≠ %s", k, w))
		}
	}
	sort.Strings(out)
	return out
}

func flatJSON(v any) map[string]string {
	b, _ := json.Marshal(v)
	var x any
	_ = json.Unmarshal(b, &x)
	out := map[string]string{}
	var walk func(prefix string, x any)
	walk = func(prefix string, x any) {
		switch t := x.(type) {
		case map[string]any:
			for k, v := range t {
				walk(joinPath(prefix, k), v)
			}
		case []any:
			if len(t) == 0 {
				out[prefix] = "[]"
			}
			for i, v := range t {
				walk(fmt.Sprintf("%s[%d]", prefix, i), v)
			}
		default:
			s, _ := json.Marshal(t)
			out[prefix] = string(s)
		}
	}
	walk("", x)
	return out
}

func joinPath(a, b string) string {
	if a == "" {
		return b
	}
	return a + "." + b
}

// hashP returns the hex SHA-256 of p's float32 bits, little-endian.
func hashP(p []float32) string {
	h := sha256.New()
	b := make([]byte, 0, 4*len(p))
	for _, v := range p {
		b = binenc.LittleEndian.AppendUint32(b, math.Float32bits(v))
	}
	h.Write(b)
	return hex.EncodeToString(h.Sum(nil))
}

// ProgressInfo is reported after every step.
type ProgressInfo struct {
	Step, TotalSteps int
	Epoch            int     // 0-based epoch of the step just done
	Loss             float64 // the step's mean loss over its batch
	GradNorm         float64 // ‖dL/dP‖₂
	LR               float64 // learning rate the step used
	ValidLoss        float64 // the latest validation loss (NaN before any)
	TokensPerSec     float64 // training tokens per second in this session
	ETA              time.Duration
	Elapsed          time.Duration // over all sessions
}

// TrainerOption configures a Trainer.
type TrainerOption func(*trainerOptions) error

type trainerOptions struct {
	progress func(ProgressInfo)
	log      *slog.Logger
	extra    map[string]string
}

// WithProgress calls fn after every step, on the goroutine running Run.
func WithProgress(fn func(ProgressInfo)) TrainerOption {
	return func(o *trainerOptions) error {
		if fn == nil {
			return fmt.Errorf("%w: nil progress function", ErrOptions)
		}
		o.progress = fn
		return nil
	}
}

// WithLogger sets the logger (default: discard). The trainer logs resumes, validation
// passes, checkpoints and early stops.
func WithLogger(l *slog.Logger) TrainerOption {
	return func(o *trainerOptions) error {
		if l == nil {
			return fmt.Errorf("%w: nil logger", ErrOptions)
		}
		o.log = l
		return nil
	}
}

// WithFingerprintExtra adds caller-defined entries (e.g. the P0 method) to the fingerprint.
func WithFingerprintExtra(kv map[string]string) TrainerOption {
	return func(o *trainerOptions) error {
		if o.extra == nil {
			o.extra = map[string]string{}
		}
		for k, v := range kv {
			o.extra[k] = v
		}
		return nil
	}
}

// Result is the outcome of a run.
type Result struct {
	P            []float32 // the final patch, d×d row-major
	BestP        []float32 // the patch at the lowest validation loss (nil without validation)
	BestStep     int
	BestValid    float64 // NaN without validation
	FinalValid   float64 // validation loss of P (NaN without validation windows)
	Steps        int     // steps done (< TotalSteps after an early stop)
	TotalSteps   int
	EarlyStopped bool
	TrainLoss    []CurvePoint
	ValidLoss    []CurvePoint
	Tokens       int64         // training tokens processed over all sessions
	Elapsed      time.Duration // training time over all sessions
	ResumedFrom  int           // step the last Run started from (0: fresh)
}

// Trainer distills P: it owns the loop, the optimizer and the checkpoints. A Trainer is
// not safe for concurrent use, nor are its Suffix and ShardData while it runs.
//
// A step of B windows computes each window's gradient alone (its own forward and backward
// through a graph of one window, whatever B) and sums them in float64 in window order,
// then divides by B (StepGradient); AdamW takes that float64 mean. So a step's result does
// not depend on where its windows' gradients were computed: Run is the loop of
// StepWindows, WindowGradient and ApplyStep in one process, and callers that split a
// step's windows between trainers (other goroutines, other machines) and add their
// WindowGrads to one StepGradient get the same P bit for bit (same build, same kind of CPU).
type Trainer struct {
	s     *Suffix
	data  *ShardData
	cfg   TrainConfig
	store CheckpointStore
	o     trainerOptions
	log   *slog.Logger

	fp     Fingerprint
	fpHash string
	p0     []float32
	seqLen int
	spe    int // steps per epoch
	total  int
	valid  []WindowRef

	orderEpoch int
	order      []WindowRef
}

// NewTrainer returns a trainer of s's patch on data with cfg (validated here). P0 is s's
// patch now. store may be nil: no checkpoints, no resume. cfg.Loss and cfg.K must be the
// suffix's; the data's Meta must fit the suffix (width, cut end, k for topk-kl, final
// hidden states for full-kl and mse). Errors wrap ErrOptions or ErrData.
func NewTrainer(s *Suffix, data *ShardData, cfg TrainConfig, store CheckpointStore, opts ...TrainerOption) (*Trainer, error) {
	if s == nil || data == nil {
		return nil, fmt.Errorf("%w: nil suffix or data", ErrOptions)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	t := &Trainer{s: s, data: data, cfg: cfg, store: store, orderEpoch: -1}
	for _, o := range opts {
		if err := o(&t.o); err != nil {
			return nil, err
		}
	}
	t.log = t.o.log
	if t.log == nil {
		t.log = slog.New(slog.DiscardHandler)
	}
	so := s.Options()
	meta := data.Meta()
	switch {
	case cfg.Loss != so.Loss:
		return nil, fmt.Errorf("%w: config loss %s, suffix loss %s", ErrOptions, cfg.Loss, so.Loss)
	case cfg.Loss == LossTopKKL && cfg.K != so.K:
		return nil, fmt.Errorf("%w: config top-k %d, suffix top-k %d", ErrOptions, cfg.K, so.K)
	case meta.Dim != s.d:
		return nil, fmt.Errorf("%w: shards of width %d, model %d", ErrData, meta.Dim, s.d)
	case meta.End != s.end:
		return nil, fmt.Errorf("%w: shards cut at [%d, %d), suffix starts at layer %d", ErrData, meta.Start, meta.End, s.end)
	case cfg.Loss == LossTopKKL && meta.K != cfg.K:
		return nil, fmt.Errorf("%w: shards hold top-%d targets, loss needs top-%d", ErrData, meta.K, cfg.K)
	case cfg.Loss != LossTopKKL && !meta.Final:
		return nil, fmt.Errorf("%w: loss %s needs the final hidden states (cache with --cache-final)", ErrData, cfg.Loss)
	case cfg.EarlyStop > 0 && data.ValidWindows() == 0:
		return nil, fmt.Errorf("%w: early stop needs validation windows", ErrOptions)
	}
	t.seqLen = so.SeqLen
	t.spe = (data.TrainWindows() + cfg.Batch - 1) / cfg.Batch
	t.total = cfg.Epochs * t.spe
	t.p0 = s.P()
	train, valid := data.Plan()
	t.valid = validOrder(valid)
	fc := cfg
	fc.CheckpointEvery = 0
	meta.SchemaVersion = shards.SchemaVersion
	t.fp = Fingerprint{Config: fc, Meta: meta, SeqLen: so.SeqLen, Train: train, Valid: valid,
		P0: hashP(t.p0), Build: BLASBackend + "/" + runtime.GOARCH, Extra: t.o.extra}
	t.fpHash = t.fp.Hash()
	return t, nil
}

// Fingerprint returns what a checkpoint must match, and its hash.
func (t *Trainer) Fingerprint() (Fingerprint, string) { return t.fp.clone(), t.fpHash }

// TotalSteps returns epochs × ⌈train windows / batch⌉.
func (t *Trainer) TotalSteps() int { return t.total }

// Run trains to the end of the schedule (or an early stop) and returns the result. With
// resume, it continues from the store's checkpoint when there is one (a finished run
// returns its result at once); a checkpoint with another fingerprint is refused with an
// error wrapping ErrCheckpointMismatch that names the differences. Without resume it
// starts from P0, ignoring (and, at the first save, replacing) any checkpoint.
//
// Checkpoints are saved every CheckpointEvery steps, at the end, and when Run returns
// early (ctx ended, a shard failed) so that no finished step is lost; a process killed
// outright resumes from the last periodic one. The final P is bit-identical whatever the
// interruptions (same build, same data). Errors: ctx's (wrapped), a shard's (wrapping
// shards.ErrChecksum: refetch the shard, then Run again with resume), ErrData,
// ErrDiverged, ErrCheckpointMismatch, ErrCheckpointCorrupt, the store's, the suffix's.
func (t *Trainer) Run(ctx context.Context, resume bool) (*Result, error) {
	defer t.data.Release()
	ck, err := t.start(ctx, resume)
	if err != nil {
		return nil, err
	}
	h := loopHooks{step: t.step, saveOnAbort: true}
	if t.store != nil {
		h.save = t.store.Save
	}
	return t.loop(ctx, ck, h)
}

// loopHooks are what Run and RunShared do differently: how a step is computed, how a
// checkpoint is saved, and what happens before each step.
type loopHooks struct {
	step        func(ctx context.Context, ck *Checkpoint) (ProgressInfo, error)
	save        func(ctx context.Context, ck *Checkpoint) error // nil: no checkpoints
	saveOnAbort bool                                            // save the state reached when returning early
	// before, if set, runs before each step (after its validation and checkpoint) and may
	// replace the state (a newer checkpoint another student saved).
	before func(ctx context.Context, ck *Checkpoint) (*Checkpoint, error)
}

// loop trains from ck to the end of the schedule (or an early stop): validation passes,
// checkpoints, progress; the steps themselves are h.step's.
func (t *Trainer) loop(ctx context.Context, ck *Checkpoint, h loopHooks) (*Result, error) {
	resumedFrom := ck.Step
	if ck.Done {
		t.log.Info("student: run already finished", "step", ck.Step)
		return t.result(ck, resumedFrom), nil
	}
	t.s.SetP(ck.P)
	sess := session{start: time.Now(), base: ck.Elapsed, step0: ck.Step}
	lastSaved := ck.Step
	save := func(c context.Context) error {
		if h.save == nil {
			return nil
		}
		ck.Elapsed = sess.elapsed()
		if err := h.save(c, ck); err != nil {
			return err
		}
		lastSaved = ck.Step
		t.log.Debug("student: checkpoint saved", "step", ck.Step)
		return nil
	}
	// abort saves the state (at a step boundary) before returning err.
	abort := func(err error) (*Result, error) {
		if h.saveOnAbort && h.save != nil && ck.Step != lastSaved {
			if serr := save(context.WithoutCancel(ctx)); serr != nil {
				err = errors.Join(err, fmt.Errorf("student: saving the checkpoint at step %d: %w", ck.Step, serr))
			}
		}
		return nil, err
	}
	for {
		if t.validDue(ck.Step) && !validated(ck, ck.Step) {
			if len(ck.ValidLoss) == 0 {
				// P0's pass, deferred to the first one due: the validation shards come last
				// in the plan, so a student started before the cache is complete would
				// otherwise wait for the whole cache before its first step.
				t.s.SetP(t.p0)
				v0, err := t.validate(ctx, ck, 0)
				t.s.SetP(ck.P)
				if err != nil {
					return abort(err)
				}
				t.recordValid(ck, 0, v0, t.p0)
			}
			v, err := t.validate(ctx, ck, ck.Step)
			if err != nil {
				return abort(err)
			}
			t.recordValid(ck, ck.Step, v, ck.P)
		}
		if ck.Step >= t.total || t.stopEarly(ck) {
			break
		}
		if err := ctx.Err(); err != nil {
			return abort(fmt.Errorf("student: training interrupted at step %d: %w", ck.Step, err))
		}
		if t.cfg.CheckpointEvery > 0 && ck.Step%t.cfg.CheckpointEvery == 0 && ck.Step != lastSaved {
			if err := save(ctx); err != nil {
				return nil, err
			}
		}
		if h.before != nil {
			nck, err := h.before(ctx, ck)
			if err != nil {
				return abort(err)
			}
			if nck != ck {
				ck, lastSaved = nck, nck.Step
				sess = session{start: time.Now(), base: ck.Elapsed, step0: ck.Step}
				t.s.SetP(ck.P)
				if ck.Done {
					t.log.Info("student: run already finished", "step", ck.Step)
					return t.result(ck, resumedFrom), nil
				}
				continue
			}
		}
		info, err := h.step(ctx, ck)
		if errors.Is(err, errBehind) {
			continue // h.before loads the newer checkpoint
		}
		if err != nil {
			return abort(err)
		}
		if t.o.progress != nil {
			info.ValidLoss = math.NaN()
			if n := len(ck.ValidLoss); n > 0 {
				info.ValidLoss = ck.ValidLoss[n-1].Loss
			}
			info.Elapsed = sess.elapsed()
			if done := ck.Step - sess.step0; done > 0 {
				el := time.Since(sess.start)
				info.TokensPerSec = float64(t.tokens(ck.Step)-t.tokens(sess.step0)) / el.Seconds()
				info.ETA = time.Duration(float64(el) / float64(done) * float64(t.total-ck.Step))
			}
			t.o.progress(info)
		}
	}
	if ck.Step < t.total {
		t.log.Info("student: early stop", "step", ck.Step, "best_step", ck.BestStep, "best", ck.BestValid)
	}
	ck.Done = true
	if err := save(context.WithoutCancel(ctx)); err != nil {
		return nil, err
	}
	if h.save == nil {
		ck.Elapsed = sess.elapsed()
	}
	return t.result(ck, resumedFrom), nil
}

type session struct {
	start time.Time
	base  time.Duration
	step0 int
}

func (s session) elapsed() time.Duration { return s.base + time.Since(s.start) }

// start loads the checkpoint to resume from, or builds the initial state.
func (t *Trainer) start(ctx context.Context, resume bool) (*Checkpoint, error) {
	if resume && t.store != nil {
		ck, err := t.store.Load(ctx)
		switch {
		case errors.Is(err, ErrNoCheckpoint):
		case err != nil:
			return nil, err
		default:
			if err := t.check(ck); err != nil {
				return nil, err
			}
			t.log.Info("student: resuming", "step", ck.Step, "of", t.total, "done", ck.Done)
			return ck, nil
		}
	}
	n := len(t.p0)
	return &Checkpoint{P: slices.Clone(t.p0), M: make([]float64, n), V: make([]float64, n),
		Fingerprint: t.fpHash, Identity: t.fp.clone(), BestValid: math.Inf(1),
		ShardSHA256: map[int]string{}}, nil
}

// check refuses a checkpoint of another run, or one inconsistent with this trainer.
func (t *Trainer) check(ck *Checkpoint) error {
	if ck.Fingerprint != t.fpHash {
		diff := ck.Identity.Diff(t.fp)
		if len(diff) == 0 || ck.Identity.Hash() != ck.Fingerprint {
			diff = append(diff, fmt.Sprintf("fingerprint: %s ≠ %s", ck.Fingerprint, t.fpHash))
		}
		return fmt.Errorf("%w (checkpoint ≠ now): %s; start over without resume to discard it", ErrCheckpointMismatch, strings.Join(diff, "; "))
	}
	switch {
	case len(ck.P) != len(t.p0):
		return fmt.Errorf("%w: P has %d values, want %d", ErrCheckpointCorrupt, len(ck.P), len(t.p0))
	case ck.Step > t.total || ck.AdamStep != ck.Step:
		return fmt.Errorf("%w: step %d (adam %d) of %d", ErrCheckpointCorrupt, ck.Step, ck.AdamStep, t.total)
	}
	if ck.ShardSHA256 == nil {
		ck.ShardSHA256 = map[int]string{}
	}
	return nil
}

// validDue reports whether a validation pass belongs at step: at every epoch end and every
// ValidEvery steps (P0's, at step 0, is run with the first of them).
func (t *Trainer) validDue(step int) bool {
	if t.data.ValidWindows() == 0 || step == 0 {
		return false
	}
	return step%t.spe == 0 || (t.cfg.ValidEvery > 0 && step%t.cfg.ValidEvery == 0)
}

// recordValid adds the validation loss v of patch p at step to the curve and the best.
func (t *Trainer) recordValid(ck *Checkpoint, step int, v float64, p []float32) {
	ck.ValidLoss = append(ck.ValidLoss, CurvePoint{step, v})
	if v < ck.BestValid {
		ck.BestValid, ck.BestStep = v, step
		ck.BestP = append(ck.BestP[:0], p...)
	}
	t.log.Info("student: validation", "step", step, "loss", v, "best", ck.BestValid, "best_step", ck.BestStep)
}

func validated(ck *Checkpoint, step int) bool {
	n := len(ck.ValidLoss)
	return n > 0 && ck.ValidLoss[n-1].Step == step
}

// stopEarly reports whether, at an epoch end, EarlyStop epochs have passed since the epoch
// of the best validation loss (P0's counts as epoch −1).
func (t *Trainer) stopEarly(ck *Checkpoint) bool {
	if t.cfg.EarlyStop == 0 || ck.Step == 0 || ck.Step%t.spe != 0 || !validated(ck, ck.Step) {
		return false
	}
	ended := ck.Step/t.spe - 1
	best := -1
	if ck.BestStep > 0 {
		best = (ck.BestStep - 1) / t.spe
	}
	return ended-best >= t.cfg.EarlyStop
}

// tokens returns the training tokens of the first step steps.
func (t *Trainer) tokens(step int) int64 {
	n := t.data.TrainWindows()
	e, k := step/t.spe, step%t.spe
	return int64(e*n+min(k*t.cfg.Batch, n)) * int64(t.seqLen)
}

func (t *Trainer) epochOrder(e int) []WindowRef {
	if t.orderEpoch != e {
		t.order, t.orderEpoch = t.data.Order(t.cfg.Seed, e), e
	}
	return t.order
}

// batch fetches the windows of refs and checks them against the checkpoint's record of
// shard checksums and the window length.
func (t *Trainer) batch(ctx context.Context, ck *Checkpoint, refs []WindowRef) (*fetched, error) {
	f, err := t.data.fetch(ctx, refs)
	if err != nil {
		return nil, err
	}
	for sh, sum := range f.shards {
		if old, ok := ck.ShardSHA256[sh]; ok && old != sum {
			return nil, fmt.Errorf("%w: shard %d's file changed (sha256 %s, the checkpoint used %s); start over without resume",
				ErrCheckpointMismatch, sh, sum, old)
		}
		ck.ShardSHA256[sh] = sum
	}
	for i, ex := range f.ex {
		if len(ex.XCut) != t.seqLen*t.s.d {
			return nil, fmt.Errorf("%w: window %d has %d tokens, the suffix takes %d", ErrData, f.ids[i], len(ex.XCut)/t.s.d, t.seqLen)
		}
	}
	return f, nil
}

// StepWindows returns the windows of step (0-based), in window order: the windows whose
// gradients the step sums. It panics unless 0 ≤ step < TotalSteps.
func (t *Trainer) StepWindows(step int) []WindowRef {
	if step < 0 || step >= t.total {
		panic(fmt.Sprintf("student: StepWindows(%d) of %d steps", step, t.total))
	}
	e, k := step/t.spe, step%t.spe
	order := t.epochOrder(e)
	return slices.Clone(order[k*t.cfg.Batch : min((k+1)*t.cfg.Batch, len(order))])
}

// WindowGradient computes the gradient of window ref's loss at patch p (d×d): its own
// forward and backward, bit-identical wherever and alongside whatever it is computed (same
// build, same kind of CPU). It leaves the trainer's suffix at p. It is the unit of work a
// step's windows can be split into: StepGradient sums the results in window order and
// ApplyStep applies them. It panics unless len(p) == d·d. Errors: the data's (a shard's
// checksum: shards.ErrChecksum; ErrData), ctx's, the suffix's (ErrBatch, ErrGraph).
func (t *Trainer) WindowGradient(ctx context.Context, p []float32, ref WindowRef) (WindowGrad, error) {
	f, err := t.data.fetch(ctx, []WindowRef{ref})
	if err != nil {
		return WindowGrad{}, err
	}
	if len(f.ex[0].XCut) != t.seqLen*t.s.d {
		return WindowGrad{}, fmt.Errorf("%w: window %d has %d tokens, the suffix takes %d", ErrData, f.ids[0], len(f.ex[0].XCut)/t.s.d, t.seqLen)
	}
	t.s.SetP(p)
	g, loss, err := t.s.WindowGradient(f.ex[0])
	if err != nil {
		return WindowGrad{}, fmt.Errorf("student: window %+v: %w", ref, err)
	}
	return WindowGrad{Ref: ref, Grad: g, Loss: loss, ShardSHA256: f.shards[ref.Shard], Fingerprint: t.fpHash}, nil
}

// Release stops the data's background loading; call it when done driving steps without
// Run (Run releases the data itself). The trainer stays usable.
func (t *Trainer) Release() { t.data.Release() }

// Start returns the state training goes on from: with resume, the store's checkpoint when
// there is one (checked as Run checks it), else the state at P0. It is for callers that
// drive the steps themselves (WindowGradient, ApplyStep); Run calls it. Errors as Run's.
func (t *Trainer) Start(ctx context.Context, resume bool) (*Checkpoint, error) {
	return t.start(ctx, resume)
}

// ApplyStep applies step ck.Step from its gradient g: it checks that g is that step's
// and complete and that its shards' checksums agree with those ck recorded, applies AdamW
// (cosine schedule) to ck.P with g's mean gradient, records the shards and the step's loss
// in ck and advances it by one step; the trainer's suffix is left at the new P. g is
// consumed. Errors: ErrStepGradient (another step, windows missing, g used),
// ErrCheckpointMismatch (a shard changed), ErrDiverged (ck unchanged).
func (t *Trainer) ApplyStep(ck *Checkpoint, g *StepGradient) (ProgressInfo, error) {
	if ck.Step >= t.total {
		return ProgressInfo{}, fmt.Errorf("%w: step %d of a run of %d steps", ErrStepGradient, ck.Step+1, t.total)
	}
	if g.step != ck.Step || g.size != len(ck.P) || !slices.Equal(g.refs, t.StepWindows(ck.Step)) {
		return ProgressInfo{}, fmt.Errorf("%w: a gradient of step %d over %d windows, the checkpoint is at step %d",
			ErrStepGradient, g.step+1, len(g.refs), ck.Step+1)
	}
	for sh, sum := range g.shards {
		if old, ok := ck.ShardSHA256[sh]; ok && old != sum {
			return ProgressInfo{}, fmt.Errorf("%w: shard %d's file changed (sha256 %s, the checkpoint used %s); start over without resume",
				ErrCheckpointMismatch, sh, sum, old)
		}
	}
	grad, loss, err := g.mean()
	if err != nil {
		return ProgressInfo{}, err
	}
	var g2 float64
	for _, v := range grad {
		g2 += v * v
	}
	if math.IsNaN(loss) || math.IsInf(loss, 0) || math.IsNaN(g2) || math.IsInf(g2, 0) {
		return ProgressInfo{}, fmt.Errorf("%w: step %d: loss %v, squared gradient norm %v", ErrDiverged, ck.Step+1, loss, g2)
	}
	for sh, sum := range g.shards {
		ck.ShardSHA256[sh] = sum
	}
	cfg := &t.cfg
	adam := &AdamW{LR: cfg.LR, WeightDecay: cfg.weightDecay(), Beta1: cfg.Beta1, Beta2: cfg.Beta2,
		Eps: cfg.Eps, M: ck.M, V: ck.V, Step: ck.AdamStep}
	e := ck.Step / t.spe
	lr := CosineLR(cfg.LR, ck.Step, t.total, cfg.minLRFrac())
	adam.Update64(ck.P, grad, lr)
	t.s.SetP(ck.P)
	ck.Step++
	ck.AdamStep = adam.Step
	ck.Epoch, ck.Cursor = ck.Step/t.spe, min(ck.Step%t.spe*cfg.Batch, t.data.TrainWindows())
	ck.TrainLoss = append(ck.TrainLoss, CurvePoint{ck.Step, loss})
	return ProgressInfo{Step: ck.Step, TotalSteps: t.total, Epoch: e, Loss: loss, GradNorm: math.Sqrt(g2), LR: lr}, nil
}

// step runs one optimizer step and advances ck: every window's gradient in window order,
// then ApplyStep.
func (t *Trainer) step(ctx context.Context, ck *Checkpoint) (ProgressInfo, error) {
	refs := t.StepWindows(ck.Step)
	f, err := t.batch(ctx, ck, refs)
	if err != nil {
		return ProgressInfo{}, err
	}
	g := NewStepGradient(ck.Step, refs, len(ck.P))
	for i, ex := range f.ex {
		grad, loss, err := t.s.WindowGradient(ex)
		if err != nil {
			return ProgressInfo{}, fmt.Errorf("student: step %d, window %+v: %w", ck.Step+1, refs[i], err)
		}
		if err := g.Add(WindowGrad{Ref: refs[i], Grad: grad, Loss: loss, ShardSHA256: f.shards[refs[i].Shard]}); err != nil {
			return ProgressInfo{}, err
		}
	}
	return t.ApplyStep(ck, g)
}

// validate returns the mean loss of the suffix's patch (P at step) over all validation
// windows: each window's loss alone (WindowLoss), summed in window order; the windows are
// read cfg.Batch at a time.
func (t *Trainer) validate(ctx context.Context, ck *Checkpoint, step int) (float64, error) {
	var sum float64
	for lo := 0; lo < len(t.valid); lo += t.cfg.Batch {
		if err := ctx.Err(); err != nil {
			return 0, fmt.Errorf("student: validation at step %d interrupted: %w", step, err)
		}
		f, err := t.batch(ctx, ck, t.valid[lo:min(lo+t.cfg.Batch, len(t.valid))])
		if err != nil {
			return 0, err
		}
		for _, ex := range f.ex {
			l, err := t.s.WindowLoss(ex)
			if err != nil {
				return 0, fmt.Errorf("student: validation at step %d: %w", step, err)
			}
			sum += l
		}
	}
	return sum / float64(len(t.valid)), nil
}

func (t *Trainer) result(ck *Checkpoint, resumedFrom int) *Result {
	r := &Result{P: slices.Clone(ck.P), BestStep: ck.BestStep, BestValid: math.NaN(), FinalValid: math.NaN(),
		Steps: ck.Step, TotalSteps: t.total, EarlyStopped: ck.Step < t.total,
		TrainLoss: slices.Clone(ck.TrainLoss), ValidLoss: slices.Clone(ck.ValidLoss),
		Tokens: t.tokens(ck.Step), Elapsed: ck.Elapsed, ResumedFrom: resumedFrom}
	if ck.BestP != nil {
		r.BestP, r.BestValid = slices.Clone(ck.BestP), ck.BestValid
	}
	if validated(ck, ck.Step) {
		r.FinalValid = ck.ValidLoss[len(ck.ValidLoss)-1].Loss
	}
	return r
}
