// Package cache is the cache writer: it assembles the teachers' activation records from
// JetStream into verified shard files (Arrow IPC file format) listed in a manifest, and
// records each completed shard in the run's key-value bucket.
//
// The data stream is the source of truth: a shard file that fails its checksum is dropped
// and rebuilt from the stream's records, never trained on.
package cache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"

	"linearpatch/metrics"
	"linearpatch/model"
	"linearpatch/protocol"
	"linearpatch/shards"
	"linearpatch/teacher"
	"linearpatch/worker"
)

// ManifestFile is the manifest's name inside the cache directory.
const ManifestFile = "manifest.json"

// Options configure a Writer. JS, Names and Dir are required.
type Options struct {
	JS          jetstream.JetStream
	Names       worker.Names
	Dir         string // the cache directory (run directory/cache)
	Compression shards.Compression
	Logger      *slog.Logger
	// Dim and Vocab of the model (from its config), for the record metadata.
	Dim, Vocab int
	// LeaseRenewal is how often the writer renews its lease on the run (default
	// DefaultLeaseRenewal); see WriterKey.
	LeaseRenewal time.Duration
	// Metrics, when set, counts the shard files, bytes and tokens the writer writes and
	// the records redelivered to it.
	Metrics *metrics.CacheWriter
}

// Writer assembles shards. Run it with Run.
type Writer struct {
	o    Options
	log  *slog.Logger
	plan *protocol.Plan
	fit  protocol.FitResult
	meta shards.Meta

	mu       sync.Mutex
	manifest *shards.Manifest
	kv       jetstream.KeyValue
	redone   map[int]time.Time // when a recomputation of the shard was last asked for

	// What this process wrote (for its closing log line: a process's final metrics may
	// never be scraped once it exits).
	written struct{ shards, bytes, tokens int64 }
}

// NewWriter checks the options.
func NewWriter(o Options) (*Writer, error) {
	if o.JS == nil || o.Dir == "" || o.Dim <= 0 || o.Vocab <= 0 {
		return nil, errors.New("cache: writer needs JetStream, a directory and the model's width and vocabulary")
	}
	if o.Compression == "" {
		o.Compression = shards.CompressZstd
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.LeaseRenewal <= 0 {
		o.LeaseRenewal = DefaultLeaseRenewal
	}
	return &Writer{o: o, log: o.Logger.With("component", "cache")}, nil
}

// Manifest returns a copy of the current manifest (nil before Run loaded it).
func (w *Writer) Manifest() *shards.Manifest {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.manifest == nil {
		return nil
	}
	m := *w.manifest
	m.Shards = append([]shards.ManifestEntry(nil), w.manifest.Shards...)
	return &m
}

// Run takes the run's writer lease (ErrWriterBusy when another writer holds it), waits for
// the run's plan and fit, verifies the shard files already on disk, then assembles shards
// until ctx ends.
func (w *Writer) Run(ctx context.Context) error {
	if err := w.waitBucket(ctx); err != nil {
		return err
	}
	l, err := acquireLease(ctx, w.kv, thisWriter(w.o.Dir, w.o.LeaseRenewal), w.log)
	if err != nil {
		return err
	}
	defer l.release()
	defer func() {
		w.mu.Lock()
		w.log.Info("cache writer finished", "shards_written", w.written.shards, "bytes_written", w.written.bytes, "tokens_written", w.written.tokens)
		w.mu.Unlock()
	}()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return l.keep(gctx) })
	g.Go(func() error {
		err := w.assemble(gctx)
		if gctx.Err() != nil && ctx.Err() == nil {
			return nil // the lease was lost: keep's error says so
		}
		return err
	})
	return g.Wait()
}

