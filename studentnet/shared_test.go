package studentnet

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"linearpatch/model"
	"linearpatch/shards"
	"linearpatch/student"
)

// tinyRun is a synthetic model and a cache of random activations for trainers.
type tinyRun struct {
	dir   string
	cfg   model.Config
	meta  shards.Meta
	train []student.ShardSpec
	valid []student.ShardSpec
}

const tinyT, tinyK, tinyEnd = 16, 8, 2

func newTinyRun(t *testing.T) *tinyRun {
	t.Helper()
	m, err := model.Synthetic(model.Config{Arch: "llama", Dim: 32, Layers: 4, FFN: 64, Vocab: 64, Heads: 4, KVHeads: 2, MaxSeq: tinyT}, 3)
	if err != nil {
		t.Fatal(err)
	}
	r := &tinyRun{dir: t.TempDir(), cfg: m.Config}
	r.meta = shards.Meta{RunID: "rshare", Fingerprint: "synthetic-3", Start: 1, End: tinyEnd, Dim: m.Dim, K: tinyK, Vocab: m.Vocab,
		ActDType: shards.Float32}
	rng := rand.New(rand.NewPCG(5, 5))
	mf := &shards.Manifest{Meta: r.meta}
	w := 0
	for sh := range 5 {
		split := shards.SplitTrain
		if sh == 4 {
			split = shards.SplitValid
		}
		var rows []shards.Chunk
		for range 3 {
			c := shards.Chunk{Shard: sh, Window: w, Chunks: 1, InputIDs: make([]int32, tinyT), XCut: make([]float32, tinyT*m.Dim),
				TopKIdx: make([]int32, tinyT*tinyK), TopKProb: make([]float32, tinyT*tinyK)}
			for i := range c.XCut {
				c.XCut[i] = float32(rng.NormFloat64())
			}
			logits := make([]float32, m.Vocab)
			for tok := range tinyT {
				for i := range logits {
					logits[i] = float32(2 * rng.NormFloat64())
				}
				shards.TopK(logits, tinyK, c.TopKIdx[tok*tinyK:(tok+1)*tinyK], c.TopKProb[tok*tinyK:(tok+1)*tinyK])
			}
			rows = append(rows, c)
			w++
		}
		fi, err := shards.WriteShardFile(filepath.Join(r.dir, fmt.Sprintf("%s-%05d.arrow", split, sh)), r.meta, rows, shards.CompressZstd)
		if err != nil {
			t.Fatal(err)
		}
		if err := mf.Add(fi.Entry(sh, split)); err != nil {
			t.Fatal(err)
		}
		spec := student.ShardSpec{Shard: sh, Windows: 3}
		if split == shards.SplitTrain {
			r.train = append(r.train, spec)
		} else {
			r.valid = append(r.valid, spec)
		}
	}
	if err := mf.Save(filepath.Join(r.dir, student.ManifestName)); err != nil {
		t.Fatal(err)
	}
	return r
}

