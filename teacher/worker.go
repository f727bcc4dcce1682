package teacher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"linearpatch/metrics"
	"linearpatch/model"
	"linearpatch/model/tensor"
	"linearpatch/patch"
	"linearpatch/protocol"
	"linearpatch/shards"
	"linearpatch/worker"
)

// Options configure a teacher Worker. NC, JS, Names and Compute are required.
type Options struct {
	Name    string // teacher name in progress reports (default: host-pid)
	NC      *nats.Conn
	JS      jetstream.JetStream
	Names   worker.Names
	Compute *Compute
	// Fingerprint of the teacher's model; the worker refuses a run planned for another model.
	Fingerprint string
	Stream      worker.StreamConfig
	Logger      *slog.Logger
	// WindowDelay slows the cache phase down by this much per window (fault-injection
	// tests need a run long enough to kill a teacher in the middle).
	WindowDelay time.Duration
	// Metrics, when set, counts the worker's tokens, shards, published bytes and
	// redelivered tasks.
	Metrics *metrics.Teacher
}

// Worker pulls shard tasks and publishes their records. Run it with Run.
type Worker struct {
	o        Options
	log      *slog.Logger
	plan     *protocol.Plan
	calib    [][]int
	train    [][]int
	total    atomic.Int64
	started  time.Time
	maxBytes int

	// What this worker published in full, by phase (for its closing log line: a process's
	// final metrics may never be scraped once it exits).
	doneMu     sync.Mutex
	doneShards map[protocol.Phase]int
	doneTokens map[protocol.Phase]int64
}

