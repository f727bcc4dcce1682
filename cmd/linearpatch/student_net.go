package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"linearpatch/cache"
	"linearpatch/coordinator"
	"linearpatch/model"
	"linearpatch/model/tensor"
	"linearpatch/protocol"
	"linearpatch/shards"
	"linearpatch/student"
	"linearpatch/teacher"
	"linearpatch/worker"
)

// The network student: `linearpatch student --nats URL --run ID --model M` on any machine.
// Everything but the model files comes through the run: the plan, the distillation settings
// and the fit from its bucket, the training-free patch from its object store, and every cache
// shard from the data stream (rebuilt into the student's own --dir, checked against the
// plan); checkpoints go to the object store, so a student restarted anywhere resumes
// bit-identically. The distilled patch and its record are published to the run, where the
// coordinator waits for them (protocol/student.go lists the keys).

// netPoll is how often the network student and the coordinator poll the run's bucket.
const netPoll = 250 * time.Millisecond

// studentTrainFlags are the distillation flags; with --nats the run's settings apply.
var studentTrainFlags = []string{"loss", "lr", "weight-decay", "epochs", "batch", "seed", "checkpoint-every", "early-stop", "valid-every"}

// addNetStudentFlags declares the flags only the network student has.
func addNetStudentFlags(cmd *cobra.Command) {
	addNATSFlags(cmd)
	f := cmd.Flags()
	f.String("run", "", "with --nats: the run id (printed by the coordinator)")
	f.String("dir", "", "with --nats: the student's working directory for fetched shards and its curve (default: ./linearpatch-student-RUN)")
	f.Duration("student-lease", 30*time.Second, "with --nats: a window claimed by a student that stops renewing its claim (every lease/3) for this long is recomputed by another")
}

// netStudentMode reports whether student was started as a network worker.
func netStudentMode(s settings) bool { return s.str("nats") != "" || s.str("run") != "" }

