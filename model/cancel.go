package model

import (
	"context"

	"linearpatch/model/tensor"
)

// RunLayersContext is RunLayers that checks ctx before every layer: once ctx ends it
// returns ctx's error, leaving x with the state after the last layer run. The result is
// bit-identical to RunLayers (the same operations in the same order; only the scratch
// space is allocated per layer). It panics where RunLayers does.
func (m *Model) RunLayersContext(ctx context.Context, x *tensor.Matrix, seqLen, from, to int, after func(l int, x *tensor.Matrix)) error {
	if from < 0 || to > len(m.Layers) || from > to {
		m.RunLayers(x, seqLen, from, to, after) // panics with RunLayers' message
	}
	for l := from; l < to; l++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		m.RunLayers(x, seqLen, l, l+1, after)
	}
	return nil
}

// ForwardContext is Forward that checks ctx between layers (see RunLayersContext).
func (m *Model) ForwardContext(ctx context.Context, ids [][]int) (*tensor.Matrix, error) {
	x := m.Embeddings(ids)
	if err := m.RunLayersContext(ctx, x, len(ids[0]), 0, len(m.Layers), nil); err != nil {
		return nil, err
	}
	return m.LogitsSeq(x, len(ids[0])), nil
}
