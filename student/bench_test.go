package student

import (
	"math/rand/v2"
	"syscall"
	"testing"
	"time"

	"linearpatch/model"
)

// benchShapes are the engine benchmark's synthetic model (layers 3..4 pruned: the student
// runs layers 5..7) and the tinystories-8L shape (the same cut).
var benchShapes = []struct {
	name string
	cfg  model.Config
	T    int
}{
	{"synthetic-d1024", model.Config{Dim: 1024, Layers: 8, FFN: 2816, Vocab: 32000, Heads: 16, KVHeads: 8}, 512},
	{"tinystories-d128", model.Config{Dim: 128, Layers: 8, Heads: 4, KVHeads: 2, FFN: 352, Vocab: 1024, HeadDim: 32}, 256},
}

const benchStart, benchEnd, benchK = 3, 5, 50

// BenchmarkKDStep times Step (forward and backward, batch 1) and reports student tokens/s
// and GFLOP/s by StepFLOPs.
func BenchmarkKDStep(b *testing.B) {
	for _, sh := range benchShapes {
		for _, loss := range []LossKind{LossTopKKL, LossFullKL, LossMSE} {
			if loss != LossTopKKL && sh.cfg.Dim > 128 && testing.Short() {
				continue
			}
			b.Run(sh.name+"/"+string(loss), func(b *testing.B) {
				benchStep(b, sh.cfg, sh.T, loss, true)
			})
		}
	}
}

// BenchmarkKDLoss times the forward-only loss (validation).
func BenchmarkKDLoss(b *testing.B) {
	for _, sh := range benchShapes {
		b.Run(sh.name, func(b *testing.B) { benchStep(b, sh.cfg, sh.T, LossTopKKL, false) })
	}
}

var benchModels = map[int]*model.Model{}

func benchStep(b *testing.B, cfg model.Config, T int, loss LossKind, train bool) {
	m := benchModels[cfg.Dim]
	if m == nil {
		var err error
		if m, err = model.Synthetic(cfg, 1); err != nil {
			b.Fatal(err)
		}
		benchModels[cfg.Dim] = m
	}
	rng := rand.New(rand.NewPCG(1, 2))
	s, err := NewSuffix(m, benchEnd, randPatch(rng, m.Dim, 0.01), SuffixOptions{SeqLen: T, Loss: loss, K: benchK})
	if err != nil {
		b.Fatal(err)
	}
	batch := randBatch(rng, m, 1, T, benchK)
	run := func() {
		var err error
		if train {
			_, _, err = s.Step(batch)
		} else {
			_, err = s.Loss(batch)
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	run() // warm-up: first-run allocations
	cpu0 := cpuTime()
	b.ResetTimer()
	for range b.N {
		run()
	}
	sec := b.Elapsed().Seconds()
	b.ReportMetric((cpuTime()-cpu0).Seconds()/float64(b.N)*1e3, "cpu-ms/step")
	b.ReportMetric(float64(T*b.N)/sec, "tokens/s")
	if train {
		b.ReportMetric(StepFLOPs(m.Config, benchEnd, T, benchK, loss)*float64(b.N)/sec/1e9, "GFLOP/s")
	}
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(sec/float64(b.N)*1e3, "ms/step")
}

// cpuTime returns the process's user and system CPU time, all threads (0 where
// unavailable): on a shared machine, a cost that other processes' load inflates less than
// wall time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