func runNetStudent(cmd *cobra.Command, s settings) error {
	run := s.str("run")
	if run == "" && s.str("run-dir") != "" { // read-only: the run id, as the other workers do
		b, err := os.ReadFile(filepath.Join(s.str("run-dir"), "run.id"))
		if err != nil {
			return fmt.Errorf("--run not given and no run id in --run-dir: %w", err)
		}
		run = strings.TrimSpace(string(b))
	}
	if s.str("nats") == "" || run == "" {
		return errors.New("the network student needs --nats and --run (or --run-dir holding run.id)")
	}
	if s.str("out") != "" || s.str("eval") != "" || s.flag("resume") {
		return errors.New("--out, --eval and --resume are for the offline student; with --nats the student always resumes from the run's checkpoint and the coordinator exports and evaluates")
	}
	for _, f := range studentTrainFlags {
		if cmd.Flags().Changed(f) {
			return fmt.Errorf("--%s: with --nats the student trains with the run's settings (give it to the coordinator)", f)
		}
	}
	modelPath := s.str("model")
	if modelPath == "" {
		return errors.New("--model is required (the original model's files: the layers after the cut, the final norm and the head are read)")
	}
	names, err := worker.NewNames(run)
	if err != nil {
		return err
	}
	dir := s.str("dir")
	if dir == "" {
		dir = "linearpatch-student-" + names.Run()
	}
	mcfg, err := model.ReadModelConfig(modelPath)
	if err != nil {
		return err
	}
	ctx := cmd.Context()
	reg, stopMetrics, err := startMetrics(ctx, s) // served while the student waits for the run, too
	if err != nil {
		return err
	}
	defer stopMetrics()
	conn, err := connectNATS(ctx, s, s.str("run-dir"), nil, worker.RoleStudent, "linearpatch-student")
	if err != nil {
		return err
	}
	defer conn.Close()
	log := slog.Default().With("component", "student", "run", names.Run())
	kv, err := waitBucket(ctx, conn.js, names)
	if err != nil {
		return err
	}
	rep := newStudentReporter(kv, log)
	if e, err := kv.Get(ctx, protocol.KeyStudentResult); err == nil {
		var r protocol.StudentResult
		_ = json.Unmarshal(e.Value(), &r)
		fmt.Fprintf(cmd.OutOrStdout(), "run %s is already distilled (%d steps on %s); nothing to do\n", names.Run(), r.Steps, r.Host)
		return nil
	}
	rep.put(ctx, protocol.StudentStatus{State: "waiting for the plan"})
	var plan protocol.Plan
	if err := waitJSON(ctx, kv, protocol.KeyPlan, &plan); err != nil {
		return err
	}
	if plan.TrainWindows == 0 {
		return fmt.Errorf("run %s has no training windows: nothing to distill", plan.RunID)
	}
	rep.put(ctx, protocol.StudentStatus{State: "waiting for the fit"})
	var fit protocol.FitResult
	if err := waitJSON(ctx, kv, protocol.KeyFit, &fit); err != nil {
		return err
	}
	// The coordinator publishes its distillation settings before the run starts, so a fitted
	// run without them does not distill through network students.
	var cfg student.TrainConfig
	e, err := kv.Get(ctx, protocol.KeyDistill)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return fmt.Errorf("run %s does not distill through network students (its coordinator runs with --distill=false, or it is a single-process run)", plan.RunID)
	}
	if err != nil {
		return err
	}
	if err := json.Unmarshal(e.Value(), &cfg); err != nil {
		return fmt.Errorf("the run's distillation settings: %w", err)
	}
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("the run's distillation settings: %w", err)
	}
	obj, err := conn.js.ObjectStore(ctx, names.ObjectStore())
	if err != nil {
		return fmt.Errorf("the run's object store: %w", err)
	}
	var p0 []float32
	if fit.HasP {
		b, err := readRunObject(ctx, conn.js, names, protocol.ObjPatch0)
		if err != nil {
			return fmt.Errorf("training-free patch: %w", err)
		}
		if p0, err = protocol.DecodeFloat32s(b); err != nil {
			return err
		}
		if len(p0) != mcfg.Dim*mcfg.Dim {
			return fmt.Errorf("the run's training-free patch has %d values; the model is %d wide", len(p0), mcfg.Dim)
		}
	}
	meta, err := teacher.CacheMeta(&plan, &model.Model{Config: model.Config{Dim: mcfg.Dim, Vocab: mcfg.Vocab}}, fit.Start, fit.End)
	if err != nil {
		return err
	}
	cacheDir := filepath.Join(dir, "cache")
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return err
	}
	src := &netShardSource{js: conn.js, kv: kv, names: names, dir: cacheDir, meta: meta, plan: &plan, log: log,
		waiting: func(shard int) { rep.waiting(ctx, shard) }}
	sh, err := joinShared(ctx, s, conn.js, kv, names, cfg, log)
	if err != nil {
		return err
	}
	defer sh.stop()
	log.Info("student joined the run", "dir", dir, "train_windows", plan.TrainWindows, "cut", fmt.Sprintf("[%d, %d)", fit.Start, fit.End),
		"holder", sh.opts.Holder, "batch", cfg.Batch)
	res, err := distill(ctx, distillSpec{runDir: dir, modelPath: modelPath, plan: &plan, fit: fit, p0: p0, cfg: cfg, resume: true,
		log: log, cacheDir: cacheDir, source: src, workDir: dir, progress: sh.progress(rep.progress),
		metrics: reg.Student(), shared: &sh.sharedDistill})
	if err != nil {
		sh.state(context.WithoutCancel(ctx), "failed: "+err.Error())
		rep.put(context.WithoutCancel(ctx), protocol.StudentStatus{State: "failed: " + err.Error()})
		return err
	}
	sh.finish(ctx, res.Result.Steps)
	if e, err := kv.Get(ctx, protocol.KeyStudentResult); err == nil {
		var r protocol.StudentResult
		_ = json.Unmarshal(e.Value(), &r)
		fmt.Fprintf(cmd.OutOrStdout(), "distilled %d steps with the other students; the patch was published by %s\n", res.Result.Steps, r.Host)
		return nil
	}
	if err := publishKD(ctx, kv, obj, res, cfg); err != nil {
		return err
	}
	r := res.Result
	rep.put(ctx, protocol.StudentStatus{State: "done", Step: r.Steps, TotalSteps: r.TotalSteps, Loss: lastLoss(r.TrainLoss),
		ValidLoss: protocol.Float(r.FinalValid)})
	fmt.Fprintf(cmd.OutOrStdout(), "distilled %d steps (%d tokens) in %.1fs; final validation loss %.5f; patch published to run %s; curve %s\n",
		r.Steps, r.Tokens, r.Elapsed.Seconds(), r.FinalValid, names.Run(), res.CurvePNG)
	return nil
}

