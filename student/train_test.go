package student

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"linearpatch/shards"
)

// testConfig: 2 epochs of 9 steps (18 windows, batch 2), validation every 5 steps and at
// epoch ends, checkpoints every 4 steps; a learning rate the tiny model learns with.
func testConfig() TrainConfig {
	return TrainConfig{LR: 2e-2, Epochs: 2, Batch: 2, K: 8, Seed: 3, CheckpointEvery: 4, ValidEvery: 5}
}

func (fx *fixture) trainer(t testing.TB, cfg TrainConfig, store CheckpointStore, opts ...TrainerOption) *Trainer {
	t.Helper()
	loss := cfg.Loss
	if loss == "" {
		loss = LossTopKKL
	}
	s, err := NewSuffix(fx.student(t), fx.end, nil, SuffixOptions{SeqLen: fx.T, Loss: loss, K: fx.K})
	if err != nil {
		t.Fatal(err)
	}
	tr, err := NewTrainer(s, fx.data(t), cfg, store, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return tr
}

func mean(c []CurvePoint) float64 {
	var s float64
	for _, p := range c {
		s += p.Loss
	}
	return s / float64(len(c))
}

func TestTrainLossDecreases(t *testing.T) {
	fx := newFixture(t, t.TempDir(), defaultFixture())
	cfg := testConfig()
	cfg.Epochs = 4
	var infos []ProgressInfo
	tr := fx.trainer(t, cfg, nil, WithProgress(func(p ProgressInfo) { infos = append(infos, p) }))
	res, err := tr.Run(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	if res.Steps != 36 || res.TotalSteps != 36 || len(res.TrainLoss) != 36 || len(infos) != 36 {
		t.Fatalf("steps %d of %d, %d train points, %d progress reports; want 36", res.Steps, res.TotalSteps, len(res.TrainLoss), len(infos))
	}
	if res.Tokens != 4*18*16 || res.EarlyStopped {
		t.Fatalf("tokens %d, early stop %v", res.Tokens, res.EarlyStopped)
	}
	// Validation: P0 at step 0, every 5 steps, every epoch end (9, 18, 27, 36).
	var vs []int
	for _, p := range res.ValidLoss {
		vs = append(vs, p.Step)
	}
	if want := []int{0, 5, 9, 10, 15, 18, 20, 25, 27, 30, 35, 36}; !slices.Equal(vs, want) {
		t.Fatalf("validation at steps %v, want %v", vs, want)
	}
	v0, vEnd := res.ValidLoss[0].Loss, res.FinalValid
	first, last := mean(res.TrainLoss[:9]), mean(res.TrainLoss[27:])
	t.Logf("validation %.4f → %.4f (best %.4f at step %d); train epoch 1 %.4f, epoch 4 %.4f", v0, vEnd, res.BestValid, res.BestStep, first, last)
	if !(vEnd < 0.8*v0) || !(last < 0.8*first) {
		t.Fatalf("loss did not decrease: validation %.4f → %.4f, train %.4f → %.4f", v0, vEnd, first, last)
	}
	if res.BestValid > vEnd || res.BestP == nil {
		t.Fatalf("best %v above final %v", res.BestValid, vEnd)
	}
	png := filepath.Join(t.TempDir(), "loss.png")
	if keep := os.Getenv("STUDENT_TRAIN_PNG"); keep != "" {
		png = keep
	}
	if err := WriteCurvePNG(png, res.TrainLoss, res.ValidLoss); err != nil {
		t.Fatal(err)
	}
	// The schedule: cosine from LR to LR/20.
	if infos[0].LR != cfg.LR || infos[35].LR != CosineLR(cfg.LR, 35, 36, 1.0/20) || infos[35].LR >= infos[18].LR {
		t.Fatalf("learning rates %v … %v … %v", infos[0].LR, infos[18].LR, infos[35].LR)
	}
	for _, p := range infos {
		if !(p.GradNorm > 0) || p.Step < 1 {
			t.Fatalf("progress %+v", p)
		}
	}
}

// TestEarlyStop: with a learning rate too small to change P in float32, validation never
// improves on P0, so EarlyStop = 2 ends the run after its second epoch.
func TestEarlyStop(t *testing.T) {
	fx := newFixture(t, t.TempDir(), defaultFixture())
	cfg := testConfig()
	cfg.LR, cfg.Epochs, cfg.EarlyStop, cfg.ValidEvery = 1e-60, 5, 2, 0
	res, err := fx.trainer(t, cfg, NewFileCheckpointStore(t.TempDir())).Run(context.Background(), true)
	if err != nil {
		t.Fatal(err)
	}
	if !res.EarlyStopped || res.Steps != 18 || res.BestStep != 0 || len(res.ValidLoss) != 3 {
		t.Fatalf("early stop %v after %d steps, best at %d, %d validations; want a stop after 18 steps",
			res.EarlyStopped, res.Steps, res.BestStep, len(res.ValidLoss))
	}
}

// cancelAt returns a progress option that cancels ctx once step n is done.
func cancelAt(n int, cancel context.CancelFunc) TrainerOption {
	return WithProgress(func(p ProgressInfo) {
		if p.Step == n {
			cancel()
		}
	})
}

// dyingStore is a checkpoint store whose saves stop being durable once killed is set: a
// process killed outright after its last periodic checkpoint.
type dyingStore struct {
	*FileCheckpointStore
	killed bool
}

func (d *dyingStore) Save(ctx context.Context, c *Checkpoint) error {
	if d.killed {
		return nil
	}
	return d.FileCheckpointStore.Save(ctx, c)
}

func sameResult(t *testing.T, what string, got, want *Result) {
	t.Helper()
	switch {
	case !slices.Equal(bits32(got.P), bits32(want.P)):
		t.Fatalf("%s: P differs from the uninterrupted run", what)
	case !slices.Equal(bits32(got.BestP), bits32(want.BestP)) || got.BestStep != want.BestStep:
		t.Fatalf("%s: best P (step %d) differs from the uninterrupted run's (step %d)", what, got.BestStep, want.BestStep)
	case !sameCurve(got.TrainLoss, want.TrainLoss) || !sameCurve(got.ValidLoss, want.ValidLoss):
		t.Fatalf("%s: curves differ:\n%v\n%v", what, got.ValidLoss, want.ValidLoss)
	case got.Steps != want.Steps || got.Tokens != want.Tokens:
		t.Fatalf("%s: %d steps, %d tokens; want %d, %d", what, got.Steps, got.Tokens, want.Steps, want.Tokens)
	}
}

func bits32(p []float32) []uint32 {
	out := make([]uint32, len(p))
	for i, v := range p {
		out[i] = math.Float32bits(v)
	}
	return out
}

func sameCurve(a, b []CurvePoint) bool {
	return slices.EqualFunc(a, b, func(x, y CurvePoint) bool {
		return x.Step == y.Step && math.Float64bits(x.Loss) == math.Float64bits(y.Loss)
	})
}

// TestResumeBitIdentical interrupts a run at 10 seeded steps and resumes it in a fresh
// trainer (fresh model, data and suffix): the final P, the best P and the curves are
// bit-identical to an uninterrupted run. Even trials cancel the context (the trainer saves
// at the step it reached, mid-validation included); odd ones emulate a kill (nothing after
// the last periodic checkpoint is kept, so steps are redone).
func TestResumeBitIdentical(t *testing.T) {
	fx := newFixture(t, t.TempDir(), defaultFixture())
	cfg := testConfig()
	want, err := fx.trainer(t, cfg, NewFileCheckpointStore(t.TempDir())).Run(context.Background(), true)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(2025, 6))
	total := 18
	points := []int{1, 9, total - 1} // first step, an epoch end (and validation), the last
	for len(points) < 10 {
		points = append(points, 1+rng.IntN(total-1))
	}
	for i, n := range points {
		kill := i%2 == 1
		t.Run(fmt.Sprintf("step=%d/kill=%v", n, kill), func(t *testing.T) {
			store := &dyingStore{FileCheckpointStore: NewFileCheckpointStore(t.TempDir())}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			opt := WithProgress(func(p ProgressInfo) {
				if p.Step == n {
					store.killed = kill
					cancel()
				}
			})
			_, err := fx.trainer(t, cfg, store, opt).Run(ctx, true)
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("interrupted run: %v, want context.Canceled", err)
			}
			ck, err := store.Load(context.Background())
			wantStep := n
			if kill { // the kill comes before the save of step n
				wantStep = (n - 1) / cfg.CheckpointEvery * cfg.CheckpointEvery
			}
			switch {
			case wantStep == 0 && !errors.Is(err, ErrNoCheckpoint):
				t.Fatalf("no checkpoint expected: %v", err)
			case wantStep > 0 && err != nil:
				t.Fatalf("checkpoint: %v, want one at step %d", err, wantStep)
			case wantStep > 0 && ck.Step != wantStep:
				t.Fatalf("checkpoint at step %d, want %d", ck.Step, wantStep)
			}
			store.killed = false
			got, err := fx.trainer(t, cfg, store).Run(context.Background(), true)
			if err != nil {
				t.Fatal(err)
			}
			if got.ResumedFrom != wantStep {
				t.Fatalf("resumed from %d, want %d", got.ResumedFrom, wantStep)
			}
			sameResult(t, "resumed", got, want)
			// Resuming a finished run returns its result without training.
			again, err := fx.trainer(t, cfg, store, WithProgress(func(ProgressInfo) { t.Fatal("trained again") })).Run(context.Background(), true)
			if err != nil {
				t.Fatal(err)
			}
			sameResult(t, "finished", again, want)
		})
	}
	// Without resume, a run starts over and gives the same result.
	store := NewFileCheckpointStore(t.TempDir())
	ctx, cancel := context.WithCancel(context.Background())
	fx.trainer(t, cfg, store, cancelAt(5, cancel)).Run(ctx, true)
	got, err := fx.trainer(t, cfg, store).Run(context.Background(), false)
	if err != nil || got.ResumedFrom != 0 {
		t.Fatalf("fresh run: %v, resumed from %v", err, got)
	}
	sameResult(t, "fresh", got, want)
}