// NewWorker checks the options.
func NewWorker(o Options) (*Worker, error) {
	if o.NC == nil || o.JS == nil || o.Compute == nil {
		return nil, errors.New("teacher: worker needs a connection and a model")
	}
	if o.Name == "" {
		host, _ := os.Hostname()
		o.Name = fmt.Sprintf("%s-%d", host, os.Getpid())
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return &Worker{o: o, log: o.Logger.With("component", "teacher", "teacher", o.Name)}, nil
}

// Run waits for the run's plan, loads its token streams and serves tasks until ctx ends.
func (w *Worker) Run(ctx context.Context) error {
	if err := w.load(ctx); err != nil {
		return err
	}
	w.started = time.Now()
	w.maxBytes = worker.MaxPayload(w.o.NC)
	loop, err := worker.NewTaskLoop(w.o.JS, w.o.Names, protocol.TeacherConsumer,
		[]string{string(protocol.PhaseStats), string(protocol.PhaseCache)}, w.handle,
		worker.WithLoopConfig(w.o.Stream), worker.WithLoopLogger(w.log))
	if err != nil {
		return err
	}
	w.log.Info("teacher ready", "threads", tensor.Threads(), "calib_windows", len(w.calib), "train_windows", len(w.train))
	err = loop.Run(ctx)
	w.doneMu.Lock()
	w.log.Info("teacher finished", "stats_shards", w.doneShards[protocol.PhaseStats], "cache_shards", w.doneShards[protocol.PhaseCache],
		"cache_tokens", w.doneTokens[protocol.PhaseCache])
	w.doneMu.Unlock()
	return err
}

// load reads the plan and the token streams, waiting for the coordinator to create them.
func (w *Worker) load(ctx context.Context) error {
	var kv jetstream.KeyValue
	var obj jetstream.ObjectStore
	for {
		var err error
		kv, err = w.o.JS.KeyValue(ctx, w.o.Names.KVBucket())
		if err == nil {
			var e jetstream.KeyValueEntry
			if e, err = kv.Get(ctx, protocol.KeyPlan); err == nil {
				var p protocol.Plan
				if err := json.Unmarshal(e.Value(), &p); err != nil {
					return fmt.Errorf("teacher: plan: %w", err)
				}
				if err := p.CheckVersion(); err != nil {
					return fmt.Errorf("teacher: %w", err)
				}
				w.plan = &p
				break
			}
		}
		w.log.Debug("waiting for the run's plan", "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
	if w.o.Fingerprint != "" && w.o.Fingerprint != w.plan.Settings.Fingerprint {
		return fmt.Errorf("teacher: run %s was planned for model %s, this teacher has %s", w.plan.RunID, w.plan.Settings.Fingerprint, w.o.Fingerprint)
	}
	var err error
	if obj, err = w.o.JS.ObjectStore(ctx, w.o.Names.ObjectStore()); err != nil {
		return fmt.Errorf("teacher: object store: %w", err)
	}
	seq := w.plan.Settings.SeqLen
	streams := []struct {
		name string
		dst  *[][]int
	}{{protocol.ObjCalibTokens, &w.calib}, {protocol.ObjTrainTokens, &w.train}}
	for _, s := range streams {
		b, _, err := worker.GetObject(ctx, obj, s.name)
		if errors.Is(err, jetstream.ErrObjectNotFound) && s.name == protocol.ObjTrainTokens {
			continue
		}
		if err != nil {
			return fmt.Errorf("teacher: token stream %s: %w", s.name, err)
		}
		ids, err := protocol.DecodeInt32s(b)
		if err != nil {
			return err
		}
		*s.dst = model.Windows(ids, seq, 0)
	}
	return nil
}

// handle computes one shard and publishes its records; it returns only after every record
// is stored by the server, so the task's ack means the shard's data is durable.
func (w *Worker) handle(ctx context.Context, t worker.Task) error {
	var task protocol.Task
	if err := json.Unmarshal(t.Payload, &task); err != nil {
		return fmt.Errorf("teacher: task payload: %w", err)
	}
	if t.Delivered > 1 {
		w.o.Metrics.Redelivered()
	}
	if w.published(ctx, task) {
		return nil
	}
	pub, err := worker.NewPublisher(w.o.JS, worker.WithPublisherLogger(w.log))
	if err != nil {
		return err
	}
	began := time.Now()
	var n int
	var tokens int64
	switch task.Phase {
	case protocol.PhaseStats:
		n, tokens, err = w.stats(ctx, task, pub)
	case protocol.PhaseCache:
		n, tokens, err = w.cache(ctx, task, pub, t.InProgress)
	default:
		err = fmt.Errorf("teacher: unknown phase %q", task.Phase)
	}
	if err != nil {
		return err
	}
	marker, _ := json.Marshal(protocol.DoneMarker{Phase: task.Phase, Shard: task.Shard, Messages: n, Tokens: tokens, Teacher: w.o.Name,
		Attempt: task.Attempt})
	key := worker.DataKey{Run: w.o.Names.Run(), Phase: string(task.Phase), Shard: task.Shard, Done: true, Attempt: task.Attempt}
	if err := pub.Publish(ctx, key.Subject(), worker.MsgID(key), marker, w.headers()); err != nil {
		return err
	}
	if err := pub.Flush(ctx); err != nil {
		return err
	}
	w.o.Metrics.ShardDone(string(task.Phase))
	w.doneMu.Lock()
	if w.doneShards == nil {
		w.doneShards, w.doneTokens = map[protocol.Phase]int{}, map[protocol.Phase]int64{}
	}
	w.doneShards[task.Phase]++
	w.doneTokens[task.Phase] += tokens
	w.doneMu.Unlock()
	el := time.Since(began)
	w.log.Debug("shard published", "phase", task.Phase, "shard", task.Shard, "messages", n, "tokens", tokens,
		"tokens_per_s", fmt.Sprintf("%.0f", float64(tokens)/el.Seconds()))
	return nil
}

// published says whether the data stream already holds all of task's records and its done
// marker: a task redelivered after its teacher published everything but could not ack (the
// teacher died, or the server went away with the ack in flight) is then acked without
// being computed again. When the stream cannot be read, the shard is computed: records
// republished under the same ids are dropped as duplicates or by the consumer's assembler.
func (w *Worker) published(ctx context.Context, task protocol.Task) bool {
	b, records, err := worker.StoredShard(ctx, w.o.JS, w.o.Names, string(task.Phase), task.Shard)
	if err != nil {
		w.log.Debug("could not look for the shard in the data stream; computing it", "phase", task.Phase, "shard", task.Shard, "err", err)
		return false
	}
	var marker protocol.DoneMarker
	if b == nil || json.Unmarshal(b, &marker) != nil || marker.Messages != records || marker.Attempt != task.Attempt {
		return false // a recomputed shard (a new attempt) is always computed
	}
	if marker.Teacher != w.o.Name {
		// Someone else completed it: another teacher whose ack was lost, or a publisher
		// that should not be there. Its records are checked by their consumer.
		w.log.Warn("shard already completed in the data stream by another publisher; not computed again", "phase", task.Phase,
			"shard", task.Shard, "claimed_publisher", marker.Teacher)
		return true
	}
	w.log.Info("shard already in the data stream; not computed again", "phase", task.Phase, "shard", task.Shard,
		"published_by", marker.Teacher)
	return true
}

// headers are the headers of every data message this teacher publishes.
func (w *Worker) headers() map[string]string {
	return map[string]string{worker.PublisherHeader: w.o.Name}
}

func (w *Worker) windows(task protocol.Task) ([][]int, error) {
	src := w.train
	if task.Phase == protocol.PhaseStats {
		src = w.calib
	}
	if task.First < 0 || task.Windows < 1 || task.First+task.Windows > len(src) {
		return nil, fmt.Errorf("teacher: task windows [%d, %d) outside the %d windows of its stream", task.First, task.First+task.Windows, len(src))
	}
	return src[task.First : task.First+task.Windows], nil
}

func (w *Worker) stats(ctx context.Context, task protocol.Task, pub *worker.Publisher) (int, int64, error) {
	wins, err := w.windows(task)
	if err != nil {
		return 0, 0, err
	}
	s := w.plan.Settings
	opts := patch.StatsOptions{NumPrune: s.NumPrune}
	if NeedsGram(s.Method) {
		opts.Gram = patch.GramAll
	}
	m := w.o.Compute.Model()
	st, err := w.o.Compute.Stats(ctx, wins, task.First, s.NumPrune, opts, func(done int) {
		w.report(task, int64(done*s.SeqLen), int64(s.SeqLen))
	})
	if err != nil {
		return 0, 0, err
	}
	msgs, err := shards.EncodeStats(protocol.StatsMeta(w.plan, m.Dim, m.Vocab), st, w.maxBytes)
	if err != nil {
		return 0, 0, err
	}
	for i, b := range msgs {
		key := worker.DataKey{Run: w.o.Names.Run(), Phase: string(task.Phase), Shard: task.Shard, Window: i, Attempt: task.Attempt}
		if err := pub.Publish(ctx, key.Subject(), worker.MsgID(key), b, w.headers()); err != nil {
			return 0, 0, err
		}
		w.o.Metrics.Published(len(b))
	}
	return len(msgs), st.Tokens(), nil
}

// NeedsGram reports whether a method needs the Gram sums of the stats phase.
func NeedsGram(method string) bool {
	return method == string(patch.MethodLstsq) || method == "all"
}

// CacheMeta is the record metadata of a run's cache phase.
func CacheMeta(p *protocol.Plan, m *model.Model, start, end int) (shards.Meta, error) {
	dt, err := shards.ParseDType(p.Settings.ActDType)
	if err != nil {
		return shards.Meta{}, err
	}
	return shards.Meta{SchemaVersion: shards.SchemaVersion, RunID: p.RunID, Fingerprint: p.Settings.Fingerprint,
		Start: start, End: end, Dim: m.Dim, K: p.Settings.TopK, Vocab: m.Vocab, ActDType: dt, Final: p.Settings.CacheFinal}, nil
}

func (w *Worker) cache(ctx context.Context, task protocol.Task, pub *worker.Publisher, inProgress func() error) (int, int64, error) {
	wins, err := w.windows(task)
	if err != nil {
		return 0, 0, err
	}
	m := w.o.Compute.Model()
	meta, err := CacheMeta(w.plan, m, task.Start, task.End)
	if err != nil {
		return 0, 0, err
	}
	per := shards.TokensPerChunk(meta, w.maxBytes)
	if per < 1 {
		return 0, 0, fmt.Errorf("teacher: one token of width %d does not fit the server's max payload %d", m.Dim, w.maxBytes)
	}
	var n int
	var tokens int64
	for i, ids := range wins {
		if err := ctx.Err(); err != nil {
			return 0, 0, err
		}
		rec, err := w.o.Compute.Window(ctx, ids, task.Start, meta.K, meta.Final)
		if err != nil {
			return 0, 0, err
		}
		whole := shards.Chunk{Shard: task.Shard, Window: task.First + i, Chunk: 0, Chunks: 1,
			InputIDs: rec.InputIDs, XCut: rec.XCut, TopKIdx: rec.TopKIdx, TopKProb: rec.TopKProb, XFinal: rec.XFinal}
		for _, c := range shards.SplitWindow(meta, whole, per) {
			b, err := shards.EncodeMessage(meta, []shards.Chunk{c})
			if err != nil {
				return 0, 0, fmt.Errorf("teacher: window %d: %w", whole.Window, err)
			}
			key := worker.DataKey{Run: w.o.Names.Run(), Phase: string(task.Phase), Shard: task.Shard, Window: c.Window, Chunk: c.Chunk,
				Attempt: task.Attempt}
			if err := pub.Publish(ctx, key.Subject(), worker.MsgID(key), b, w.headers()); err != nil {
				return 0, 0, err
			}
			w.o.Metrics.Published(len(b))
			n++
		}
		tokens += int64(len(ids))
		w.report(task, tokens, int64(len(ids)))
		if d := w.o.WindowDelay; d > 0 {
			select {
			case <-ctx.Done():
				return 0, 0, ctx.Err()
			case <-time.After(d):
			}
		}
	}
	return n, tokens, nil
}

// report publishes a progress report (core NATS, fire and forget).
func (w *Worker) report(task protocol.Task, shardTokens, delta int64) {
	total := w.total.Add(delta)
	p := protocol.Progress{Teacher: w.o.Name, Phase: task.Phase, Shard: task.Shard, Tokens: shardTokens,
		TotalTokens: total, TokensPerSec: float64(total) / time.Since(w.started).Seconds(), Threads: tensor.Threads()}
	w.o.Metrics.Tokens(string(task.Phase), delta)
	w.o.Metrics.SetRate(p.TokensPerSec)
	b, _ := json.Marshal(p)
	_ = w.o.NC.Publish(protocol.ProgressSubject(w.o.Names.Run()), b)
}