func lastLoss(c []student.CurvePoint) protocol.Float {
	if len(c) == 0 {
		return protocol.Float(math.NaN())
	}
	return protocol.Float(c[len(c)-1].Loss)
}

// waitBucket waits until the run's bucket exists (the coordinator creates it).
func waitBucket(ctx context.Context, js jetstream.JetStream, names worker.Names) (jetstream.KeyValue, error) {
	for {
		kv, err := js.KeyValue(ctx, names.KVBucket())
		if err == nil {
			return kv, nil
		}
		if !errors.Is(err, jetstream.ErrBucketNotFound) && ctx.Err() == nil {
			slog.Debug("waiting for the run's bucket", "err", err)
		}
		if err := worker.SleepCtx(ctx, netPoll); err != nil {
			return nil, err
		}
	}
}

// waitJSON waits until key exists in kv and decodes it into v.
func waitJSON(ctx context.Context, kv jetstream.KeyValue, key string, v any) error {
	for {
		e, err := kv.Get(ctx, key)
		if err == nil {
			if err := json.Unmarshal(e.Value(), v); err != nil {
				return fmt.Errorf("the run's %q: %w", key, err)
			}
			return nil
		}
		if !errors.Is(err, jetstream.ErrKeyNotFound) && ctx.Err() == nil {
			slog.Debug("reading the run's bucket", "key", key, "err", err)
		}
		if err := worker.SleepCtx(ctx, netPoll); err != nil {
			return err
		}
	}
}

// netShardSource rebuilds each cache shard in the student's directory from the records the
// data stream holds, once the cache writer has recorded the shard done (so the records are
// complete and were verified against the plan). The data stream rather than the object
// store: it already holds every record (the run's source of truth, which the cache writer
// rebuilds from too), so nothing is stored twice and the cache writer is unchanged.
type netShardSource struct {
	js      jetstream.JetStream
	kv      jetstream.KeyValue
	names   worker.Names
	dir     string
	meta    shards.Meta
	plan    *protocol.Plan
	log     *slog.Logger
	waiting func(shard int)

	mu sync.Mutex // the manifest
}

// Ensure puts shard into the directory (see student.ShardSource).
func (s *netShardSource) Ensure(ctx context.Context, shard int) error {
	if shard < 0 || shard >= len(s.plan.Cache) {
		return fmt.Errorf("shard %d is not in the run's plan", shard)
	}
	if ok, err := s.have(shard); err != nil || ok {
		return err
	}
	if s.waiting != nil {
		s.waiting(shard)
	}
	var done protocol.ShardDone
	if err := waitJSON(ctx, s.kv, protocol.DoneKey(protocol.PhaseCache, shard), &done); err != nil {
		return err
	}
	rows, err := s.fetch(ctx, shard)
	if err != nil {
		return err
	}
	fi, err := shards.WriteShardFile(filepath.Join(s.dir, cache.ShardFileName(shard)), s.meta, rows, shards.CompressZstd)
	if err != nil {
		return err
	}
	if fi.SHA256 == done.SHA256 {
		s.log.Debug("shard fetched; same bytes as the cache writer's file", "shard", shard, "bytes", fi.Bytes)
	} else {
		s.log.Debug("shard fetched (the cache writer's file differs in bytes: another compression)", "shard", shard, "bytes", fi.Bytes)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	m, err := s.manifest()
	if err != nil {
		return err
	}
	if err := m.Add(fi.Entry(shard, string(s.plan.Cache[shard].Split))); err != nil {
		return err
	}
	return m.Save(filepath.Join(s.dir, student.ManifestName))
}

// manifest loads the directory's manifest (an empty one when there is none).
func (s *netShardSource) manifest() (*shards.Manifest, error) {
	m, err := shards.LoadManifest(filepath.Join(s.dir, student.ManifestName))
	if errors.Is(err, fs.ErrNotExist) {
		return &shards.Manifest{Meta: s.meta}, nil
	}
	return m, err
}

// have reports whether shard's file is in the directory and verifies; a damaged one is
// dropped from the manifest (and fetched again).
func (s *netShardSource) have(shard int) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, err := s.manifest()
	if err != nil {
		return false, err
	}
	e, ok := m.Entry(shard)
	if !ok {
		return false, nil
	}
	if sum, err := shards.FileSHA256(e.Path(s.dir)); err == nil && sum == e.SHA256 {
		return true, nil
	}
	s.log.Warn("fetched shard file fails verification; fetching it again", "shard", shard)
	m.Shards = slices.DeleteFunc(m.Shards, func(x shards.ManifestEntry) bool { return x.Shard == shard })
	return false, m.Save(filepath.Join(s.dir, student.ManifestName))
}

