package student

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"linearpatch/model"
	"linearpatch/model/tensor"
	"linearpatch/shards"
)

// fixture is a distillation cache of the tiny synthetic model written as real shard files
// with a manifest: train shards of perShard windows (odd shards split into two chunks per
// window), then valid shards.
type fixture struct {
	dir          string
	meta         shards.Meta
	train, valid []ShardSpec
	cfg          model.Config
	seed         uint64
	start, end   int
	T, K         int
}

type fixtureOpts struct {
	trainShards, validShards, perShard int
	final                              bool
	skipManifest                       bool // write the files but no manifest (tests add it)
}

var tinyCfg = model.Config{Dim: 16, Layers: 4, Heads: 4, KVHeads: 2, FFN: 32, Vocab: 50}

func defaultFixture() fixtureOpts { return fixtureOpts{trainShards: 6, validShards: 1, perShard: 3} }

func newFixture(t testing.TB, dir string, o fixtureOpts) *fixture {
	t.Helper()
	fx := &fixture{dir: dir, cfg: tinyCfg, seed: 5, start: 1, end: 2, T: 16, K: 8}
	fx.meta = shards.Meta{RunID: "rtest", Fingerprint: "synthetic-5", Start: fx.start, End: fx.end,
		Dim: tinyCfg.Dim, K: fx.K, Vocab: tinyCfg.Vocab, ActDType: shards.Float32, Final: o.final}
	m := fx.teacher(t)
	rng := rand.New(rand.NewPCG(99, 1))
	mf := &shards.Manifest{Meta: fx.meta}
	window := 0
	for sh := range o.trainShards + o.validShards {
		split := shards.SplitTrain
		if sh >= o.trainShards {
			split = shards.SplitValid
		}
		var rows []shards.Chunk
		for range o.perShard {
			whole := fx.window(m, rng, sh, window)
			if sh%2 == 1 {
				rows = append(rows, shards.SplitWindow(fx.meta, whole, fx.T/2+1)...)
			} else {
				rows = append(rows, whole)
			}
			window++
		}
		info, err := shards.WriteShardFile(filepath.Join(dir, fmt.Sprintf("%s-%05d.arrow", split, sh)), fx.meta, rows, shards.CompressZstd)
		if err != nil {
			t.Fatal(err)
		}
		if err := mf.Add(info.Entry(sh, split)); err != nil {
			t.Fatal(err)
		}
		spec := ShardSpec{sh, o.perShard}
		if split == shards.SplitTrain {
			fx.train = append(fx.train, spec)
		} else {
			fx.valid = append(fx.valid, spec)
		}
	}
	if !o.skipManifest {
		if err := mf.Save(filepath.Join(dir, ManifestName)); err != nil {
			t.Fatal(err)
		}
	}
	return fx
}

