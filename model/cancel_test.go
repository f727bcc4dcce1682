package model

import (
	"context"
	"errors"
	"testing"

	"linearpatch/model/tensor"
)

// TestRunLayersContextMatchesRunLayers: the cancellable forward gives the same bits as
// RunLayers, with a patch inside the range and at its end, and calls after for every
// layer; a cancelled context stops it before the next layer.
func TestRunLayersContextMatchesRunLayers(t *testing.T) {
	m, err := Synthetic(Config{Dim: 16, FFN: 32, Layers: 5, Heads: 4, KVHeads: 2, Vocab: 40}, 9)
	if err != nil {
		t.Fatal(err)
	}
	P := tensor.New(16, 16)
	for i := range P.Data {
		P.Data[i] = float32(i%7) * 0.05
	}
	ids := [][]int{{1, 5, 9, 3, 7, 2}, {4, 4, 8, 0, 39, 6}}
	for _, v := range []struct {
		name string
		m    *Model
	}{{"dense", m}, {"patch inside", m.Pruned(1, 2, P)}, {"patch at the end", m.Pruned(3, 5, P)}} {
		for _, r := range [][2]int{{0, v.m.Config.Layers}, {1, v.m.Config.Layers}, {0, 1}, {2, 2}} {
			want := v.m.Embeddings(ids)
			got := want.Clone()
			var wantL, gotL []int
			v.m.RunLayers(want, 6, r[0], r[1], func(l int, _ *tensor.Matrix) { wantL = append(wantL, l) })
			if err := v.m.RunLayersContext(context.Background(), got, 6, r[0], r[1], func(l int, _ *tensor.Matrix) { gotL = append(gotL, l) }); err != nil {
				t.Fatal(err)
			}
			for i := range want.Data {
				if got.Data[i] != want.Data[i] {
					t.Fatalf("%s, layers %v: element %d is %v, RunLayers %v", v.name, r, i, got.Data[i], want.Data[i])
				}
			}
			if len(gotL) != len(wantL) {
				t.Fatalf("%s, layers %v: after called for %v, RunLayers %v", v.name, r, gotL, wantL)
			}
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	x := m.Embeddings(ids)
	var ran []int
	err = m.RunLayersContext(ctx, x, 6, 0, 5, func(l int, _ *tensor.Matrix) {
		ran = append(ran, l)
		if l == 1 {
			cancel()
		}
	})
	if !errors.Is(err, context.Canceled) || len(ran) != 2 {
		t.Fatalf("cancelled after layer 1: err %v, layers run %v; want context.Canceled after [0 1]", err, ran)
	}
	if _, err := m.ForwardContext(ctx, ids); !errors.Is(err, context.Canceled) {
		t.Fatalf("ForwardContext with a cancelled context: %v", err)
	}
}
