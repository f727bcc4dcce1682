package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"

	"linearpatch/model/tensor"
	"linearpatch/patch"
	"linearpatch/shards"
	"linearpatch/worker"
)

// Options configure a Coordinator. Plan, NC, JS, Names and RunDir are required.
type Options struct {
	Plan   *Plan
	NC     *nats.Conn
	JS     jetstream.JetStream
	Names  worker.Names
	RunDir string // stats shard files go to RunDir/stats
	Lease  time.Duration
	// Student runs the distillation when the cache phase is complete; nil ends the run
	// after caching.
	Student func(ctx context.Context) error
	// OnFit, when set, is told the training-free fit (for printing the table).
	OnFit  func(FitResult)
	Logger *slog.Logger
}

// Coordinator drives a run: it performs the actions of its Core over JetStream and feeds
// back what teachers, the cache writer and the student report.
type Coordinator struct {
	o    Options
	core *Core
	kv   jetstream.KeyValue
	obj  jetstream.ObjectStore
	log  *slog.Logger
	meta shards.Meta
	fit  *FitResult

	mu     sync.Mutex
	status Status
}

// Status is a snapshot of a run's progress, safe to read from any goroutine. The
// coordinator also stores it under the KV key "status" every few seconds for
// `linearpatch status`.
type Status struct {
	Run      string                   `json:"run"`
	Phase    Phase                    `json:"phase"`
	Done     map[Phase]int            `json:"done"`     // shards complete per phase
	Leased   map[Phase]int            `json:"leased"`   // shards a teacher reports working on
	Total    map[Phase]int            `json:"total"`    // shards per phase
	Teachers map[string]TeacherStatus `json:"teachers"` // by teacher name
	Updated  time.Time                `json:"updated"`
}

// TeacherStatus is what the coordinator last heard from a teacher.
type TeacherStatus struct {
	Phase        Phase     `json:"phase"`
	Shard        int       `json:"shard"`
	TokensPerSec float64   `json:"tokens_per_s"`
	TotalTokens  int64     `json:"total_tokens"`
	Threads      int       `json:"threads"`
	LastSeen     time.Time `json:"last_seen"`
}

// KeyStatus is the KV key of the coordinator's Status snapshot.
const KeyStatus = "status"

// Status returns the latest snapshot.
func (c *Coordinator) Status() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.status
}

func (c *Coordinator) snapshot() {
	st := Status{Run: c.o.Plan.RunID, Phase: c.core.Phase(), Done: map[Phase]int{}, Leased: map[Phase]int{}, Total: map[Phase]int{}}
	for _, ph := range []Phase{PhaseStats, PhaseCache} {
		n := c.core.Counts(ph)
		st.Done[ph], st.Leased[ph] = n[StatusDone], n[StatusLeased]
		st.Total[ph] = len(c.o.Plan.Shards(ph))
	}
	c.mu.Lock()
	st.Teachers = c.status.Teachers
	c.status = st
	c.mu.Unlock()
}

// noteTeacher records a progress report for the status snapshot.
func (c *Coordinator) noteTeacher(p Progress) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.status.Teachers == nil {
		c.status.Teachers = map[string]TeacherStatus{}
	}
	c.status.Teachers[p.Teacher] = TeacherStatus{Phase: p.Phase, Shard: p.Shard, TokensPerSec: p.TokensPerSec,
		TotalTokens: p.TotalTokens, Threads: p.Threads, LastSeen: time.Now()}
}

// publishStatus stores the status snapshot in the KV bucket every interval.
func (c *Coordinator) publishStatus(ctx context.Context, every time.Duration) error {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			st := c.Status()
			st.Updated = time.Now()
			if b, err := json.Marshal(st); err == nil {
				_, _ = c.kv.Put(ctx, KeyStatus, b)
			}
		}
	}
}

// StatsMeta is the record metadata of a run's stats phase.
func StatsMeta(p *Plan, dim, vocab int) shards.Meta {
	return shards.Meta{SchemaVersion: shards.SchemaVersion, RunID: p.RunID, Fingerprint: p.Settings.Fingerprint,
		Start: -1, End: -1, Dim: dim, Vocab: vocab, ActDType: shards.Float32}
}