// assemble waits for the fit, verifies the shard files already on disk, then assembles
// shards until ctx ends.
func (w *Writer) assemble(ctx context.Context) error {
	if err := w.waitFit(ctx); err != nil {
		return err
	}
	if err := os.MkdirAll(w.o.Dir, 0o755); err != nil {
		return fmt.Errorf("cache: %w", err)
	}
	asm := worker.NewAssembler(w.o.Names, string(protocol.PhaseCache))
	if err := w.loadManifest(ctx, asm); err != nil {
		return err
	}
	return worker.Consume(ctx, w.o.JS, w.o.Names, "cache-writer", w.o.Names.DataFilter(string(protocol.PhaseCache)),
		func(ctx context.Context, m worker.Msg) error {
			if m.Delivered > 1 {
				w.o.Metrics.Redelivered()
			}
			if !strings.HasSuffix(m.Subject, ".done") {
				if _, err := shards.DecodeMessage(m.Data, w.meta); err != nil {
					w.log.Warn("rejected record", "subject", m.Subject, "claimed_publisher", worker.ClaimedPublisher(m.Header), "reason", err)
					w.requestRedo(ctx, m.Subject, err, worker.ClaimedPublisher(m.Header))
					return m.Term()
				}
			}
			outcome, a, err := asm.Add(m)
			if err != nil {
				w.log.Warn("rejected message", "subject", m.Subject, "claimed_publisher", worker.ClaimedPublisher(m.Header), "reason", err)
				w.requestRedo(ctx, m.Subject, err, worker.ClaimedPublisher(m.Header))
				return m.Term()
			}
			switch outcome {
			case worker.Stale:
				return m.Ack()
			case worker.Completed:
				if err := w.store(ctx, a); err != nil {
					asm.Forget(a.Shard)
					return err
				}
			}
			return nil
		}, worker.WithConsumeMaxDeliver(-1), worker.WithConsumeAckWait(5*time.Minute), worker.WithMaxAckPending(1<<16),
		worker.WithSoleClient(), worker.WithConsumeLogger(w.log)) // the lease makes this writer the only client
}

// Meta returns the record metadata the writer accepts.
func (w *Writer) Meta() shards.Meta { return w.meta }