// TestResumeMismatch: a checkpoint is refused, naming the difference, when anything in the
// fingerprint changed.
func TestResumeMismatch(t *testing.T) {
	fx := newFixture(t, t.TempDir(), defaultFixture())
	cfg := testConfig()
	store := NewFileCheckpointStore(t.TempDir())
	ctx, cancel := context.WithCancel(context.Background())
	if _, err := fx.trainer(t, cfg, store, cancelAt(3, cancel)).Run(ctx, true); !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, field string
		edit        func(*TrainConfig)
		opts        []TrainerOption
	}{
		{"lr", "config.lr", func(c *TrainConfig) { c.LR = 1e-3 }, nil},
		{"seed", "config.seed", func(c *TrainConfig) { c.Seed = 4 }, nil},
		{"batch", "config.batch", func(c *TrainConfig) { c.Batch = 3 }, nil},
		{"epochs", "config.epochs", func(c *TrainConfig) { c.Epochs = 3 }, nil},
		{"extra", "extra.p0", func(*TrainConfig) {}, []TrainerOption{WithFingerprintExtra(map[string]string{"p0": "diag"})}},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := testConfig()
			c.edit(&cfg)
			_, err := fx.trainer(t, cfg, store, c.opts...).Run(context.Background(), true)
			if !errors.Is(err, ErrCheckpointMismatch) || !strings.Contains(err.Error(), c.field) {
				t.Fatalf("got %v, want ErrCheckpointMismatch naming %s", err, c.field)
			}
		})
	}
	t.Run("p0", func(t *testing.T) {
		s, _ := NewSuffix(fx.student(t), fx.end, nil, SuffixOptions{SeqLen: fx.T, K: fx.K})
		p := s.P()
		p[0] = 1.5
		s.SetP(p)
		tr, err := NewTrainer(s, fx.data(t), cfg, store)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tr.Run(context.Background(), true); !errors.Is(err, ErrCheckpointMismatch) || !strings.Contains(err.Error(), "p0_sha256") {
			t.Fatalf("got %v, want ErrCheckpointMismatch naming p0_sha256", err)
		}
	})
	t.Run("checkpoint-every is free", func(t *testing.T) {
		cfg := testConfig()
		cfg.CheckpointEvery = 7
		ctx, cancel := context.WithCancel(context.Background())
		if _, err := fx.trainer(t, cfg, store, cancelAt(5, cancel)).Run(ctx, true); !errors.Is(err, context.Canceled) {
			t.Fatalf("resume with another checkpoint interval: %v", err)
		}
	})
	t.Run("shard changed", func(t *testing.T) {
		// Rewrite the manifest entry and file of a shard the checkpoint used with other bytes
		// (another compression): same rows, another SHA-256.
		ck, err := store.Load(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		used := -1
		for sh := range ck.ShardSHA256 {
			if sh < 6 {
				used = sh
			}
		}
		if used < 0 {
			t.Fatal("checkpoint records no train shard")
		}
		path := filepath.Join(fx.dir, fmt.Sprintf("train-%05d.arrow", used))
		mpath := filepath.Join(fx.dir, ManifestName)
		mf, _ := shards.LoadManifest(mpath)
		e, _ := mf.Entry(used)
		rows, err := shards.ReadShardFile(path, fx.meta, e.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		orig, _ := os.ReadFile(path)
		origMF, _ := os.ReadFile(mpath)
		defer func() {
			os.WriteFile(path, orig, 0o644)
			os.WriteFile(mpath, origMF, 0o644)
		}()
		info, err := shards.WriteShardFile(path, fx.meta, rows, shards.CompressNone)
		if err != nil {
			t.Fatal(err)
		}
		mf.Add(info.Entry(used, shards.SplitTrain))
		mf.Save(mpath)
		cfg := testConfig()
		cfg.CheckpointEvery = 7
		_, err = fx.trainer(t, cfg, store).Run(context.Background(), true)
		if !errors.Is(err, ErrCheckpointMismatch) || !strings.Contains(err.Error(), fmt.Sprintf("shard %d", used)) {
			t.Fatalf("got %v, want ErrCheckpointMismatch naming shard %d", err, used)
		}
	})
}

// TestCorruptShard: a shard whose file fails its checksum is never trained on: Run stops
// with an error wrapping shards.ErrChecksum, with the steps before it checkpointed; once
// the file is fixed, resuming gives the uninterrupted result.
func TestCorruptShard(t *testing.T) {
	fx := newFixture(t, t.TempDir(), defaultFixture())
	cfg := testConfig()
	cfg.Batch = 3 // batches align with the 3-window shards
	want, err := fx.trainer(t, cfg, nil).Run(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(fx.dir, "train-00002.arrow")
	orig, _ := os.ReadFile(path)
	bad := slices.Clone(orig)
	bad[len(bad)/3] ^= 1
	if err := os.WriteFile(path, bad, 0o644); err != nil {
		t.Fatal(err)
	}
	store := NewFileCheckpointStore(t.TempDir())
	_, err = fx.trainer(t, cfg, store).Run(context.Background(), true)
	if !errors.Is(err, shards.ErrChecksum) {
		t.Fatalf("got %v, want shards.ErrChecksum", err)
	}
	ck, err := store.Load(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if _, used := ck.ShardSHA256[2]; used || ck.Step != 2 {
		t.Fatalf("checkpoint at step %d, shards %v; want step 2 without shard 2", ck.Step, ck.ShardSHA256)
	}
	os.WriteFile(path, orig, 0o644) // the caller refetched it
	got, err := fx.trainer(t, cfg, store).Run(context.Background(), true)
	if err != nil {
		t.Fatal(err)
	}
	sameResult(t, "after refetch", got, want)
}

// TestTrainBeforeCacheComplete: as in the pipeline, the student starts while shards are
// still missing. Each shard becomes available (WaitFor returns) only after the student has
// trained a while, the validation shard last: training must start at once, and the result
// is the one of a complete cache.
func TestTrainBeforeCacheComplete(t *testing.T) {
	fx := newFixture(t, t.TempDir(), defaultFixture())
	cfg := testConfig()
	cfg.ValidEvery = 0
	want, err := fx.trainer(t, cfg, nil).Run(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ready := make([]chan struct{}, 7)
	for i := range ready {
		ready[i] = make(chan struct{})
	}
	close(ready[0])
	wait := func(ctx context.Context, shard int) error {
		select {
		case <-ready[shard]:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	var released []int
	progress := func(p ProgressInfo) {
		// Shard k+1 is released after step 1 + ⌊3k/2⌋, while the student (2 windows a step,
		// 3 a shard) is still busy with earlier shards; the validation shard (6) last, after
		// step 8: a pass on P0 before the first step would wait forever.
		for k := range 6 {
			if p.Step == 1+3*k/2 && k+1 < 7 {
				close(ready[k+1])
				released = append(released, k+1)
			}
		}
	}
	s, err := NewSuffix(fx.student(t), fx.end, nil, SuffixOptions{SeqLen: fx.T, K: fx.K})
	if err != nil {
		t.Fatal(err)
	}
	tr, err := NewTrainer(s, fx.data(t, WithWaitFor(wait)), cfg, nil, WithProgress(progress))
	if err != nil {
		t.Fatal(err)
	}
	got, err := tr.Run(ctx, false)
	if err != nil {
		t.Fatalf("%v (released %v)", err, released)
	}
	sameResult(t, "pipelined", got, want)
}

func TestTrainConfigValidate(t *testing.T) {
	c := TrainConfig{}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	want := TrainConfig{LR: 1e-4, WeightDecay: 1e-4, Beta1: 0.9, Beta2: 0.999, Eps: 1e-8, MinLRFrac: 0.05,
		Epochs: 1, Batch: 1, Loss: LossTopKKL, K: 50, Seed: 0, CheckpointEvery: 100}
	if c != want {
		t.Fatalf("defaults %+v (seed 0 is a seed, kept)", c)
	}
	if want.Seed = 1; DefaultTrainConfig() != want {
		t.Fatalf("DefaultTrainConfig %+v", DefaultTrainConfig())
	}
	if c2 := c; c2.Validate() != nil || c2 != c {
		t.Fatal("Validate is not idempotent")
	}
	for _, bad := range []TrainConfig{{LR: -1}, {Beta1: 1}, {Beta2: -0.1}, {Epochs: -1}, {Batch: -2}, {Loss: "l1"},
		{LR: math.NaN()}, {MinLRFrac: 2}, {EarlyStop: -1}, {ValidEvery: -1}} {
		if err := bad.Validate(); !errors.Is(err, ErrOptions) {
			t.Fatalf("%+v: %v, want ErrOptions", bad, err)
		}
	}
	neg := TrainConfig{WeightDecay: -1, MinLRFrac: -1}
	neg.Validate()
	if neg.weightDecay() != 0 || neg.minLRFrac() != 0 {
		t.Fatal("negative weight decay / floor do not mean zero")
	}
}

func TestNewTrainerErrors(t *testing.T) {
	fx := newFixture(t, t.TempDir(), fixtureOpts{trainShards: 1, perShard: 2})
	s, err := NewSuffix(fx.student(t), fx.end, nil, SuffixOptions{SeqLen: fx.T, K: fx.K})
	if err != nil {
		t.Fatal(err)
	}
	d := fx.data(t)
	for _, c := range []struct {
		name string
		cfg  TrainConfig
		want error
	}{
		{"k", TrainConfig{K: 9}, ErrOptions},
		{"loss", TrainConfig{Loss: LossMSE, K: 8}, ErrOptions},
		{"early stop without validation", TrainConfig{K: 8, EarlyStop: 1}, ErrOptions},
	} {
		if _, err := NewTrainer(s, d, c.cfg, nil); !errors.Is(err, c.want) {
			t.Fatalf("%s: %v, want %v", c.name, err, c.want)
		}
	}
	mse, _ := NewSuffix(fx.student(t), fx.end, nil, SuffixOptions{SeqLen: fx.T, Loss: LossMSE})
	if _, err := NewTrainer(mse, d, TrainConfig{Loss: LossMSE}, nil); !errors.Is(err, ErrData) {
		t.Fatalf("mse without final states: %v, want ErrData", err)
	}
	other, _ := NewSuffix(fx.student(t), 3, nil, SuffixOptions{SeqLen: fx.T, K: fx.K})
	if _, err := NewTrainer(other, d, TrainConfig{K: 8}, nil); !errors.Is(err, ErrData) {
		t.Fatalf("another cut: %v, want ErrData", err)
	}
	if _, err := NewTrainer(s, d, TrainConfig{K: 8}, nil, WithProgress(nil)); !errors.Is(err, ErrOptions) {
		t.Fatalf("nil progress: %v", err)
	}
}

// TestTrainMSE runs the mse loss over shards with the final hidden states.
func TestTrainMSE(t *testing.T) {
	o := defaultFixture()
	o.final = true
	fx := newFixture(t, t.TempDir(), o)
	cfg := testConfig()
	cfg.Loss, cfg.LR = LossMSE, 1e-2
	res, err := fx.trainer(t, cfg, nil).Run(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	if !(res.FinalValid < res.ValidLoss[0].Loss) {
		t.Fatalf("mse validation %v → %v", res.ValidLoss[0].Loss, res.FinalValid)
	}
}

// TestKillProcess trains in a child process (this test binary), kills it with SIGKILL at
// a few points — possibly in the middle of a checkpoint save — and resumes here: the
// result is the uninterrupted one, bit for bit.
func TestKillProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("process test")
	}
	fx := newFixture(t, t.TempDir(), defaultFixture())
	cfg := testConfig()
	cfg.CheckpointEvery = 1
	want, err := fx.trainer(t, cfg, nil).Run(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{3, 11} {
		ckdir := t.TempDir()
		cmd := exec.Command(os.Args[0], "-test.run=^TestKillChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), "STUDENT_KILL_CHILD="+fx.dir+"|"+ckdir)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(out)
		killed := false
		for sc.Scan() {
			if s, ok := strings.CutPrefix(sc.Text(), "step "); ok {
				if k, _ := strconv.Atoi(s); k >= n {
					cmd.Process.Signal(syscall.SIGKILL)
					killed = true
					break
				}
			}
		}
		go func() { // drain
			for sc.Scan() {
			}
		}()
		err = cmd.Wait()
		if !killed {
			t.Fatalf("the child ended before step %d: %v", n, err)
		}
		store := NewFileCheckpointStore(ckdir)
		ck, err := store.Load(context.Background())
		if err != nil {
			t.Fatalf("after the kill: %v", err)
		}
		t.Logf("killed at step ≥ %d; checkpoint at step %d", n, ck.Step)
		got, err := fx.trainer(t, cfg, store).Run(context.Background(), true)
		if err != nil {
			t.Fatal(err)
		}
		sameResult(t, fmt.Sprintf("killed at %d", n), got, want)
	}
}

// TestKillChild is the child of TestKillProcess: it trains slowly (a pause per step, so
// that the parent's kill lands mid-run) and prints each step.
func TestKillChild(t *testing.T) {
	env := os.Getenv("STUDENT_KILL_CHILD")
	if env == "" {
		t.Skip("child of TestKillProcess")
	}
	dir, ckdir, _ := strings.Cut(env, "|")
	fx := &fixture{dir: dir, cfg: tinyCfg, seed: 5, start: 1, end: 2, T: 16, K: 8}
	fx.meta = shards.Meta{RunID: "rtest", Fingerprint: "synthetic-5", Start: 1, End: 2,
		Dim: tinyCfg.Dim, K: 8, Vocab: tinyCfg.Vocab, ActDType: shards.Float32}
	mf, err := shards.LoadManifest(filepath.Join(dir, ManifestName))
	if err != nil {
		t.Fatal(err)
	}
	fx.train, fx.valid = PlanFromManifest(mf)
	cfg := testConfig()
	cfg.CheckpointEvery = 1
	tr := fx.trainer(t, cfg, NewFileCheckpointStore(ckdir), WithProgress(func(p ProgressInfo) {
		fmt.Printf("step %d\n", p.Step)
		time.Sleep(5 * time.Millisecond)
	}))
	if _, err := tr.Run(context.Background(), true); err != nil {
		t.Fatal(err)
	}
}
