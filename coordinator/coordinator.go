package coordinator

import (
	"context"
	"crypto/rand"
	"encoding/hex"
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

	"linearpatch/internal/atomicfile"
	"linearpatch/metrics"
	"linearpatch/model/tensor"
	"linearpatch/patch"
	"linearpatch/protocol"
	"linearpatch/shards"
	"linearpatch/worker"
)

// Options configure a Coordinator. Plan, NC, JS, Names and RunDir are required.
type Options struct {
	Plan   *protocol.Plan
	NC     *nats.Conn
	JS     jetstream.JetStream
	Names  worker.Names
	RunDir string // stats shard files go to RunDir/stats
	Lease  time.Duration
	// Student runs the distillation when the cache phase is complete; nil ends the run
	// after caching.
	Student func(ctx context.Context) error
	// OnFit, when set, is told the training-free fit (for printing the table).
	OnFit  func(protocol.FitResult)
	Logger *slog.Logger
	// Metrics, when set, receives the run's shard counts, phase, teachers' rates and dead
	// letters as they change.
	Metrics *metrics.Coordinator
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
	fit  *protocol.FitResult

	redos      map[ShardRef]int  // tasks republished after a rejected record, by shard (main loop only)
	statsAsked map[int]time.Time // stats shards whose recomputation this coordinator asked for (consumeStats only)

	// afterRestore, when set (tests), runs between the read of the stored state and the
	// start of the watchers.
	afterRestore func()

	mu     sync.Mutex
	status Status
	began  time.Time // when Run started, for TeacherWarning
}

// Status is a snapshot of a run's progress, safe to read from any goroutine. The
// coordinator also stores it under the KV key "status" every few seconds for
// `linearpatch status`.
type Status struct {
	Run      string                   `json:"run"`
	Phase    protocol.Phase           `json:"phase"`
	Done     map[protocol.Phase]int   `json:"done"`     // shards complete per phase
	Leased   map[protocol.Phase]int   `json:"leased"`   // shards a teacher reports working on
	Total    map[protocol.Phase]int   `json:"total"`    // shards per phase
	Teachers map[string]TeacherStatus `json:"teachers"` // by teacher name
	Updated  time.Time                `json:"updated"`
	// Pending are the shards of each phase that no teacher works on, by id.
	Pending map[protocol.Phase][]int `json:"pending_shards"`
	// Warning says why the run makes no progress when it knows ("" otherwise): shards wait
	// and every teacher is gone, or none ever came (see TeacherWarning).
	Warning string `json:"warning,omitempty"`
}

// TeacherStatus is what the coordinator last heard from a teacher.
type TeacherStatus struct {
	Phase        protocol.Phase `json:"phase"`
	Shard        int            `json:"shard"`
	TokensPerSec float64        `json:"tokens_per_s"`
	TotalTokens  int64          `json:"total_tokens"`
	Threads      int            `json:"threads"`
	LastSeen     time.Time      `json:"last_seen"`
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
	st := Status{Run: c.o.Plan.RunID, Phase: c.core.Phase(), Done: map[protocol.Phase]int{}, Leased: map[protocol.Phase]int{}, Total: map[protocol.Phase]int{}}
	for _, ph := range []protocol.Phase{protocol.PhaseStats, protocol.PhaseCache} {
		n := c.core.Counts(ph)
		st.Done[ph], st.Leased[ph] = n[StatusDone], n[StatusLeased]
		st.Total[ph] = len(c.o.Plan.Shards(ph))
	}
	st.Pending = pendingShards(c.core.States())
	c.o.Metrics.SetPhase(string(st.Phase))
	for _, ph := range []protocol.Phase{protocol.PhaseStats, protocol.PhaseCache} {
		c.o.Metrics.SetShards(string(ph), st.Done[ph], st.Leased[ph], len(st.Pending[ph]), st.Total[ph])
	}
	c.mu.Lock()
	st.Teachers = c.status.Teachers
	st.Warning = c.status.Warning
	c.status = st
	c.mu.Unlock()
}

// noteTeacher records a progress report for the status snapshot.
func (c *Coordinator) noteTeacher(p protocol.Progress) {
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
			st := c.checkTeachers(time.Now())
			st.Updated = time.Now()
			if b, err := json.Marshal(st); err == nil {
				_, _ = c.kv.Put(ctx, KeyStatus, b)
			}
			c.writeStatusFile(st)
		}
	}
}

