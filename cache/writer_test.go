package cache

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/apache/arrow/go/v17/arrow"
	"github.com/apache/arrow/go/v17/arrow/array"
	"github.com/apache/arrow/go/v17/arrow/ipc"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"linearpatch/protocol"
	"linearpatch/shards"
	"linearpatch/worker"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

const (
	testDim, testVocab, testK, testT = 8, 40, 4, 6
)

// harness is a real embedded NATS server with a run's streams, plan and fit in place.
type harness struct {
	t     *testing.T
	js    jetstream.JetStream
	names worker.Names
	plan  *protocol.Plan
	meta  shards.Meta
	dir   string
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	ctx := context.Background()
	srv, err := worker.StartEmbedded(ctx, t.TempDir(), worker.WithAllowAnonymous())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Shutdown)
	nc, err := worker.Connect(ctx, worker.ConnOptions{URL: srv.URL()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	plan, err := protocol.NewPlan("rwritertest", protocol.Settings{Model: "m", Fingerprint: "fp-good", Calib: "c", CalibSHA256: "c1", CalibWindows: 4,
		Train: "t", TrainSHA256: "t1", SeqLen: testT, NumPrune: 1, Method: "rotate", ShardWindows: 2, TopK: testK, ActDType: "float16", ValidFrac: 0.05}, 4, 4)
	if err != nil {
		t.Fatal(err)
	}
	names, err := worker.NewNames(plan.RunID)
	if err != nil {
		t.Fatal(err)
	}
	if err := worker.Setup(ctx, js, names, worker.StreamConfig{AckWait: 2 * time.Second}); err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(ctx, names.KVBucket())
	if err != nil {
		t.Fatal(err)
	}
	pb, _ := json.Marshal(plan)
	fb, _ := json.Marshal(protocol.FitResult{Start: 1, End: 2, Method: "rotate"})
	if _, err := kv.Put(ctx, protocol.KeyPlan, pb); err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, protocol.KeyFit, fb); err != nil {
		t.Fatal(err)
	}
	meta := shards.Meta{SchemaVersion: shards.SchemaVersion, RunID: plan.RunID, Fingerprint: "fp-good", Start: 1, End: 2,
		Dim: testDim, K: testK, Vocab: testVocab, ActDType: shards.Float16}
	return &harness{t: t, js: js, names: names, plan: plan, meta: meta, dir: filepath.Join(t.TempDir(), "cache")}
}

func (h *harness) window(rng *rand.Rand, shard, window int) shards.Chunk {
	c := shards.Chunk{Shard: shard, Window: window, Chunks: 1, InputIDs: make([]int32, testT),
		XCut: make([]float32, testT*testDim), TopKIdx: make([]int32, testT*testK), TopKProb: make([]float32, testT*testK)}
	logits := make([]float32, testVocab)
	for t := range testT {
		c.InputIDs[t] = int32(rng.IntN(testVocab))
		for i := range logits {
			logits[i] = float32(rng.NormFloat64())
		}
		shards.TopK(logits, testK, c.TopKIdx[t*testK:(t+1)*testK], c.TopKProb[t*testK:(t+1)*testK])
	}
	for i := range c.XCut {
		c.XCut[i] = float32(rng.NormFloat64())
	}
	return c
}

func (h *harness) publish(subject, id string, data []byte) {
	h.t.Helper()
	pub, err := worker.NewPublisher(h.js)
	if err != nil {
		h.t.Fatal(err)
	}
	ctx := context.Background()
	if err := pub.Publish(ctx, subject, id, data, nil); err != nil {
		h.t.Fatal(err)
	}
	if err := pub.Flush(ctx); err != nil {
		h.t.Fatal(err)
	}
}

func (h *harness) publishChunk(meta shards.Meta, c shards.Chunk, id string) {
	h.t.Helper()
	b, err := shards.EncodeMessage(meta, []shards.Chunk{c})
	if err != nil {
		h.t.Fatal(err)
	}
	key := worker.DataKey{Run: h.names.Run(), Phase: "cache", Shard: c.Shard, Window: c.Window, Chunk: c.Chunk}
	if id == "" {
		id = worker.MsgID(key)
	}
	h.publish(key.Subject(), id, b)
}

func (h *harness) publishDone(shard, messages int) {
	key := worker.DataKey{Run: h.names.Run(), Phase: "cache", Shard: shard, Done: true}
	b, _ := json.Marshal(protocol.DoneMarker{Phase: protocol.PhaseCache, Shard: shard, Messages: messages, Teacher: "test"})
	h.publish(key.Subject(), worker.MsgID(key), b)
}