// New returns a coordinator; dim and vocab are the model's.
func New(o Options, dim, vocab int) (*Coordinator, error) {
	if o.Plan == nil || o.NC == nil || o.JS == nil || o.RunDir == "" {
		return nil, fmt.Errorf("%w: coordinator needs a plan, a connection and a run directory", ErrPlan)
	}
	if o.Lease <= 0 {
		o.Lease = time.Minute
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return &Coordinator{o: o, log: o.Logger.With("component", "coordinator", "run", o.Plan.RunID),
		meta: StatsMeta(o.Plan, dim, vocab)}, nil
}

// Run drives the run to its end: nil when it finished, an error when it failed or ctx ended.
func (c *Coordinator) Run(ctx context.Context) error {
	var err error
	if c.kv, err = c.o.JS.KeyValue(ctx, c.o.Names.KVBucket()); err != nil {
		return fmt.Errorf("coordinator: key-value bucket: %w", err)
	}
	if c.obj, err = c.o.JS.ObjectStore(ctx, c.o.Names.ObjectStore()); err != nil {
		return fmt.Errorf("coordinator: object store: %w", err)
	}
	// Shards whose records are all in the data stream are not handed out again: the
	// tasks stream forgets a task once it is acked, and a restarted server has no
	// duplicate id left to drop a republished one.
	var marked []ShardRef
	for _, ph := range []Phase{PhaseStats, PhaseCache} {
		ids, err := worker.MarkedShards(ctx, c.o.JS, c.o.Names, string(ph))
		if err != nil {
			return fmt.Errorf("coordinator: %w", err)
		}
		for id := range ids {
			marked = append(marked, ShardRef{Phase: ph, ID: id})
		}
	}
	restored, done, err := c.restore(ctx)
	if err != nil {
		return err
	}
	c.core = NewCore(c.o.Plan, c.o.Lease, c.o.Student != nil)
	events := make(chan Event, 256)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return c.consumeStats(gctx) })
	g.Go(func() error { return c.watchDone(gctx, events) })
	g.Go(func() error { return c.watchProgress(gctx, events) })
	g.Go(func() error { return c.watchDead(gctx, events) })
	g.Go(func() error { return c.publishStatus(gctx, 2*time.Second) })
	g.Go(func() error {
		t := time.NewTicker(c.o.Lease / 4)
		defer t.Stop()
		for {
			select {
			case <-gctx.Done():
				return nil
			case now := <-t.C:
				select {
				case events <- EvTick{Now: now}:
				case <-gctx.Done():
					return nil
				}
			}
		}
	})
	g.Go(func() error {
		queue := []Event{EvStart{Restored: restored, Marked: marked}}
		for _, d := range done {
			queue = append(queue, d)
		}
		for {
			for len(queue) > 0 {
				ev := queue[0]
				queue = queue[1:]
				if f, ok := ev.(evFailed); ok {
					return fmt.Errorf("coordinator: student: %w", f.err)
				}
				more, err := c.perform(gctx, c.core.Step(ev), events)
				c.snapshot()
				if err != nil {
					return err
				}
				queue = append(queue, more...)
			}
			select {
			case <-gctx.Done():
				return gctx.Err()
			case ev := <-events:
				queue = append(queue, ev)
			}
		}
	})
	err = g.Wait()
	c.snapshot()
	final := c.Status()
	final.Updated = time.Now()
	if b, merr := json.Marshal(final); merr == nil {
		pctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, _ = c.kv.Put(pctx, KeyStatus, b)
		cancel()
	}
	if errors.Is(err, errFinished) {
		return nil
	}
	return err
}

var errFinished = errors.New("coordinator: finished")

// restore reads the persisted shard states and the completions recorded since.
func (c *Coordinator) restore(ctx context.Context) ([]ShardState, []Event, error) {
	keys, err := c.kv.ListKeys(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("coordinator: list state: %w", err)
	}
	var states []ShardState
	var done []Event
	for k := range keys.Keys() {
		switch {
		case strings.HasPrefix(k, "shard."):
			var s ShardState
			if err := c.getJSON(ctx, k, &s); err != nil {
				return nil, nil, err
			}
			states = append(states, s)
		case strings.HasPrefix(k, "done."):
			var d ShardDone
			if err := c.getJSON(ctx, k, &d); err != nil {
				return nil, nil, err
			}
			done = append(done, d.event())
		}
	}
	if v, err := c.kv.Get(ctx, KeyFit); err == nil {
		var f FitResult
		if err := json.Unmarshal(v.Value(), &f); err != nil {
			return nil, nil, fmt.Errorf("coordinator: stored fit: %w", err)
		}
		c.fit = &f
	}
	return states, done, nil
}