// New returns a coordinator; dim and vocab are the model's.
func New(o Options, dim, vocab int) (*Coordinator, error) {
	if o.Plan == nil || o.NC == nil || o.JS == nil || o.RunDir == "" {
		return nil, fmt.Errorf("%w: coordinator needs a plan, a connection and a run directory", protocol.ErrPlan)
	}
	if o.Lease <= 0 {
		o.Lease = time.Minute
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return &Coordinator{o: o, log: o.Logger.With("component", "coordinator", "run", o.Plan.RunID),
		meta: protocol.StatsMeta(o.Plan, dim, vocab)}, nil
}

// Run drives the run to its end: nil when it finished, an error when it failed or ctx ended.
func (c *Coordinator) Run(ctx context.Context) error {
	var err error
	c.began = time.Now()
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
	for _, ph := range []protocol.Phase{protocol.PhaseStats, protocol.PhaseCache} {
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
	if marked, err = c.verifyMarked(ctx, marked, restored, done); err != nil {
		return err
	}
	if c.afterRestore != nil {
		c.afterRestore()
	}
	c.core = NewCore(c.o.Plan, c.o.Lease, c.o.Student != nil)
	events := make(chan Event, 256)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return c.consumeStats(gctx) })
	g.Go(func() error { return c.watchDone(gctx, events) })
	g.Go(func() error { return c.pollDone(gctx, events, donePoll) })
	g.Go(func() error { return c.watchRedo(gctx, events) })
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
				if r, ok := ev.(evRedo); ok {
					if err := c.redo(gctx, r.Redo); err != nil {
						return err
					}
					continue
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
	c.writeStatusFile(final)
	if errors.Is(err, errFinished) {
		return nil
	}
	return err
}

var errFinished = errors.New("coordinator: finished")

// verifyMarked keeps, of the marked shards that are not done, those whose records the data
// stream holds as many of as their done marker counts. A marker stored without all its
// records (a server that lost messages it had acknowledged, or a record republished after
// its marker and lost with the process) would otherwise keep the shard's task from being
// published again once the task was gone: the shard would wait forever. Its task is
// published again instead, and a teacher recomputes it (a teacher computes a shard whose
// records it does not all find). One stream request per marked shard not done.
func (c *Coordinator) verifyMarked(ctx context.Context, marked []ShardRef, restored []ShardState, done []Event) ([]ShardRef, error) {
	isDone := map[ShardRef]bool{}
	for _, s := range restored {
		if s.Status == StatusDone {
			isDone[ShardRef{Phase: s.Phase, ID: s.ID}] = true
		}
	}
	for _, ev := range done {
		if d, ok := ev.(EvShardDone); ok {
			isDone[ShardRef{Phase: d.Phase, ID: d.Shard}] = true
		}
	}
	var out []ShardRef
	for _, m := range marked {
		if isDone[m] {
			out = append(out, m)
			continue
		}
		b, records, err := worker.StoredShard(ctx, c.o.JS, c.o.Names, string(m.Phase), m.ID)
		if err != nil {
			return nil, fmt.Errorf("coordinator: %w", err)
		}
		var marker protocol.DoneMarker
		if b == nil || json.Unmarshal(b, &marker) != nil || marker.Messages != records {
			c.log.Warn("the done marker of a shard is in the data stream, but not all of its records: publishing its task again",
				"phase", m.Phase, "shard", m.ID, "records", records, "marker_counts", marker.Messages)
			continue
		}
		out = append(out, m)
	}
	return out, nil
}

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
			var d protocol.ShardDone
			if err := c.getJSON(ctx, k, &d); err != nil {
				return nil, nil, err
			}
			done = append(done, shardDoneEvent(d))
		}
	}
	if v, err := c.kv.Get(ctx, protocol.KeyFit); err == nil {
		var f protocol.FitResult
		if err := json.Unmarshal(v.Value(), &f); err != nil {
			return nil, nil, fmt.Errorf("coordinator: stored fit: %w", err)
		}
		c.fit = &f
	}
	return states, done, nil
}