// waitBucket waits until the run's key-value bucket exists (the coordinator creates it).
func (w *Writer) waitBucket(ctx context.Context) error {
	for {
		kv, err := w.o.JS.KeyValue(ctx, w.o.Names.KVBucket())
		if err == nil {
			w.kv = kv
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// waitFit waits until the run's plan and fitted block are in the bucket.
func (w *Writer) waitFit(ctx context.Context) error {
	for {
		var p protocol.Plan
		var f protocol.FitResult
		if err := getJSON(ctx, w.kv, protocol.KeyPlan, &p); err == nil {
			if err := p.CheckVersion(); err != nil {
				return fmt.Errorf("cache: %w", err)
			}
			if err := getJSON(ctx, w.kv, protocol.KeyFit, &f); err == nil {
				w.plan, w.fit = &p, f
				meta, err := teacher.CacheMeta(&p, &model.Model{Config: model.Config{Dim: w.o.Dim, Vocab: w.o.Vocab}}, f.Start, f.End)
				if err != nil {
					return err
				}
				w.meta = meta
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func getJSON(ctx context.Context, kv jetstream.KeyValue, key string, v any) error {
	e, err := kv.Get(ctx, key)
	if err != nil {
		return err
	}
	return json.Unmarshal(e.Value(), v)
}

// loadManifest reads the manifest, verifies every listed file and marks the good ones
// complete; a file that is missing or fails its checksum is dropped from the manifest, so
// its shard is rebuilt from the stream's records.
func (w *Writer) loadManifest(ctx context.Context, asm *worker.Assembler) error {
	path := filepath.Join(w.o.Dir, ManifestFile)
	m, err := shards.LoadManifest(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		m = &shards.Manifest{Meta: w.meta}
	case err != nil:
		return fmt.Errorf("cache: %w", err)
	}
	var keep []shards.ManifestEntry
	var refetch []int
	for _, e := range m.Shards {
		sum, err := shards.FileSHA256(e.Path(w.o.Dir))
		if err == nil && sum != e.SHA256 {
			err = fmt.Errorf("%w: %s has sha256 %s, the manifest records %s", shards.ErrChecksum, e.File, sum, e.SHA256)
		}
		if err != nil {
			w.log.Warn("shard file fails verification; rebuilding it from the stream", "shard", e.Shard, "file", e.File, "err", err)
			os.Remove(e.Path(w.o.Dir))
			refetch = append(refetch, e.Shard)
			continue
		}
		keep = append(keep, e)
		asm.MarkComplete(e.Shard)
		if err := w.recordDone(ctx, e); err != nil {
			return err
		}
	}
	m.Shards = keep
	m.Meta = w.meta
	// Shards recorded done that this directory lacks (a writer that took the run over on
	// another machine, a lost manifest) are rebuilt from the stream: their messages were acked.
	recorded, err := w.recordedDone(ctx)
	if err != nil {
		return err
	}
	for _, shard := range recorded {
		if _, ok := m.Entry(shard); !ok && !slices.Contains(refetch, shard) {
			w.log.Info("shard recorded done but not in this cache directory; rebuilding it from the stream", "shard", shard)
			refetch = append(refetch, shard)
		}
	}
	w.mu.Lock()
	w.manifest = m
	w.mu.Unlock()
	if err := m.Save(path); err != nil {
		return err
	}
	w.o.Metrics.SetShards(len(m.Shards))
	for _, shard := range refetch {
		if err := w.refetch(ctx, shard); err != nil {
			return err
		}
		asm.MarkComplete(shard)
	}
	return nil
}

// recordedDone lists the cache shards recorded done in the run's bucket.
func (w *Writer) recordedDone(ctx context.Context) ([]int, error) {
	lister, err := w.kv.ListKeysFiltered(ctx, protocol.DoneKeys(protocol.PhaseCache))
	if errors.Is(err, jetstream.ErrNoKeysFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("cache: list completed shards: %w", err)
	}
	var out []int
	for k := range lister.Keys() {
		if _, id, ok := protocol.ParseDoneKey(k); ok {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out, nil
}

// refetch rebuilds a shard from the records the data stream still holds (its messages were
// acked when the shard was first written, so the durable consumer will not bring them back).
// It reads them with bounded direct requests (worker.ReadShard), not an ordered consumer,
// whose re-creation after a server's loss can block without end.
func (w *Writer) refetch(ctx context.Context, shard int) error {
	asm := worker.NewAssembler(w.o.Names, string(protocol.PhaseCache))
	err := worker.ReadShard(ctx, w.o.JS, w.o.Names, string(protocol.PhaseCache), shard, func(m worker.Msg) (bool, error) {
		if !strings.HasSuffix(m.Subject, ".done") {
			if _, err := shards.DecodeMessage(m.Data, w.meta); err != nil {
				return false, nil // not a record of this run: another copy may follow
			}
		}
		outcome, a, err := asm.Add(m)
		if err != nil || outcome != worker.Completed {
			return false, nil
		}
		return true, w.store(ctx, a)
	})
	switch {
	case err == nil:
		return nil
	case ctx.Err() != nil:
		// Stopped (the run ended meanwhile), not a shard the stream lost.
		return fmt.Errorf("cache: refetch shard %d: %w", shard, ctx.Err())
	case errors.Is(err, worker.ErrShardNotInStream):
		return fmt.Errorf("cache: refetch shard %d: the stream no longer holds its records (%v); recompute it by deleting %s from the run's bucket", shard, err, protocol.DoneKey(protocol.PhaseCache, shard))
	}
	return fmt.Errorf("cache: refetch shard %d: %w", shard, err)
}

// store writes an assembled shard's file, adds it to the manifest and records it done,
// then acks its messages.
func (w *Writer) store(ctx context.Context, a *worker.Assembled) error {
	if a.Shard < 0 || a.Shard >= len(w.plan.Cache) {
		w.log.Warn("records of a shard the plan does not have", "shard", a.Shard)
		for _, m := range a.Acks {
			_ = m.Term()
		}
		return nil
	}
	spec := w.plan.Cache[a.Shard]
	var rows []shards.Chunk
	for _, p := range a.Parts {
		cs, err := shards.DecodeMessage(p.Data, w.meta)
		if err != nil {
			return err
		}
		rows = append(rows, cs...)
	}
	if err := checkCoverage(spec, rows); err != nil {
		w.log.Warn("shard records do not match the plan; dropped", "shard", a.Shard, "reason", err)
		for _, m := range a.Acks {
			_ = m.Term()
		}
		w.requestRedo(ctx, w.o.Names.DoneSubject(string(protocol.PhaseCache), a.Shard), err, "")
		return nil
	}
	var marker protocol.DoneMarker
	_ = json.Unmarshal(a.Done, &marker)
	name := ShardFileName(a.Shard)
	fi, err := shards.WriteShardFile(filepath.Join(w.o.Dir, name), w.meta, rows, w.o.Compression)
	if err != nil {
		return err
	}
	entry := fi.Entry(a.Shard, string(spec.Split))
	w.mu.Lock()
	err = w.manifest.Add(entry)
	if err == nil {
		err = w.manifest.Save(filepath.Join(w.o.Dir, ManifestFile))
	}
	listed := len(w.manifest.Shards)
	if err == nil {
		w.written.shards++
		w.written.bytes += fi.Bytes
		w.written.tokens += int64(entry.Tokens)
	}
	w.mu.Unlock()
	if err != nil {
		return err
	}
	w.o.Metrics.ShardWritten(fi.Bytes, entry.Tokens, listed)
	if err := w.recordDone(ctx, entry, marker.Teacher); err != nil {
		return err
	}
	for _, m := range a.Acks {
		_ = m.Ack()
	}
	w.log.Debug("shard written", "shard", a.Shard, "rows", fi.Rows, "bytes", fi.Bytes)
	return nil
}

func (w *Writer) recordDone(ctx context.Context, e shards.ManifestEntry, source ...string) error {
	d := protocol.ShardDone{Phase: protocol.PhaseCache, Shard: e.Shard, Rows: e.Rows, Tokens: int64(e.Tokens),
		Bytes: e.Bytes, SHA256: e.SHA256, File: filepath.Join(w.o.Dir, e.File)}
	if len(source) > 0 {
		d.Source = source[0]
	}
	b, _ := json.Marshal(d)
	// The server may be restarting: retry until it answers or ctx ends.
	wait := 100 * time.Millisecond
	for {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := w.kv.Put(pctx, protocol.DoneKey(protocol.PhaseCache, e.Shard), b)
		cancel()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("cache: record shard %d: %w", e.Shard, err)
		}
		w.log.Warn("recording a shard failed; retrying", "shard", e.Shard, "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		wait = min(2*wait, 5*time.Second)
	}
}

// checkCoverage verifies that rows hold exactly the shard's windows, each whole.
func checkCoverage(spec protocol.Shard, rows []shards.Chunk) error {
	tokens := map[int]int{}
	for _, r := range rows {
		if r.Window < spec.First || r.Window >= spec.First+spec.Windows {
			return fmt.Errorf("window %d outside [%d, %d)", r.Window, spec.First, spec.First+spec.Windows)
		}
		tokens[r.Window] += r.Tokens()
	}
	if len(tokens) != spec.Windows {
		return fmt.Errorf("%d windows, want %d", len(tokens), spec.Windows)
	}
	return nil
}

// ShardFileName is the name of shard's file in the cache directory (the manifest's file).
func ShardFileName(shard int) string { return fmt.Sprintf("shard-%06d.arrow", shard) }

// requestRedo asks the coordinator to recompute the shard of a rejected message (KV
// protocol.RedoKey): the real record the rejected one may stand in for (junk published
// under its message id makes the stream drop it as a duplicate) would otherwise never come,
// and the shard would never complete. Asked at most every 5 s per shard; a shard already
// recorded done is left alone.
func (w *Writer) requestRedo(ctx context.Context, subject string, reason error, claimed string) {
	k, err := w.o.Names.ParseDataSubject(subject)
	if err != nil || k.Phase != string(protocol.PhaseCache) {
		return
	}
	if _, err := w.kv.Get(ctx, protocol.DoneKey(protocol.PhaseCache, k.Shard)); err == nil {
		return
	}
	if w.redone == nil {
		w.redone = map[int]time.Time{}
	}
	if t, ok := w.redone[k.Shard]; ok && time.Since(t) < 5*time.Second {
		return
	}
	w.redone[k.Shard] = time.Now()
	b, _ := json.Marshal(protocol.Redo{Phase: protocol.PhaseCache, Shard: k.Shard, Subject: subject,
		Reason: reason.Error(), ClaimedPublisher: claimed})
	if _, err := w.kv.Put(ctx, protocol.RedoKey(protocol.PhaseCache, k.Shard), b); err != nil {
		w.log.Warn("asking for the shard to be recomputed failed", "shard", k.Shard, "err", err)
		return
	}
	w.log.Warn("asked for the shard to be recomputed under fresh message ids", "shard", k.Shard, "claimed_publisher", claimed)
}