// fetch reads shard's records from the data stream (an ordered consumer on its subjects)
// until its done marker and every record it counts are in.
func (s *netShardSource) fetch(ctx context.Context, shard int) ([]shards.Chunk, error) {
	filter := s.names.ShardFilter(string(protocol.PhaseCache), shard)
	cons, err := s.js.OrderedConsumer(ctx, s.names.DataStream(), jetstream.OrderedConsumerConfig{FilterSubjects: []string{filter}})
	if err != nil {
		return nil, fmt.Errorf("shard %d: %w", shard, err)
	}
	asm := worker.NewAssembler(s.names, string(protocol.PhaseCache))
	for {
		fctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		raw, err := cons.Next(jetstream.FetchContext(fctx))
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("shard %d is recorded done but the data stream no longer holds all its records: %w", shard, err)
		}
		m := worker.NewMsg(raw)
		if !strings.HasSuffix(m.Subject, ".done") {
			if _, err := shards.DecodeMessage(m.Data, s.meta); err != nil {
				s.log.Warn("rejected record", "subject", m.Subject, "reason", err)
				continue
			}
		}
		outcome, a, err := asm.Add(m)
		if err != nil {
			s.log.Warn("rejected message", "subject", m.Subject, "reason", err)
			continue
		}
		if outcome != worker.Completed {
			continue
		}
		var rows []shards.Chunk
		for _, p := range a.Parts {
			cs, err := shards.DecodeMessage(p.Data, s.meta)
			if err != nil {
				return nil, err
			}
			rows = append(rows, cs...)
		}
		return rows, nil
	}
}

// studentReporter keeps the student's status in the run's bucket (KeyStudent), at most
// once a second while training.
type studentReporter struct {
	kv   jetstream.KeyValue
	log  *slog.Logger
	host string
	mu   sync.Mutex
	last time.Time
	busy bool // a progress report is being stored
}

func newStudentReporter(kv jetstream.KeyValue, log *slog.Logger) *studentReporter {
	host, _ := os.Hostname()
	return &studentReporter{kv: kv, log: log, host: host}
}

func (r *studentReporter) put(ctx context.Context, st protocol.StudentStatus) {
	st.Host, st.PID, st.Updated = r.host, os.Getpid(), time.Now().UTC()
	b, err := json.Marshal(st)
	if err == nil {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err = r.kv.Put(pctx, protocol.KeyStudent, b)
		cancel()
	}
	if err != nil {
		r.log.Debug("student status not stored", "err", err)
	}
}

func (r *studentReporter) waiting(ctx context.Context, shard int) {
	r.put(ctx, protocol.StudentStatus{State: fmt.Sprintf("waiting for shard %d", shard)})
}