func (d ShardDone) event() EvShardDone {
	return EvShardDone{Phase: d.Phase, Shard: d.Shard, Rows: d.Rows, Tokens: d.Tokens, Bytes: d.Bytes, SHA256: d.SHA256, File: d.File, Source: d.Source}
}

func (c *Coordinator) getJSON(ctx context.Context, key string, v any) error {
	e, err := c.kv.Get(ctx, key)
	if err != nil {
		return fmt.Errorf("coordinator: read %s: %w", key, err)
	}
	if err := json.Unmarshal(e.Value(), v); err != nil {
		return fmt.Errorf("coordinator: decode %s: %w", key, err)
	}
	return nil
}

func (c *Coordinator) putJSON(ctx context.Context, key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return c.put(ctx, key, b)
}

// put writes a key, retrying while the server is unavailable (a restart) until ctx ends.
func (c *Coordinator) put(ctx context.Context, key string, b []byte) error {
	wait := 100 * time.Millisecond
	for {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := c.kv.Put(pctx, key, b)
		cancel()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("coordinator: write %s: %w", key, err)
		}
		c.log.Warn("writing state failed; retrying", "key", key, "err", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("coordinator: write %s: %w", key, ctx.Err())
		case <-time.After(wait):
		}
		wait = min(2*wait, 5*time.Second)
	}
}

// perform carries out actions in order; it returns events that answer them at once.
func (c *Coordinator) perform(ctx context.Context, acts []Action, events chan<- Event) ([]Event, error) {
	var out []Event
	for _, a := range acts {
		switch a := a.(type) {
		case ActPersist:
			for _, s := range a.States {
				if err := c.putJSON(ctx, s.Key(), s); err != nil {
					return nil, err
				}
			}
		case ActPersistPhase:
			if err := c.put(ctx, KeyPhase, []byte(a.Phase)); err != nil {
				return nil, err
			}
			c.log.Info("phase", "phase", a.Phase)
		case ActPublishTasks:
			if err := c.publishTasks(ctx, a); err != nil {
				return nil, err
			}
		case ActFit:
			if err := c.fitPatch(ctx); err != nil {
				return nil, err
			}
			out = append(out, EvFitted{})
		case ActStartStudent:
			go func() {
				if err := c.o.Student(ctx); err != nil {
					if ctx.Err() == nil {
						c.log.Error("student failed", "err", err)
					}
					select {
					case events <- evFailed{err: err}:
					case <-ctx.Done():
					}
					return
				}
				select {
				case events <- EvStudentDone{}:
				case <-ctx.Done():
				}
			}()
		case ActFinish:
			return nil, errFinished
		case ActFail:
			return nil, fmt.Errorf("coordinator: run failed: %s", a.Reason)
		}
	}
	return out, nil
}

// evFailed carries a student failure to the main loop, which ends the run with it (it
// never reaches the core).
type evFailed struct{ err error }

func (evFailed) isEvent() {}

func (c *Coordinator) publishTasks(ctx context.Context, a ActPublishTasks) error {
	for _, s := range a.Shards {
		t := Task{Phase: a.Phase, Shard: s.ID, Split: s.Split, First: s.First, Windows: s.Windows}
		if a.Phase == PhaseCache {
			if c.fit == nil {
				return fmt.Errorf("coordinator: cache tasks before the fit")
			}
			t.Start, t.End = c.fit.Start, c.fit.End
		}
		b, _ := json.Marshal(t)
		if err := worker.PublishTask(ctx, c.o.JS, c.o.Names, string(a.Phase), TaskID(a.Phase, s.ID), b); err != nil {
			return err
		}
	}
	c.log.Info("tasks published", "phase", a.Phase, "shards", len(a.Shards))
	return nil
}