// trainer returns a fresh trainer (its own model copy, suffix and data).
func (r *tinyRun) trainer(t *testing.T, cfg student.TrainConfig, opts ...student.TrainerOption) *student.Trainer {
	t.Helper()
	m, err := model.Synthetic(r.cfg, 3)
	if err != nil {
		t.Fatal(err)
	}
	s, err := student.NewSuffix(m, tinyEnd, nil, student.SuffixOptions{SeqLen: tinyT, Loss: student.LossTopKKL, K: tinyK})
	if err != nil {
		t.Fatal(err)
	}
	data, err := student.NewShardData(r.dir, r.meta, r.train, r.valid)
	if err != nil {
		t.Fatal(err)
	}
	tr, err := student.NewTrainer(s, data, cfg, nil, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return tr
}

// dyingExchange makes its student die (ctx cancelled, Publish failing) at its die-th
// Publish: the window stays claimed, unrenewed, until another student's lease runs out.
type dyingExchange struct {
	*Exchange
	die    int32
	n      atomic.Int32
	cancel context.CancelFunc
}

var errDied = errors.New("died mid-window")

func (d *dyingExchange) Publish(ctx context.Context, step, pos int, holder string, g student.WindowGrad) error {
	if d.n.Add(1) == d.die {
		d.cancel()
		return errDied
	}
	return d.Exchange.Publish(ctx, step, pos, holder, g)
}

// TestSharedOverNATS: students sharing the steps through the NATS exchange (student role,
// embedded server) end with Trainer.Run's P bit for bit; one of them dies in the middle of
// a window, holding its claim, and the others take the window over once its lease has
// passed on their own clocks; a student started in its place joins from the shared
// checkpoint. Without a death every window is computed once.
func TestSharedOverNATS(t *testing.T) {
	r := newTinyRun(t)
	cfg := student.TrainConfig{LR: 2e-2, Epochs: 2, Batch: 3, K: tinyK, Seed: 4, CheckpointEvery: 3, ValidEvery: 3}
	want, err := r.trainer(t, cfg).Run(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	same := func(what string, got *student.Result) {
		t.Helper()
		if !slices.EqualFunc(got.P, want.P, func(a, b float32) bool { return math.Float32bits(a) == math.Float32bits(b) }) {
			t.Fatalf("%s: P differs from Trainer.Run's", what)
		}
		if len(got.ValidLoss) != len(want.ValidLoss) || got.Steps != want.Steps {
			t.Fatalf("%s: %d steps, %d validation passes; want %d, %d", what, got.Steps, len(got.ValidLoss), want.Steps, len(want.ValidLoss))
		}
		for i := range want.ValidLoss {
			if math.Float64bits(got.ValidLoss[i].Loss) != math.Float64bits(want.ValidLoss[i].Loss) {
				t.Fatalf("%s: validation curve differs", what)
			}
		}
	}
	for _, die := range []int32{0, 4} {
		t.Run(fmt.Sprintf("die=%d", die), func(t *testing.T) {
			open := studentExchanges(t, cfg.Batch)
			x := open()
			const lease = 300 * time.Millisecond
			var wg sync.WaitGroup
			var computed atomic.Int32
			results := make([]*student.Result, 3)
			errs := make([]error, 3)
			run := func(i int, ex student.StepExchange, ctx context.Context) {
				defer wg.Done()
				results[i], errs[i] = r.trainer(t, cfg).RunShared(ctx, ex, student.SharedOptions{Holder: fmt.Sprint("s", i), Lease: lease,
					Poll: 5 * time.Millisecond, OnWindow: func(int, int, time.Duration) { computed.Add(1) }})
			}
			ctx, stop := context.WithTimeout(t.Context(), time.Minute) // a window never taken over fails here
			defer stop()
			dctx, cancel := context.WithCancel(ctx)
			defer cancel()
			wg.Add(2)
			x1, x2 := open(), open()
			go run(0, x, ctx)
			go run(1, &dyingExchange{Exchange: x1, die: die, cancel: cancel}, dctx)
			if die > 0 {
				// A replacement joins once the dead one is gone.
				wg.Add(1)
				go func() {
					<-dctx.Done()
					run(2, x2, ctx)
				}()
			}
			wg.Wait()
			for i, res := range results {
				switch {
				case i == 1 && die > 0:
					if !errors.Is(errs[i], errDied) {
						t.Fatalf("the dying student: %v", errs[i])
					}
				case i == 2 && die == 0:
				case errs[i] != nil:
					t.Fatalf("student %d: %v", i, errs[i])
				default:
					same(fmt.Sprint("student ", i), res)
				}
			}
			if windows := int32(cfg.Epochs * 12); die == 0 && computed.Load() != windows {
				t.Fatalf("%d windows computed, the run has %d", computed.Load(), windows)
			}
			var up, down int64
			for _, e := range []*Exchange{x, x1, x2} {
				u, d := e.Bytes()
				up, down = up+u, down+d
			}
			t.Logf("die=%d: %d windows computed, %d bytes stored, %d fetched", die, computed.Load(), up, down)
		})
	}
}
