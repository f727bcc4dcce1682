package shards

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"
)

// testMeta returns a valid Meta of the given shape.
func testMeta(dt DType, dim, k, vocab int, final bool) Meta {
	return Meta{RunID: "run-1", Fingerprint: "fp-abc", Start: 3, End: 5, Dim: dim, K: k, Vocab: vocab, ActDType: dt, Final: final}
}

// randWindow returns one window (Chunk 0 of 1) of T tokens with activations drawn like a
// transformer's hidden state (a few large channels) and top-k targets from TopK of
// heavy-tailed logits.
func randWindow(r *rand.Rand, m Meta, shard, window, T int) Chunk {
	c := Chunk{Shard: shard, Window: window, Chunks: 1, InputIDs: make([]int32, T), XCut: make([]float32, T*m.Dim)}
	for t := range c.InputIDs {
		c.InputIDs[t] = int32(r.IntN(m.Vocab))
	}
	fillActs(r, c.XCut, m.Dim)
	if m.Final {
		c.XFinal = make([]float32, T*m.Dim)
		fillActs(r, c.XFinal, m.Dim)
	}
	if m.K > 0 {
		c.TopKIdx = make([]int32, T*m.K)
		c.TopKProb = make([]float32, T*m.K)
		logits := make([]float32, m.Vocab)
		for t := range T {
			lmLogits(r, logits)
			TopK(logits, m.K, c.TopKIdx[t*m.K:(t+1)*m.K], c.TopKProb[t*m.K:(t+1)*m.K])
		}
	}
	return c
}

func fillActs(r *rand.Rand, x []float32, dim int) {
	for i := range x {
		v := r.NormFloat64()
		if i%dim == 7 { // an outlier channel
			v *= 300
		}
		x[i] = float32(v)
	}
}

// lmLogits fills logits like a trained LM's: 3·N(0,1) plus a few sparse large spikes.
func lmLogits(r *rand.Rand, logits []float32) {
	for v := range logits {
		logits[v] = float32(3 * r.NormFloat64())
	}
	for range 3 {
		if r.Float64() < 0.5 {
			logits[r.IntN(len(logits))] += float32(5 + 15*r.Float64())
		}
	}
}

// rounded returns x as stored under dt.
func rounded(t *testing.T, dt DType, x []float32) []float32 {
	t.Helper()
	if x == nil {
		return nil
	}
	out := make([]float32, len(x))
	h := make([]uint16, len(x))
	switch dt {
	case Float16:
		if err := ToFloat16(h, x); err != nil {
			t.Fatal(err)
		}
		FromFloat16(out, h)
	case BFloat16:
		if err := ToBFloat16(h, x); err != nil {
			t.Fatal(err)
		}
		FromBFloat16(out, h)
	default:
		copy(out, x)
	}
	return out
}

// topKKL returns KL(p‖q) in nats between one token's exact targets (idx, p) and decoded
// ones (qIdx, q), which must hold the same ids.
func topKKL(t *testing.T, idx []int32, p []float32, qIdx []int32, q []float32) float64 {
	t.Helper()
	qs := map[int32]float64{}
	for j, id := range qIdx {
		qs[id] = float64(q[j])
	}
	var sum, kl float64
	for _, v := range p {
		sum += float64(v)
	}
	for j, id := range idx {
		pj := float64(p[j]) / sum
		qj, ok := qs[id]
		if !ok {
			t.Fatalf("decoded top-k lacks id %d", id)
		}
		if pj > 0 {
			kl += pj * math.Log(pj/qj)
		}
	}
	return kl
}

// equalRows compares decoded rows with the originals: positions and ids exactly,
// activations as rounded by dt, top-k as the same id sets sorted by descending
// probability, summing to 1, within KL maxKL per token.
func equalRows(t *testing.T, m Meta, got, want []Chunk, maxKL float64) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d rows, want %d", len(got), len(want))
	}
	for i := range want {
		g, w := &got[i], &want[i]
		if g.Key() != w.Key() || g.Chunks != w.Chunks || g.TokenLo != w.TokenLo {
			t.Fatalf("row %d at (%d, %d, %d of %d, %d), want (%d, %d, %d of %d, %d)", i, g.Shard, g.Window, g.Chunk, g.Chunks, g.TokenLo, w.Shard, w.Window, w.Chunk, w.Chunks, w.TokenLo)
		}
		if !slices.Equal(g.InputIDs, w.InputIDs) {
			t.Fatalf("row %d: input ids differ", i)
		}
		if !slices.Equal(g.XCut, rounded(t, m.ActDType, w.XCut)) {
			t.Fatalf("row %d: x_cut differs", i)
		}
		if !slices.Equal(g.XFinal, rounded(t, m.ActDType, w.XFinal)) {
			t.Fatalf("row %d: x_final differs", i)
		}
		if len(g.TopKIdx) != len(w.TopKIdx) || len(g.TopKProb) != len(w.TopKProb) {
			t.Fatalf("row %d: %d/%d top-k entries, want %d", i, len(g.TopKIdx), len(g.TopKProb), len(w.TopKIdx))
		}
		K := m.K
		for tk := 0; K > 0 && tk < w.Tokens(); tk++ {
			gi, gp := g.TopKIdx[tk*K:(tk+1)*K], g.TopKProb[tk*K:(tk+1)*K]
			var sum float64
			for j := range gp {
				sum += float64(gp[j])
				if j > 0 && (gp[j] > gp[j-1] || (gp[j] == gp[j-1] && gi[j] < gi[j-1])) {
					t.Fatalf("row %d token %d: top-k not sorted by descending probability: %v %v", i, tk, gi, gp)
				}
			}
			if math.Abs(sum-1) > 1e-5 {
				t.Fatalf("row %d token %d: probabilities sum to %v", i, tk, sum)
			}
			if kl := topKKL(t, w.TopKIdx[tk*K:(tk+1)*K], w.TopKProb[tk*K:(tk+1)*K], gi, gp); kl > maxKL {
				t.Fatalf("row %d token %d: KL %v > %v", i, tk, kl, maxKL)
			}
		}
	}
}