// statsPath is where the stats of a shard are kept.
func (c *Coordinator) statsPath(shard int) string {
	return filepath.Join(c.o.RunDir, "stats", fmt.Sprintf("shard-%06d.json", shard))
}

// consumeStats assembles the stats records of each shard, keeps them under RunDir/stats
// and records the shard as done.
func (c *Coordinator) consumeStats(ctx context.Context) error {
	if err := os.MkdirAll(filepath.Join(c.o.RunDir, "stats"), 0o755); err != nil {
		return fmt.Errorf("coordinator: %w", err)
	}
	asm := worker.NewAssembler(c.o.Names, string(PhaseStats))
	for _, s := range c.o.Plan.Stats {
		if _, err := os.Stat(c.statsPath(s.ID)); err == nil {
			asm.MarkComplete(s.ID)
		}
	}
	return worker.Consume(ctx, c.o.JS, c.o.Names, "coordinator-stats", c.o.Names.DataFilter(string(PhaseStats)),
		func(ctx context.Context, m worker.Msg) error {
			if !strings.HasSuffix(m.Subject, ".done") {
				if _, _, err := shards.MessageMeta(m.Data); err != nil {
					c.log.Warn("rejected stats record", "subject", m.Subject, "reason", err)
					return m.Term()
				}
			}
			outcome, shard, err := asm.Add(m)
			if err != nil {
				c.log.Warn("rejected stats message", "subject", m.Subject, "reason", err)
				return m.Term()
			}
			switch outcome {
			case worker.Stale:
				return m.Ack()
			case worker.Completed:
				return c.storeStats(ctx, shard)
			}
			return nil
		}, worker.WithConsumeMaxDeliver(-1), worker.WithSoleClient(), worker.WithConsumeLogger(c.log)) // one coordinator per run
}

func (c *Coordinator) storeStats(ctx context.Context, a *worker.Assembled) error {
	var marker DoneMarker
	_ = json.Unmarshal(a.Done, &marker)
	msgs := make([][]byte, len(a.Parts))
	for i, p := range a.Parts {
		msgs[i] = p.Data
	}
	st, err := shards.DecodeStats(msgs, c.meta)
	if err == nil {
		err = c.checkStatsShard(a.Shard, st)
	}
	if err != nil {
		// Not one of ours: drop it; the task's redelivery (or another teacher) recomputes.
		c.log.Warn("rejected stats shard", "shard", a.Shard, "reason", err)
		for _, m := range a.Acks {
			_ = m.Term()
		}
		return nil
	}
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	path := c.statsPath(a.Shard)
	if err := writeFileAtomic(path, b); err != nil {
		return err
	}
	done := ShardDone{Phase: PhaseStats, Shard: a.Shard, Rows: len(st.Windows), Tokens: st.Tokens(),
		Bytes: int64(len(b)), File: path, Source: marker.Teacher}
	if err := c.putJSON(ctx, DoneKey(PhaseStats, a.Shard), done); err != nil {
		return err
	}
	for _, m := range a.Acks {
		_ = m.Ack()
	}
	return nil
}

// checkStatsShard verifies that a shard's statistics cover exactly its windows.
func (c *Coordinator) checkStatsShard(shard int, st *patch.Stats) error {
	if shard < 0 || shard >= len(c.o.Plan.Stats) {
		return fmt.Errorf("no stats shard %d in the plan", shard)
	}
	s := c.o.Plan.Stats[shard]
	if len(st.Windows) != s.Windows || st.NumPrune != c.o.Plan.Settings.NumPrune || st.SeqLen != c.o.Plan.Settings.SeqLen {
		return fmt.Errorf("stats of %d windows (n=%d, T=%d), plan says %d (n=%d, T=%d)",
			len(st.Windows), st.NumPrune, st.SeqLen, s.Windows, c.o.Plan.Settings.NumPrune, c.o.Plan.Settings.SeqLen)
	}
	for i, w := range st.Windows {
		if w.Index != s.First+i {
			return fmt.Errorf("window %d where the plan has %d", w.Index, s.First+i)
		}
	}
	return nil
}