func shardDoneEvent(d protocol.ShardDone) EvShardDone {
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
			if err := c.put(ctx, protocol.KeyPhase, []byte(a.Phase)); err != nil {
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
					// Not logged here: Run returns the error, and its caller reports it
					// (logging it too printed every student failure twice).
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
		t := protocol.Task{Phase: a.Phase, Shard: s.ID, Split: s.Split, First: s.First, Windows: s.Windows}
		if a.Phase == protocol.PhaseCache {
			if c.fit == nil {
				return fmt.Errorf("coordinator: cache tasks before the fit")
			}
			t.Start, t.End = c.fit.Start, c.fit.End
		}
		b, _ := json.Marshal(t)
		if err := worker.PublishTask(ctx, c.o.JS, c.o.Names, string(a.Phase), protocol.TaskID(a.Phase, s.ID), b); err != nil {
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
	asm := worker.NewAssembler(c.o.Names, string(protocol.PhaseStats))
	for _, s := range c.o.Plan.Stats {
		kept, err := c.statsKept(ctx, s.ID)
		if err != nil {
			return err
		}
		if kept {
			asm.MarkComplete(s.ID)
		}
	}
	return worker.Consume(ctx, c.o.JS, c.o.Names, "coordinator-stats", c.o.Names.DataFilter(string(protocol.PhaseStats)),
		func(ctx context.Context, m worker.Msg) error {
			if !strings.HasSuffix(m.Subject, ".done") {
				if _, _, err := shards.MessageMeta(m.Data); err != nil {
					c.log.Warn("rejected stats record", "subject", m.Subject, "claimed_publisher", worker.ClaimedPublisher(m.Header), "reason", err)
					c.askRedo(ctx, m.Subject, err, worker.ClaimedPublisher(m.Header))
					return m.Term()
				}
			}
			outcome, shard, err := asm.Add(m)
			if err != nil {
				c.log.Warn("rejected stats message", "subject", m.Subject, "claimed_publisher", worker.ClaimedPublisher(m.Header), "reason", err)
				c.askRedo(ctx, m.Subject, err, worker.ClaimedPublisher(m.Header))
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

// statsKept says whether the stats file of a shard is in the run directory and recorded
// done. A file written by a coordinator that stopped before recording it (killed between
// the two) is verified and recorded now: its records, acked as stale once the shard counts
// as complete here, would otherwise never record it, and the stats phase would wait for it
// forever. A file that does not verify is removed, and the shard rebuilt from the stream.
func (c *Coordinator) statsKept(ctx context.Context, shard int) (bool, error) {
	path := c.statsPath(shard)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("coordinator: %w", err)
	}
	if _, err := c.kv.Get(ctx, protocol.DoneKey(protocol.PhaseStats, shard)); err == nil {
		return true, nil
	} else if !errors.Is(err, jetstream.ErrKeyNotFound) {
		return false, fmt.Errorf("coordinator: read %s: %w", protocol.DoneKey(protocol.PhaseStats, shard), err)
	}
	var st patch.Stats
	err = json.Unmarshal(b, &st)
	if err == nil {
		err = st.Validate()
	}
	if err == nil {
		err = c.checkStatsShard(shard, &st)
	}
	if err != nil {
		c.log.Warn("stats file of a shard not recorded done does not verify; rebuilding it from the stream", "shard", shard, "file", path, "err", err)
		if err := os.Remove(path); err != nil {
			return false, fmt.Errorf("coordinator: %w", err)
		}
		return false, nil
	}
	c.log.Info("stats file written before a restart but not recorded done: recording it now", "shard", shard, "file", path)
	done := protocol.ShardDone{Phase: protocol.PhaseStats, Shard: shard, Rows: len(st.Windows), Tokens: st.Tokens(), Bytes: int64(len(b)), File: path}
	if err := c.putJSON(ctx, protocol.DoneKey(protocol.PhaseStats, shard), done); err != nil {
		return false, err
	}
	return true, nil
}

func (c *Coordinator) storeStats(ctx context.Context, a *worker.Assembled) error {
	var marker protocol.DoneMarker
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
		c.askRedo(ctx, c.o.Names.DoneSubject(string(protocol.PhaseStats), a.Shard), err, "")
		return nil
	}
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	path := c.statsPath(a.Shard)
	if err := atomicfile.Write(path, b, 0o644); err != nil {
		return err
	}
	done := protocol.ShardDone{Phase: protocol.PhaseStats, Shard: a.Shard, Rows: len(st.Windows), Tokens: st.Tokens(),
		Bytes: int64(len(b)), File: path, Source: marker.Teacher}
	if err := c.putJSON(ctx, protocol.DoneKey(protocol.PhaseStats, a.Shard), done); err != nil {
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
func LoadStats(runDir string, p *protocol.Plan) (*patch.Stats, error) {
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
		if _, err := os.Stat(filepath.Join(c.o.RunDir, protocol.FitFile)); err != nil {
			// Restarted with a fit in the bucket but not in the run directory.
			var P []float32
			if c.fit.HasP {
				b, _, err := worker.GetObject(ctx, c.obj, protocol.ObjPatch0)
				if err != nil {
					return fmt.Errorf("coordinator: stored patch: %w", err)
				}
				if P, err = protocol.DecodeFloat32s(b); err != nil {
					return err
				}
			}
			if err := protocol.WriteFit(c.o.RunDir, *c.fit, P); err != nil {
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
		if _, err := c.obj.PutBytes(ctx, protocol.ObjPatch0, protocol.EncodeFloat32s(P.Data)); err != nil {
			return fmt.Errorf("coordinator: store patch: %w", err)
		}
	}
	var pData []float32
	if P != nil {
		pData = P.Data
	}
	if err := protocol.WriteFit(c.o.RunDir, res, pData); err != nil {
		return err
	}
	if err := c.putJSON(ctx, protocol.KeyFit, res); err != nil {
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
func FitStats(st *patch.Stats, s protocol.Settings) (protocol.FitResult, *tensor.Matrix, error) {
	cos := st.Cosine()
	start, err := patch.Select(cos, st.Layers, s.NumPrune, s.AllowEdges)
	if err != nil {
		return protocol.FitResult{}, nil, err
	}
	var h *patch.Hadamard
	if patch.Method(s.Method) == patch.MethodRotate {
		if h, err = patch.NewHadamard(st.Dim); err != nil {
			return protocol.FitResult{}, nil, err
		}
	}
	P, scale, err := patch.Fit(st, h, start, patch.Method(s.Method), s.Ridge)
	if err != nil {
		return protocol.FitResult{}, nil, err
	}
	return protocol.FitResult{Start: start, End: start + s.NumPrune, Method: s.Method, Cosine: cos, Scale: scale,
		Tokens: st.Tokens(), HasP: P != nil}, P, nil
}

// watchDone feeds every completion record in the bucket to the main loop: those already
// stored when it starts, then each new one. Not only the updates: a record written after
// restore listed the bucket and before this watch started (a resumed cache writer
// re-records the shards of its manifest at once) would otherwise never reach the core, and
// the run would wait for that shard forever (a resumed run stalled at done=21 of 22 that
// way). The core ignores the completions it already has.
func (c *Coordinator) watchDone(ctx context.Context, events chan<- Event) error {
	return watchKV(ctx, c, events, "done.>", "completion records", func(d protocol.ShardDone) Event { return shardDoneEvent(d) })
}

// donePoll is how often the coordinator lists the completion records besides watching
// them.
const donePoll = 10 * time.Second

// pollDone lists the bucket's completion records every poll and feeds those it has not fed
// before to the main loop, until ctx ends. It backs watchDone: a KV watch is an ordered
// consumer, and after the loss of the bucket's leader node in a cluster one stopped
// delivering (TestJetStreamCluster/kill-kv-leader: the run waited for completions already
// recorded). Each listing is a fresh request with a deadline; a failed one is retried at
// the next poll. The core ignores a completion fed twice.
func (c *Coordinator) pollDone(ctx context.Context, events chan<- Event, poll time.Duration) error {
	fed := map[string]bool{}
	for {
		if err := worker.SleepCtx(ctx, poll); err != nil {
			return nil
		}
		lctx, cancel := context.WithTimeout(ctx, poll)
		var keys []string
		lister, err := c.kv.ListKeysFiltered(lctx, "done.>")
		if err == nil {
			for k := range lister.Keys() {
				if !fed[k] {
					keys = append(keys, k)
				}
			}
		}
		for _, k := range keys {
			var d protocol.ShardDone
			if err := c.getJSON(lctx, k, &d); err != nil {
				continue
			}
			fed[k] = true
			select {
			case events <- shardDoneEvent(d):
			case <-ctx.Done():
				cancel()
				return nil
			}
		}
		cancel()
	}
}

// watchKV feeds the JSON records put under the bucket keys matching pattern to the main
// loop as events, until ctx ends; a record that does not decode is logged (as a bad what)
// and skipped.
func watchKV[T any](ctx context.Context, c *Coordinator, events chan<- Event, pattern, what string,
	event func(T) Event, opts ...jetstream.WatchOpt) error {
	w, err := c.kv.Watch(ctx, pattern, opts...)
	if err != nil {
		return fmt.Errorf("coordinator: watch %s: %w", what, err)
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
			var rec T
			if err := json.Unmarshal(e.Value(), &rec); err != nil {
				c.log.Warn("bad "+what, "key", e.Key(), "err", err)
				continue
			}
			select {
			case events <- event(rec):
			case <-ctx.Done():
				return nil
			}
		}
	}
}

func (c *Coordinator) watchProgress(ctx context.Context, events chan<- Event) error {
	ch := make(chan *nats.Msg, 64)
	sub, err := c.o.NC.ChanSubscribe(protocol.ProgressSubject(c.o.Plan.RunID), ch)
	if err != nil {
		return fmt.Errorf("coordinator: progress: %w", err)
	}
	defer sub.Unsubscribe()
	for {
		select {
		case <-ctx.Done():
			return nil
		case m := <-ch:
			var p protocol.Progress
			if json.Unmarshal(m.Data, &p) != nil {
				continue
			}
			c.noteTeacher(p)
			c.o.Metrics.Teacher(p.Teacher, p.TokensPerSec, p.TotalTokens)
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
		return worker.WatchDeadLetters(ctx, c.o.JS, c.o.Names, protocol.TeacherConsumer, nil, c.log)
	})
	g.Go(func() error {
		return c.readDeadStream(ctx, time.Second, func(data []byte) {
			var d worker.DeadLetter
			var t protocol.Task
			if json.Unmarshal(data, &d) != nil || json.Unmarshal(d.Payload, &t) != nil {
				return
			}
			c.o.Metrics.DeadLetter(string(t.Phase))
			select {
			case events <- EvShardDead{Phase: t.Phase, Shard: t.Shard, Reason: d.Error}:
			case <-ctx.Done():
			}
		})
	})
	return g.Wait()
}

// readDeadStream hands every record of the dead-letter stream, in order, to fn until ctx
// ends, looking for new ones every poll. It reads by sequence with requests bound to ctx,
// not with an ordered consumer: an ordered consumer's Next retries the re-creation of its
// consumer, holding a lock and ignoring every context, for as long as that fails — after a
// cluster node's loss it was seen to block for minutes and with it the coordinator's exit
// (TestJetStreamCluster). Failed requests (a server restarting, a leader election) are
// retried at the next poll.
func (c *Coordinator) readDeadStream(ctx context.Context, poll time.Duration, fn func([]byte)) error {
	next := uint64(1)
	var stream jetstream.Stream
	for {
		if stream == nil {
			if s, err := c.o.JS.Stream(ctx, c.o.Names.DeadStream()); err == nil {
				stream = s
			}
		}
		if stream != nil {
			if info, err := stream.Info(ctx); err == nil {
				if first := info.State.FirstSeq; first > next {
					next = first // records removed from the stream cannot be read any more
				}
				for ; next <= info.State.LastSeq && ctx.Err() == nil; next++ {
					m, err := stream.GetMsg(ctx, next)
					if errors.Is(err, jetstream.ErrMsgNotFound) {
						continue // deleted
					}
					if err != nil {
						break // retried at the next poll
					}
					fn(m.Data)
				}
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(poll):
		}
	}
}

// MaxRedos is how many times a shard is recomputed after rejected records before the run
// fails (a publisher that keeps sending junk for it, or a teacher that cannot compute it).
const MaxRedos = 5

// evRedo carries a recomputation request (KV protocol.RedoKey) to the main loop, which republishes
// the shard's task (it never reaches the core: the shard simply stays pending).
type evRedo struct{ protocol.Redo }

func (evRedo) isEvent() {}

// watchRedo feeds the recomputation requests in the bucket, those written before this
// coordinator started included, to the main loop.
func (c *Coordinator) watchRedo(ctx context.Context, events chan<- Event) error {
	return watchKV(ctx, c, events, "redo.>", "recomputation requests", func(r protocol.Redo) Event { return evRedo{r} })
}

// redo republishes the task of a shard one of whose records was rejected, with a fresh
// attempt nonce (so a fresh task id and fresh record ids: records squatted under the old
// ids no longer matter), unless the shard is done meanwhile. It fails the run once a shard
// has been recomputed MaxRedos times.
func (c *Coordinator) redo(ctx context.Context, r protocol.Redo) error {
	key := protocol.RedoKey(r.Phase, r.Shard)
	shards := c.o.Plan.Shards(r.Phase)
	if r.Shard < 0 || r.Shard >= len(shards) {
		c.log.Warn("recomputation request for a shard the plan does not have", "phase", r.Phase, "shard", r.Shard)
		return c.kv.Delete(ctx, key)
	}
	if _, err := c.kv.Get(ctx, protocol.DoneKey(r.Phase, r.Shard)); err == nil {
		return c.kv.Delete(ctx, key)
	}
	ref := ShardRef{Phase: r.Phase, ID: r.Shard}
	if c.redos == nil {
		c.redos = map[ShardRef]int{}
	}
	if c.redos[ref] >= MaxRedos {
		return fmt.Errorf("coordinator: shard %d of phase %s: a record was rejected after %d recomputations (last: %s, claimed publisher %s)",
			r.Shard, r.Phase, MaxRedos, r.Reason, r.ClaimedPublisher)
	}
	c.redos[ref]++
	s := shards[r.Shard]
	var nonce [8]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return fmt.Errorf("coordinator: %w", err)
	}
	t := protocol.Task{Phase: r.Phase, Shard: s.ID, Split: s.Split, First: s.First, Windows: s.Windows, Attempt: hex.EncodeToString(nonce[:])}
	if r.Phase == protocol.PhaseCache {
		if c.fit == nil {
			return fmt.Errorf("coordinator: cache task before the fit")
		}
		t.Start, t.End = c.fit.Start, c.fit.End
	}
	b, _ := json.Marshal(t)
	if err := worker.PublishTask(ctx, c.o.JS, c.o.Names, string(r.Phase), protocol.TaskID(r.Phase, s.ID)+"-"+t.Attempt, b); err != nil {
		return err
	}
	c.log.Warn("a record of the shard was rejected; recomputing it under fresh message ids", "phase", r.Phase, "shard", r.Shard,
		"attempt", t.Attempt, "subject", r.Subject, "reason", r.Reason, "claimed_publisher", r.ClaimedPublisher)
	return c.kv.Delete(ctx, key)
}

// askRedo is the stats phase's requestRedo (see cache.Writer): the coordinator consumes the
// stats records itself, and asks itself through the bucket like any consumer.
func (c *Coordinator) askRedo(ctx context.Context, subject string, reason error, claimed string) {
	k, err := c.o.Names.ParseDataSubject(subject)
	if err != nil || k.Phase != string(protocol.PhaseStats) {
		return
	}
	if c.statsAsked == nil {
		c.statsAsked = map[int]time.Time{}
	}
	if t, ok := c.statsAsked[k.Shard]; ok && time.Since(t) < 5*time.Second {
		return
	}
	c.statsAsked[k.Shard] = time.Now()
	b, _ := json.Marshal(protocol.Redo{Phase: protocol.PhaseStats, Shard: k.Shard, Subject: subject, Reason: reason.Error(), ClaimedPublisher: claimed})
	if _, err := c.kv.Put(ctx, protocol.RedoKey(protocol.PhaseStats, k.Shard), b); err != nil {
		c.log.Warn("asking for the shard to be recomputed failed", "phase", protocol.PhaseStats, "shard", k.Shard, "err", err)
	}
}