func (r *studentReporter) progress(pi student.ProgressInfo) {
	r.mu.Lock()
	due := !r.busy && (time.Since(r.last) >= time.Second || pi.Step == pi.TotalSteps)
	if due {
		r.last, r.busy = time.Now(), true
	}
	r.mu.Unlock()
	if !due {
		return
	}
	st := protocol.StudentStatus{State: "training", Step: pi.Step, TotalSteps: pi.TotalSteps,
		Loss: protocol.Float(pi.Loss), ValidLoss: protocol.Float(pi.ValidLoss), TokensPerSec: pi.TokensPerSec, ETASeconds: pi.ETA.Seconds()}
	go func() { // never hold up training (a server restarting would for seconds)
		r.put(context.Background(), st)
		r.mu.Lock()
		r.busy = false
		r.mu.Unlock()
	}()
}

// publishKD stores the distilled patch, then its record (what the coordinator waits for).
func publishKD(ctx context.Context, kv jetstream.KeyValue, obj jetstream.ObjectStore, res *distillResult, cfg student.TrainConfig) error {
	pb := protocol.EncodeFloat32s(res.P.Data)
	if _, err := obj.PutBytes(ctx, protocol.ObjPatchKD, pb); err != nil {
		return fmt.Errorf("publishing the distilled patch: %w", err)
	}
	r := res.Result
	sum := sha256.Sum256(pb)
	host, _ := os.Hostname()
	cb, _ := json.Marshal(cfg)
	rec := protocol.StudentResult{Steps: r.Steps, TotalSteps: r.TotalSteps, Tokens: r.Tokens, FinalValid: protocol.Float(r.FinalValid),
		ElapsedSeconds: r.Elapsed.Seconds(), EarlyStopped: r.EarlyStopped, BestStep: r.BestStep, BestValid: protocol.Float(r.BestValid),
		Exported: "last", TrainLoss: points(r.TrainLoss), ValidLoss: points(r.ValidLoss), Config: cb, PatchSHA256: hex.EncodeToString(sum[:]), Host: host}
	if cfg.EarlyStop > 0 && r.BestP != nil {
		rec.Exported = "best"
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	// Create: with several students the first one's record stands (the patch is the same
	// bits whoever publishes it).
	if _, err := kv.Create(ctx, protocol.KeyStudentResult, b); err != nil && !errors.Is(err, jetstream.ErrKeyExists) {
		return fmt.Errorf("publishing the distillation record: %w", err)
	}
	return nil
}

func points(c []student.CurvePoint) []protocol.StudentPoint {
	out := make([]protocol.StudentPoint, len(c))
	for i, p := range c {
		out[i] = protocol.StudentPoint{Step: p.Step, Loss: protocol.Float(p.Loss)}
	}
	return out
}

func curve(c []protocol.StudentPoint) []student.CurvePoint {
	out := make([]student.CurvePoint, len(c))
	for i, p := range c {
		out[i] = student.CurvePoint{Step: p.Step, Loss: float64(p.Loss)}
	}
	return out
}

// netStudentHook makes a coordinator (no in-process cache writer) distill through network
// students: it publishes the run's distillation settings and makes the student phase wait
// for a student's result, which *kd receives.
func netStudentHook(ctx context.Context, s settings, conn *natsConn, names worker.Names, rs *runSetup, copts *coordinator.Options,
	cfg *student.TrainConfig, kd **distillResult) error {
	c, err := trainConfig(s, rs.plan.Settings.TopK)
	if err != nil {
		return err
	}
	*cfg = c
	kv, err := conn.js.KeyValue(ctx, names.KVBucket())
	if err != nil {
		return err
	}
	b, _ := json.Marshal(c)
	if _, err := kv.Put(ctx, protocol.KeyDistill, b); err != nil {
		return fmt.Errorf("publishing the distillation settings: %w", err)
	}
	copts.Student = func(ctx context.Context) error {
		slog.Info("waiting for a student: start `linearpatch student --nats URL --run " + names.Run() + " --model MODEL` on any machine")
		r, err := awaitNetStudent(ctx, conn.js, kv, names, rs.runDir, rs.cfg.Dim, b)
		if err == nil {
			*kd = r
		}
		return err
	}
	return nil
}

// awaitNetStudent waits for a network student's result and returns the distilled patch
// with its record; the curve is drawn into RUN-DIR/student/kd_curve.png. A patch distilled
// with other settings than cfg (the coordinator's, JSON) is refused.
func awaitNetStudent(ctx context.Context, js jetstream.JetStream, kv jetstream.KeyValue, names worker.Names, runDir string, dim int, cfg []byte) (*distillResult, error) {
	var rec protocol.StudentResult
	if err := waitJSON(ctx, kv, protocol.KeyStudentResult, &rec); err != nil {
		return nil, err
	}
	if !bytes.Equal(rec.Config, cfg) {
		return nil, fmt.Errorf("the student's patch was distilled with settings %s, this coordinator's are %s: restart the coordinator with the run's settings, or delete %q from the run's bucket to distill again",
			rec.Config, cfg, protocol.KeyStudentResult)
	}
	b, err := readRunObject(ctx, js, names, protocol.ObjPatchKD)
	if err != nil {
		return nil, fmt.Errorf("the distilled patch: %w", err)
	}
	if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != rec.PatchSHA256 {
		return nil, fmt.Errorf("the distilled patch in the object store does not match the student's record (SHA-256 %x, recorded %s)", sum, rec.PatchSHA256)
	}
	P, err := protocol.DecodeFloat32s(b)
	if err != nil {
		return nil, err
	}
	if len(P) != dim*dim {
		return nil, fmt.Errorf("the distilled patch has %d values, want %d×%d", len(P), dim, dim)
	}
	res := &student.Result{P: P, Steps: rec.Steps, TotalSteps: rec.TotalSteps, Tokens: rec.Tokens, FinalValid: float64(rec.FinalValid),
		Elapsed: time.Duration(rec.ElapsedSeconds * float64(time.Second)), EarlyStopped: rec.EarlyStopped, BestStep: rec.BestStep,
		BestValid: float64(rec.BestValid), TrainLoss: curve(rec.TrainLoss), ValidLoss: curve(rec.ValidLoss)}
	if rec.Exported == "best" {
		res.BestP = P
	}
	dir := studentDir(runDir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	png := filepath.Join(dir, "kd_curve.png")
	if err := student.WriteCurvePNG(png, res.TrainLoss, res.ValidLoss); err != nil {
		return nil, err
	}
	slog.Info("the student's distilled patch arrived", "steps", rec.Steps, "host", rec.Host)
	return &distillResult{P: tensor.FromData(dim, dim, P), Result: res, CurvePNG: png}, nil
}

// readStudentStatus returns the student's last report in the run's bucket (nil when none).
func readStudentStatus(ctx context.Context, kv jetstream.KeyValue) *protocol.StudentStatus {
	e, err := kv.Get(ctx, protocol.KeyStudent)
	if err != nil {
		return nil
	}
	var st protocol.StudentStatus
	if json.Unmarshal(e.Value(), &st) != nil {
		return nil
	}
	return &st
}

// studentLine is status's line about the student.
func studentLine(st protocol.StudentStatus, now time.Time) string {
	var b strings.Builder
	fmt.Fprintf(&b, "student: %s", st.State)
	if st.TotalSteps > 0 {
		fmt.Fprintf(&b, ", step %d/%d", st.Step, st.TotalSteps)
		if l := float64(st.Loss); !math.IsNaN(l) {
			fmt.Fprintf(&b, ", loss %.5f", l)
		}
		if l := float64(st.ValidLoss); !math.IsNaN(l) {
			fmt.Fprintf(&b, ", validation loss %.5f", l)
		}
		if st.TokensPerSec > 0 {
			fmt.Fprintf(&b, ", %.0f tokens/s", st.TokensPerSec)
		}
		if st.State == "training" {
			fmt.Fprintf(&b, ", ETA %s", (time.Duration(st.ETASeconds * float64(time.Second))).Round(time.Second))
		}
	}
	fmt.Fprintf(&b, " (%s pid %d, %s ago)", st.Host, st.PID, now.Sub(st.Updated).Round(time.Second))
	return b.String()
}