// LoadStats merges the stats shards of a run directory in plan order.
func LoadStats(runDir string, p *Plan) (*patch.Stats, error) {
	var merged *patch.Stats
	for _, s := range p.Stats {
		b, err := os.ReadFile(filepath.Join(runDir, "stats", fmt.Sprintf("shard-%06d.json", s.ID)))
		if err != nil {
			return nil, fmt.Errorf("coordinator: stats shard %d: %w", s.ID, err)
		}
		var st patch.Stats
		if err := json.Unmarshal(b, &st); err != nil {
			return nil, fmt.Errorf("coordinator: stats shard %d: %w", s.ID, err)
		}
		if merged == nil {
			merged = &st
			continue
		}
		if err := merged.Merge(&st); err != nil {
			return nil, err
		}
	}
	if merged == nil {
		return nil, fmt.Errorf("coordinator: the plan has no stats shards")
	}
	return merged, nil
}

// fitPatch merges the stats shards in plan order, selects the block, fits the patch and
// stores it (idempotent: a stored fit is reused after a restart).
func (c *Coordinator) fitPatch(ctx context.Context) error {
	if c.fit != nil {
		if _, err := os.Stat(filepath.Join(c.o.RunDir, FitFile)); err != nil {
			// Restarted with a fit in the bucket but not in the run directory.
			var P []float32
			if c.fit.HasP {
				b, err := c.obj.GetBytes(ctx, ObjPatch0)
				if err != nil {
					return fmt.Errorf("coordinator: stored patch: %w", err)
				}
				if P, err = DecodeFloat32s(b); err != nil {
					return err
				}
			}
			if err := WriteFit(c.o.RunDir, *c.fit, P); err != nil {
				return err
			}
		}
		if c.o.OnFit != nil {
			c.o.OnFit(*c.fit)
		}
		return nil
	}
	st, err := LoadStats(c.o.RunDir, c.o.Plan)
	if err != nil {
		return err
	}
	s := c.o.Plan.Settings
	res, P, err := FitStats(st, s)
	if err != nil {
		return err
	}
	if P != nil {
		if _, err := c.obj.PutBytes(ctx, ObjPatch0, EncodeFloat32s(P.Data)); err != nil {
			return fmt.Errorf("coordinator: store patch: %w", err)
		}
	}
	var pData []float32
	if P != nil {
		pData = P.Data
	}
	if err := WriteFit(c.o.RunDir, res, pData); err != nil {
		return err
	}
	if err := c.putJSON(ctx, KeyFit, res); err != nil {
		return err
	}
	c.fit = &res
	c.log.Info("training-free patch fitted", "start", res.Start, "end", res.End, "method", res.Method)
	if c.o.OnFit != nil {
		c.o.OnFit(res)
	}
	return nil
}

// FitStats selects the block and fits the patch of settings s from merged statistics.
// The method "all" is not a single patch and is refused.
func FitStats(st *patch.Stats, s Settings) (FitResult, *tensor.Matrix, error) {
	cos := st.Cosine()
	start, err := patch.Select(cos, st.Layers, s.NumPrune, s.AllowEdges)
	if err != nil {
		return FitResult{}, nil, err
	}
	var h *patch.Hadamard
	if patch.Method(s.Method) == patch.MethodRotate {
		if h, err = patch.NewHadamard(st.Dim); err != nil {
			return FitResult{}, nil, err
		}
	}
	P, scale, err := patch.Fit(st, h, start, patch.Method(s.Method), s.Ridge)
	if err != nil {
		return FitResult{}, nil, err
	}
	return FitResult{Start: start, End: start + s.NumPrune, Method: s.Method, Cosine: cos, Scale: scale,
		Tokens: st.Tokens(), HasP: P != nil}, P, nil
}

func (c *Coordinator) watchDone(ctx context.Context, events chan<- Event) error {
	w, err := c.kv.Watch(ctx, "done.>", jetstream.UpdatesOnly())
	if err != nil {
		return fmt.Errorf("coordinator: watch completions: %w", err)
	}
	defer w.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				return nil
			}
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				continue
			}
			var d ShardDone
			if err := json.Unmarshal(e.Value(), &d); err != nil {
				c.log.Warn("bad completion record", "key", e.Key(), "err", err)
				continue
			}
			select {
			case events <- d.event():
			case <-ctx.Done():
				return nil
			}
		}
	}
}

