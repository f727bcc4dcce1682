// Package teacher is the teacher worker: it runs the original model over the shards the
// coordinator hands out and publishes calibration statistics and activation records.
//
// Compute holds the model-side work and knows nothing of the transport; Worker (worker.go)
// pulls tasks from JetStream, runs Compute and publishes the records.
package teacher

import (
	"context"
	"fmt"

	"linearpatch/model"
	"linearpatch/patch"
	"linearpatch/shards"
)

// Compute runs the original model for a teacher. Each window is computed alone, from
// position 0, with the same shapes whatever the batching of the caller, so every teacher
// (and any thread count) produces bit-identical records for a window.
type Compute struct {
	m *model.Model
	h *patch.Hadamard // nil when the width has no Hadamard matrix (no rotate statistics)
}

// NewCompute wraps a dense model with every layer, the embeddings and the head loaded.
func NewCompute(m *model.Model) (*Compute, error) {
	if m.Patch != nil {
		return nil, fmt.Errorf("teacher: the teacher must be the original model, not a patched one")
	}
	h, err := patch.NewHadamard(m.Dim)
	if err != nil {
		h = nil
	}
	return &Compute{m: m, h: h}, nil
}

// Model returns the teacher's model.
func (c *Compute) Model() *model.Model { return c.m }

// Stats computes the calibration statistics of windows, whose indices in the calibration
// stream start at first.
func (c *Compute) Stats(ctx context.Context, windows [][]int, first, numPrune int, opts patch.StatsOptions, progress func(done int)) (*patch.Stats, error) {
	if len(windows) == 0 {
		return nil, fmt.Errorf("teacher: stats of no windows")
	}
	st := patch.NewStats(c.m.Config.Layers, c.m.Dim, numPrune, len(windows[0]))
	if err := patch.Accumulate(ctx, c.m, c.h, windows, first, opts, st, progress); err != nil {
		return nil, err
	}
	return st, nil
}

// WindowRecord is what the cache holds for one window.
type WindowRecord struct {
	InputIDs []int32
	XCut     []float32 // T×d: the hidden state entering layer start
	TopKIdx  []int32   // T×k, by descending probability
	TopKProb []float32 // T×k: softmax over the top-k logits
	XFinal   []float32 // T×d: the last layer's output (only when final)
}

// Window computes one window's record for a cut starting at layer start, with top-k
// targets of k tokens per position and, when final, the last layer's output. It checks ctx
// between layers and returns ctx's error once it ends.
func (c *Compute) Window(ctx context.Context, ids []int, start, k int, final bool) (*WindowRecord, error) {
	m := c.m
	if start < 0 || start > m.Config.Layers {
		return nil, fmt.Errorf("teacher: cut start %d outside 0..%d", start, m.Config.Layers)
	}
	if k < 1 || k > m.Vocab {
		return nil, fmt.Errorf("teacher: top-k %d outside 1..%d", k, m.Vocab)
	}
	T := len(ids)
	rec := &WindowRecord{InputIDs: make([]int32, T), TopKIdx: make([]int32, T*k), TopKProb: make([]float32, T*k)}
	for t, id := range ids {
		if id < 0 || id >= m.Vocab {
			return nil, fmt.Errorf("teacher: token id %d outside the vocabulary (%d)", id, m.Vocab)
		}
		rec.InputIDs[t] = int32(id)
	}
	x := m.Embeddings([][]int{ids})
	if err := m.RunLayersContext(ctx, x, T, 0, start, nil); err != nil {
		return nil, err
	}
	rec.XCut = append([]float32(nil), x.Data...)
	if err := m.RunLayersContext(ctx, x, T, start, m.Config.Layers, nil); err != nil {
		return nil, err
	}
	if final {
		rec.XFinal = append([]float32(nil), x.Data...)
	}
	logits := m.Logits(x)
	for t := range T {
		shards.TopK(logits.Row(t), k, rec.TopKIdx[t*k:(t+1)*k], rec.TopKProb[t*k:(t+1)*k])
	}
	return rec, nil
}