// teacher returns the whole synthetic model.
func (fx *fixture) teacher(t testing.TB) *model.Model {
	m, err := model.Synthetic(fx.cfg, fx.seed)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// student returns a fresh copy of the model without what the student must not use: the
// embeddings and the layers before the cut are nil (a read would panic).
func (fx *fixture) student(t testing.TB) *model.Model {
	m := fx.teacher(t)
	m.Embed = nil
	for l := range fx.end {
		m.Layers[l] = nil
	}
	return m
}

// window computes one cached window as a teacher does: X_start, top-k targets, X_L.
func (fx *fixture) window(m *model.Model, rng *rand.Rand, shard, w int) shards.Chunk {
	ids := make([]int, fx.T)
	ids32 := make([]int32, fx.T)
	for i := range ids {
		ids[i] = rng.IntN(m.Vocab)
		ids32[i] = int32(ids[i])
	}
	x := m.Embeddings([][]int{ids})
	m.RunLayers(x, fx.T, 0, fx.start, nil)
	c := shards.Chunk{Shard: shard, Window: w, Chunks: 1, InputIDs: ids32, XCut: slices.Clone(x.Data)}
	m.RunLayers(x, fx.T, fx.start, m.Config.Layers, nil)
	if fx.meta.Final {
		c.XFinal = slices.Clone(x.Data)
	}
	logits := m.Logits(x)
	c.TopKIdx, c.TopKProb = make([]int32, fx.T*fx.K), make([]float32, fx.T*fx.K)
	for t := range fx.T {
		shards.TopK(logits.Row(t), fx.K, c.TopKIdx[t*fx.K:(t+1)*fx.K], c.TopKProb[t*fx.K:(t+1)*fx.K])
	}
	return c
}

func (fx *fixture) data(t testing.TB, opts ...DataOption) *ShardData {
	t.Helper()
	d, err := NewShardData(fx.dir, fx.meta, fx.train, fx.valid, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// allWindows fetches epoch's training windows one batch of b at a time, checking that at
// most max(2, b) shards are held, and returns their global indices.
func allWindows(t *testing.T, d *ShardData, seed uint64, epoch, b int) []int {
	t.Helper()
	order := d.Order(seed, epoch)
	var ids []int
	for lo := 0; lo < len(order); lo += b {
		f, err := d.fetch(context.Background(), order[lo:min(lo+b, len(order))])
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, f.ids...)
		if len(d.cache) > max(2, b) {
			t.Fatalf("%d shards cached", len(d.cache))
		}
	}
	d.Release()
	return ids
}

// TestDataOrder checks that the training order is a function of (plan, seed, epoch): two
// instances agree, another seed or epoch differs, shards come in plan order each holding
// a permutation of its windows, and a cache whose shards appear late and out of order
// (waited for by polling the manifest) is served in the same order.
func TestDataOrder(t *testing.T) {
	fx := newFixture(t, t.TempDir(), defaultFixture())
	a, b := fx.data(t), fx.data(t)
	for epoch := range 3 {
		oa, ob := a.Order(7, epoch), b.Order(7, epoch)
		if !slices.Equal(oa, ob) {
			t.Fatalf("epoch %d: orders differ between instances", epoch)
		}
		if slices.Equal(oa, a.Order(8, epoch)) {
			t.Fatalf("epoch %d: seeds 7 and 8 give the same order", epoch)
		}
		if epoch > 0 && slices.Equal(oa, a.Order(7, epoch-1)) {
			t.Fatalf("epochs %d and %d have the same order", epoch-1, epoch)
		}
		if len(oa) != a.TrainWindows() {
			t.Fatalf("order of %d windows, want %d", len(oa), a.TrainWindows())
		}
		for i, s := range fx.train {
			blk := oa[i*3 : i*3+3]
			var idx []int
			for _, r := range blk {
				if r.Shard != s.Shard {
					t.Fatalf("epoch %d: position %d holds shard %d, want %d (plan order)", epoch, i*3, r.Shard, s.Shard)
				}
				idx = append(idx, r.Index)
			}
			slices.Sort(idx)
			if !slices.Equal(idx, []int{0, 1, 2}) {
				t.Fatalf("shard %d: indices %v are not a permutation", s.Shard, idx)
			}
		}
	}
	// The shuffle is not the identity everywhere.
	var moved bool
	o := a.Order(1, 0)
	for i, r := range o {
		if r.Index != i%3 {
			moved = true
		}
	}
	if !moved {
		t.Fatal("seed 1 epoch 0 is the identity order")
	}

	want := allWindows(t, a, 7, 1, 2)
	if got := allWindows(t, b, 7, 1, 2); !slices.Equal(got, want) {
		t.Fatalf("instances serve %v and %v", got, want)
	}

	// Late shards: the files are there but the manifest lists them one by one, in reverse.
	dir := t.TempDir()
	lfx := newFixture(t, dir, fixtureOpts{trainShards: 6, validShards: 1, perShard: 3, skipManifest: true})
	full := &shards.Manifest{Meta: lfx.meta}
	for _, s := range append(slices.Clone(lfx.train), lfx.valid...) {
		split := shards.SplitTrain
		if s.Shard >= 6 {
			split = shards.SplitValid
		}
		path := filepath.Join(dir, fmt.Sprintf("%s-%05d.arrow", split, s.Shard))
		sum, err := shards.FileSHA256(path)
		if err != nil {
			t.Fatal(err)
		}
		st, _ := os.Stat(path)
		if err := full.Add(shards.ManifestEntry{Shard: s.Shard, Split: split, File: filepath.Base(path), Windows: 3, Bytes: st.Size(), SHA256: sum}); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		mf := &shards.Manifest{Meta: lfx.meta}
		for i := len(full.Shards) - 1; i >= 0; i-- {
			time.Sleep(3 * time.Millisecond)
			mf.Add(full.Shards[i])
			if err := mf.Save(filepath.Join(dir, ManifestName)); err != nil {
				panic(err)
			}
		}
	}()
	late := lfx.data(t, WithManifestPoll(time.Millisecond))
	order := late.Order(7, 1)
	var got []int
	for lo := 0; lo < len(order); lo += 2 {
		f, err := late.fetch(ctx, order[lo:min(lo+2, len(order))])
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, f.ids...)
	}
	late.Release()
	if !slices.Equal(got, want) {
		t.Fatalf("late shards served %v, want %v", got, want)
	}
}

// TestDataErrors: a missing shard without waiting, a plan that disagrees with the
// manifest, a corrupted file (shards.ErrChecksum, never served), a cancelled wait.
func TestDataErrors(t *testing.T) {
	fx := newFixture(t, t.TempDir(), fixtureOpts{trainShards: 2, validShards: 1, perShard: 3})
	ctx := context.Background()

	d, err := NewShardData(fx.dir, fx.meta, []ShardSpec{{0, 3}, {9, 3}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.fetch(ctx, []WindowRef{{9, 0}}); !errors.Is(err, ErrShardMissing) {
		t.Fatalf("missing shard: %v, want ErrShardMissing", err)
	}
	// A plan that disagrees with the manifest is refused before anything is sized by it.
	if _, err := NewShardData(fx.dir, fx.meta, []ShardSpec{{0, 4}}, nil); !errors.Is(err, ErrData) {
		t.Fatalf("window count: %v, want ErrData", err)
	}
	if _, err := NewShardData(fx.dir, fx.meta, []ShardSpec{{0, 3}, {1, 1e12}}, nil); !errors.Is(err, ErrData) {
		t.Fatalf("window count 1e12: %v, want ErrData", err)
	}
	if _, err := NewShardData(fx.dir, fx.meta, []ShardSpec{{2, 3}}, nil); !errors.Is(err, ErrData) { // a valid shard planned as train
		t.Fatalf("split: %v, want ErrData", err)
	}
	for _, bad := range [][]ShardSpec{{{0, 0}}, {{-1, 3}}, {{0, 3}, {0, 3}}, nil} {
		if _, err := NewShardData(fx.dir, fx.meta, bad, nil); !errors.Is(err, ErrOptions) {
			t.Fatalf("plan %v: %v, want ErrOptions", bad, err)
		}
	}

	path := filepath.Join(fx.dir, "train-00001.arrow")
	b, _ := os.ReadFile(path)
	b[len(b)/2] ^= 0x40
	os.WriteFile(path, b, 0o644)
	d = fx.data(t)
	if f, err := d.fetch(ctx, []WindowRef{{0, 0}}); err != nil || len(f.ex) != 1 {
		t.Fatalf("good shard: %v", err)
	}
	f, err := d.fetch(ctx, []WindowRef{{1, 0}}) // prefetched in the background first
	if !errors.Is(err, shards.ErrChecksum) || f != nil {
		t.Fatalf("corrupted shard: %v, want shards.ErrChecksum and nothing served", err)
	}
	d.Release()

	// Waiting for a shard that never comes ends with the context.
	tctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	d, _ = NewShardData(fx.dir, fx.meta, []ShardSpec{{5, 3}}, nil, WithManifestPoll(time.Millisecond))
	if _, err := d.fetch(tctx, []WindowRef{{5, 0}}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("wait: %v, want the context's error", err)
	}
	var asked []int
	d, _ = NewShardData(fx.dir, fx.meta, fx.train, nil, WithWaitFor(func(ctx context.Context, shard int) error {
		asked = append(asked, shard)
		return nil
	}))
	if _, err := d.fetch(ctx, []WindowRef{{0, 0}}); err != nil {
		t.Fatal(err)
	}
	d.Release() // waits for the background load of shard 1, which also asks
	if !slices.Contains(asked, 0) {
		t.Fatalf("WaitFor asked for %v, want shard 0 first", asked)
	}
}

// TestStepAcrossThreads checks that a training step's loss and gradient are bit-identical
// whatever tensor.SetThreads says, on a model large enough for the row-parallel kernels,
// the attention workers and BLAS to split their work: so a run may resume with another
// thread count.
func TestStepAcrossThreads(t *testing.T) {
	if testing.Short() {
		t.Skip("medium model")
	}
	cfg := model.Config{Dim: 64, Layers: 3, Heads: 4, KVHeads: 2, FFN: 256, Vocab: 96}
	m, err := model.Synthetic(cfg, 2)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	const T, B, K = 96, 4, 8
	batch := randBatch(rng, m, B, T, K)
	p0 := randPatch(rng, m.Dim, 0.05)
	defer tensor.SetThreads(tensor.Threads())
	var loss0 float64
	var grad0 []float32
	for i, threads := range []int{1, 2, 3, 8} {
		tensor.SetThreads(threads)
		s, err := NewSuffix(m, 1, p0, SuffixOptions{SeqLen: T, K: K})
		if err != nil {
			t.Fatal(err)
		}
		loss, grad, err := s.Step(batch)
		if err != nil {
			t.Fatal(err)
		}
		vl, err := s.Loss(batch)
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			loss0, grad0 = loss, grad
			continue
		}
		if loss != loss0 || vl != loss0 || !slices.Equal(grad, grad0) {
			t.Fatalf("threads %d: loss %v (eval %v), 1 thread %v; gradients equal: %v", threads, loss, vl, loss0, slices.Equal(grad, grad0))
		}
	}
}