func (c *Coordinator) watchProgress(ctx context.Context, events chan<- Event) error {
	ch := make(chan *nats.Msg, 64)
	sub, err := c.o.NC.ChanSubscribe(ProgressSubject(c.o.Plan.RunID), ch)
	if err != nil {
		return fmt.Errorf("coordinator: progress: %w", err)
	}
	defer sub.Unsubscribe()
	for {
		select {
		case <-ctx.Done():
			return nil
		case m := <-ch:
			var p Progress
			if json.Unmarshal(m.Data, &p) != nil {
				continue
			}
			c.noteTeacher(p)
			select {
			case events <- EvProgress{Phase: p.Phase, Shard: p.Shard, Teacher: p.Teacher, Tokens: p.Tokens, Now: time.Now()}:
			default: // progress is advisory; never block on it
			}
		}
	}
}

func (c *Coordinator) watchDead(ctx context.Context, events chan<- Event) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		return worker.WatchDeadLetters(ctx, c.o.JS, c.o.Names, TeacherConsumer, nil, c.log)
	})
	g.Go(func() error {
		cons, err := c.o.JS.OrderedConsumer(ctx, c.o.Names.DeadStream(), jetstream.OrderedConsumerConfig{})
		if err != nil {
			return fmt.Errorf("coordinator: dead letters: %w", err)
		}
		for ctx.Err() == nil {
			m, err := cons.Next(jetstream.FetchMaxWait(time.Second))
			if err != nil {
				continue
			}
			var d worker.DeadLetter
			var t Task
			if json.Unmarshal(m.Data(), &d) != nil || json.Unmarshal(d.Payload, &t) != nil {
				continue
			}
			select {
			case events <- EvShardDead{Phase: t.Phase, Shard: t.Shard, Reason: d.Error}:
			case <-ctx.Done():
			}
		}
		return nil
	})
	return g.Wait()
}

// TeacherConsumer is the durable name of the teachers' shared task consumer.
const TeacherConsumer = "teachers"

// ProgressSubject is the core-NATS subject of teachers' progress reports.
func ProgressSubject(run string) string { return "lp." + run + ".progress" }

func writeFileAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
	}
	return err
}

// Files of the run directory that make it self-contained for the offline student.
const (
	PlanFile   = "plan.json"  // the Plan
	FitFile    = "fit.json"   // the FitResult
	Patch0File = "patch0.f32" // the training-free patch, d×d float32 little-endian (absent for none)
)

// WritePlan writes plan.json into the run directory.
func WritePlan(runDir string, p *Plan) error {
	b, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(runDir, PlanFile), b)
}

// WriteFit writes fit.json and, when P is non-nil, patch0.f32 into the run directory.
func WriteFit(runDir string, f FitResult, P []float32) error {
	if P != nil {
		if err := writeFileAtomic(filepath.Join(runDir, Patch0File), EncodeFloat32s(P)); err != nil {
			return err
		}
	}
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(runDir, FitFile), b)
}

// ReadRunDir reads the plan, the fit and the training-free patch (nil for none) of a run
// directory, as the offline student needs them.
func ReadRunDir(runDir string) (*Plan, *FitResult, []float32, error) {
	var p Plan
	var f FitResult
	for _, x := range []struct {
		name string
		v    any
	}{{PlanFile, &p}, {FitFile, &f}} {
		b, err := os.ReadFile(filepath.Join(runDir, x.name))
		if err != nil {
			return nil, nil, nil, fmt.Errorf("coordinator: run directory %s: %w (has its stats phase finished?)", runDir, err)
		}
		if err := json.Unmarshal(b, x.v); err != nil {
			return nil, nil, nil, fmt.Errorf("coordinator: %s: %w", filepath.Join(runDir, x.name), err)
		}
	}
	if !f.HasP {
		return &p, &f, nil, nil
	}
	b, err := os.ReadFile(filepath.Join(runDir, Patch0File))
	if err != nil {
		return nil, nil, nil, fmt.Errorf("coordinator: %w", err)
	}
	P, err := DecodeFloat32s(b)
	if err != nil {
		return nil, nil, nil, err
	}
	return &p, &f, P, nil
}