// startWriter runs a cache writer until the test ends, logging into the returned buffer.
func (h *harness) startWriter() *lockedBuffer {
	h.t.Helper()
	logs := &lockedBuffer{}
	w, err := NewWriter(Options{JS: h.js, Names: h.names, Dir: h.dir, Dim: testDim, Vocab: testVocab, LeaseRenewal: time.Second,
		Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		h.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = w.Run(ctx); close(done) }()
	h.t.Cleanup(func() { cancel(); <-done })
	return logs
}

func (h *harness) waitShard(shard int) shards.ManifestEntry {
	h.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if m, err := shards.LoadManifest(filepath.Join(h.dir, ManifestFile)); err == nil {
			if e, ok := m.Entry(shard); ok {
				return e
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	h.t.Fatalf("shard %d never reached the manifest", shard)
	return shards.ManifestEntry{}
}

// writeOneShard runs a writer until it has written shard 0 (two windows) and recorded it
// done, then stops it.
func (h *harness) writeOneShard(rng *rand.Rand) shards.ManifestEntry {
	h.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w, err := NewWriter(Options{JS: h.js, Names: h.names, Dir: h.dir, Dim: testDim, Vocab: testVocab})
	if err != nil {
		h.t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = w.Run(ctx); close(done) }()
	h.publishChunk(h.meta, h.window(rng, 0, 0), "")
	h.publishChunk(h.meta, h.window(rng, 0, 1), "")
	h.publishDone(0, 2)
	e := h.waitShard(0)
	// the manifest is saved before the shard is recorded done: wait for the record too
	kv, err := h.js.KeyValue(ctx, h.names.KVBucket())
	if err != nil {
		h.t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := kv.Get(ctx, protocol.DoneKey(protocol.PhaseCache, 0)); err == nil {
			break
		}
		if time.Now().After(deadline) {
			h.t.Fatal("shard 0 was never recorded done")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-done
	return e
}

// withVersion re-encodes a message with another schema version in its metadata.
func withVersion(t *testing.T, msg []byte, version string) []byte {
	t.Helper()
	rd, err := ipc.NewReader(bytes.NewReader(msg))
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Release()
	old := rd.Schema().Metadata()
	keys, vals := append([]string(nil), old.Keys()...), append([]string(nil), old.Values()...)
	found := false
	for i, k := range keys {
		if strings.HasSuffix(k, "schema_version") {
			vals[i], found = version, true
		}
	}
	if !found {
		t.Fatal("no schema version in the metadata")
	}
	md := arrow.NewMetadata(keys, vals)
	schema := arrow.NewSchema(rd.Schema().Fields(), &md)
	var out bytes.Buffer
	w := ipc.NewWriter(&out, ipc.WithSchema(schema))
	for rd.Next() {
		rec := rd.Record()
		if err := w.Write(array.NewRecord(schema, rec.Columns(), rec.NumRows())); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// TestWriterRejectsForeignRecords: records of another model, another schema version or
// corrupt bytes are rejected with a logged reason and never enter the cache; the shard
// is assembled from the good records alone.
func TestWriterRejectsForeignRecords(t *testing.T) {
	h := newHarness(t)
	rng := rand.New(rand.NewPCG(1, 2))
	logs := h.startWriter()
	good0, good1 := h.window(rng, 0, 0), h.window(rng, 0, 1)

	foreign := h.meta
	foreign.Fingerprint = "fp-other-model"
	impostor := h.window(rng, 0, 0)
	h.publishChunk(foreign, impostor, "foreign-0")

	b, err := shards.EncodeMessage(h.meta, []shards.Chunk{h.window(rng, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	key1 := worker.DataKey{Run: h.names.Run(), Phase: "cache", Shard: 0, Window: 1}
	h.publish(key1.Subject(), "version-2", withVersion(t, b, "2"))
	corrupt := append([]byte(nil), b...)
	corrupt[len(corrupt)/2] ^= 0xff
	h.publish(key1.Subject(), "corrupt", corrupt)
	h.publish(key1.Subject(), "garbage", []byte("definitely not arrow"))

	h.publishChunk(h.meta, good0, "")
	h.publishChunk(h.meta, good1, "")
	h.publishChunk(h.meta, good1, "late-duplicate") // a redelivery outside the stream's window
	h.publishDone(0, 2)

	e := h.waitShard(0)
	rows, err := shards.ReadShardFile(e.Path(h.dir), h.meta, e.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 2 || rows[0].Window != 0 || rows[1].Window != 1 {
		t.Fatalf("shard rows %+v", rows)
	}
	for i, want := range []shards.Chunk{good0, good1} {
		for j := range want.InputIDs {
			if rows[i].InputIDs[j] != want.InputIDs[j] {
				t.Fatalf("row %d holds another record's ids", i)
			}
		}
	}
	log := logs.String()
	for _, reason := range []string{"foreign", "version", "corrupt"} {
		if !strings.Contains(log, "rejected") || !strings.Contains(strings.ToLower(log), reason) {
			t.Errorf("no logged rejection mentioning %q in:\n%s", reason, log)
		}
	}
}

// TestWriterRebuildsCorruptFile: a shard file that fails its checksum is dropped at start
// and rebuilt from the stream's records, identical to the original.
func TestWriterRebuildsCorruptFile(t *testing.T) {
	h := newHarness(t)
	rng := rand.New(rand.NewPCG(3, 4))
	e := h.writeOneShard(rng)

	path := e.Path(h.dir)
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	raw[len(raw)/3] ^= 0x55
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := shards.ReadShardFile(path, h.meta, e.SHA256); err == nil {
		t.Fatal("the corrupted file passed its checksum")
	}
	logs := h.startWriter()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if sum, err := shards.FileSHA256(path); err == nil && sum == e.SHA256 {
			if !strings.Contains(logs.String(), "fails verification") {
				t.Errorf("the rebuild was not logged:\n%s", logs.String())
			}
			if l := logs.String(); strings.Contains(l, "err=<nil>") || !strings.Contains(l, "checksum mismatch") {
				t.Errorf("the failed checksum was logged without its reason:\n%s", l)
			}
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("the corrupt shard file was not rebuilt; log:\n%s", logs.String())
}

func (l *lockedBuffer) Reset() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.b.Reset()
}

// TestWriterRebuildsShardsMissingHere: a writer that takes a run over in another directory
// rebuilds, from the stream, the shards the run recorded done elsewhere.
func TestWriterRebuildsShardsMissingHere(t *testing.T) {
	h := newHarness(t)
	rng := rand.New(rand.NewPCG(5, 6))
	first := h.writeOneShard(rng)

	h.dir = filepath.Join(t.TempDir(), "elsewhere")
	logs := h.startWriter()
	again := h.waitShard(0)
	if again.SHA256 != first.SHA256 || again.Rows != first.Rows {
		t.Fatalf("rebuilt shard %+v differs from %+v", again, first)
	}
	if !strings.Contains(logs.String(), "not in this cache directory") {
		t.Errorf("the rebuild was not logged:\n%s", logs.String())
	}
}

// TestWriterAsksForRedo: junk under a shard's subject (as if published under a real record's
// message id, which the stream then refuses to the real record) is rejected at WARN with the
// publisher it claims, and the writer asks for the shard to be recomputed (KV redo key).
func TestWriterAsksForRedo(t *testing.T) {
	h := newHarness(t)
	logs := h.startWriter()
	m := nats.NewMsg(h.names.DataSubject("cache", 1, 2, 0))
	m.Data = []byte("twenty bytes of junk")
	m.Header.Set(jetstream.MsgIDHeader, worker.MsgID(worker.DataKey{Run: h.names.Run(), Phase: "cache", Shard: 1, Window: 2}))
	m.Header.Set(worker.PublisherHeader, "evil")
	if _, err := h.js.PublishMsg(context.Background(), m); err != nil {
		t.Fatal(err)
	}
	kv, err := h.js.KeyValue(context.Background(), h.names.KVBucket())
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if e, err := kv.Get(context.Background(), protocol.RedoKey(protocol.PhaseCache, 1)); err == nil {
			var r protocol.Redo
			if err := json.Unmarshal(e.Value(), &r); err != nil || r.Shard != 1 || r.ClaimedPublisher != "evil" || r.Reason == "" {
				t.Fatalf("redo request %s (%v)", e.Value(), err)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no redo request; writer log:\n%s", logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(logs.String(), `level=WARN msg="rejected record"`) || !strings.Contains(logs.String(), "claimed_publisher=evil") {
		t.Errorf("the rejection is not logged at WARN with its claimed publisher:\n%s", logs.String())
	}
}

// TestWriterRefusesOldPlan: a run planned by an older version is refused, naming it.
func TestWriterRefusesOldPlan(t *testing.T) {
	h := newHarness(t)
	old := *h.plan
	old.Version = 0
	b, _ := json.Marshal(old)
	kv, err := h.js.KeyValue(context.Background(), h.names.KVBucket())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(context.Background(), protocol.KeyPlan, b); err != nil {
		t.Fatal(err)
	}
	w, err := NewWriter(Options{JS: h.js, Names: h.names, Dir: h.dir, Dim: testDim, Vocab: testVocab})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := w.Run(ctx); !errors.Is(err, protocol.ErrVersion) || !strings.Contains(err.Error(), "version 1") {
		t.Fatalf("writer on a version-1 run: %v", err)
	}
}
