package patch

import (
	"context"
	"fmt"
	"math"
	"sort"

	"linearpatch/model"
	"linearpatch/model/tensor"
)

// Variant is one way of bridging the cut [Start, End): P == nil is plain pruning.
type Variant struct {
	Name string
	P    *tensor.Matrix // d×d, applied as X_End ← X_Start·P; nil: no patch
}

// Score is how a variant (or the dense model) does on evaluation windows.
type Score struct {
	PPL  float64 `json:"ppl"`
	NLL  float64 `json:"nll"`  // mean next-token NLL, nats
	KL   float64 `json:"kl"`   // mean KL(dense ‖ variant) per prediction, nats
	Top1 float64 `json:"top1"` // fraction of predictions whose argmax equals the dense model's
}

// DenseName is the key of the unpruned model in Compare's result.
const DenseName = "dense"

// Compare evaluates the dense model and every variant of pruning [start, end) on the windows
// (windows protocol: every window from position 0, all seq-len−1 predictions). The layers
// before the cut run once per batch and are shared by all variants. KL and top-1 compare
// each prediction's distribution with the dense model's. progress, when non-nil, gets the
// number of windows done. A score that comes out NaN or infinite is an error wrapping
// model.ErrNotFinite that names the variant.
func Compare(ctx context.Context, m *model.Model, windows [][]int, start, end int, variants []Variant, progress func(done int)) (map[string]Score, error) {
	if err := m.CheckBlock(start, end); err != nil {
		return nil, err
	}
	if len(windows) == 0 {
		return nil, fmt.Errorf("patch: compare: no evaluation windows")
	}
	names := map[string]bool{DenseName: true}
	for _, v := range variants {
		if names[v.Name] {
			return nil, fmt.Errorf("patch: compare: duplicate variant %q", v.Name)
		}
		names[v.Name] = true
	}
	T := len(windows[0])
	acc := make(map[string]*compareSum, len(variants)+1)
	for n := range names {
		acc[n] = &compareSum{}
	}
	bs := model.BatchWindows(T, m.Vocab)
	L := m.Config.Layers
	for lo := 0; lo < len(windows); lo += bs {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		batch := windows[lo:min(lo+bs, len(windows))]
		xi := m.Embeddings(batch)
		if err := m.RunLayersContext(ctx, xi, T, 0, start, nil); err != nil {
			return nil, err
		}

		dense := xi.Clone()
		if err := m.RunLayersContext(ctx, dense, T, start, L, nil); err != nil {
			return nil, err
		}
		ref := newRefDist(m.LogitsSeq(dense, T), batch)
		acc[DenseName].add(ref, nil, batch)

		for _, v := range variants {
			x := xi.Clone()
			if v.P != nil {
				tensor.MulSeq(x, xi, v.P, T)
			}
			if err := m.RunLayersContext(ctx, x, T, end, L, nil); err != nil {
				return nil, err
			}
			acc[v.Name].add(ref, m.LogitsSeq(x, T), batch)
		}
		if progress != nil {
			progress(lo + len(batch))
		}
	}
	out := make(map[string]Score, len(acc))
	for n, a := range acc {
		sc := a.score()
		for _, v := range []float64{sc.PPL, sc.NLL, sc.KL} {
			if math.IsNaN(v) || math.IsInf(v, 0) {
				return nil, fmt.Errorf("%w: %s scores NLL %v, KL %v on the evaluation windows (its logits hold NaN or Inf)", model.ErrNotFinite, n, sc.NLL, sc.KL)
			}
		}
		out[n] = sc
	}
	return out, nil
}

// refDist holds the dense model's log-probabilities and argmax for every prediction.
type refDist struct {
	logits *tensor.Matrix
	lse    []float64
	argmax []int
}

func newRefDist(logits *tensor.Matrix, batch [][]int) *refDist {
	r := &refDist{logits: logits, lse: make([]float64, logits.Rows), argmax: make([]int, logits.Rows)}
	for i := range logits.Rows {
		row := logits.Row(i)
		r.lse[i] = float64(tensor.LogSumExp(row))
		r.argmax[i] = argmax(row)
	}
	return r
}

type compareSum struct {
	nll, kl float64
	agree   int
	n       int
}

// add accumulates the predictions of logits (nil: the dense model itself) against ref.
func (c *compareSum) add(ref *refDist, logits *tensor.Matrix, batch [][]int) {
	T := len(batch[0])
	for b, w := range batch {
		for t := 0; t+1 < T; t++ {
			i := b*T + t
			c.n++
			if logits == nil {
				c.nll += ref.lse[i] - float64(ref.logits.Row(i)[w[t+1]])
				c.agree++
				continue
			}
			row, refRow := logits.Row(i), ref.logits.Row(i)
			lse := float64(tensor.LogSumExp(row))
			c.nll += lse - float64(row[w[t+1]])
			var kl float64
			for v, rl := range refRow {
				lp := float64(rl) - ref.lse[i]
				kl += math.Exp(lp) * (lp - (float64(row[v]) - lse))
			}
			c.kl += kl
			if argmax(row) == ref.argmax[i] {
				c.agree++
			}
		}
	}
}

func (c *compareSum) score() Score {
	n := float64(max(c.n, 1))
	return Score{PPL: math.Exp(c.nll / n), NLL: c.nll / n, KL: c.kl / n, Top1: float64(c.agree) / n}
}

func argmax(row []float32) int {
	best := 0
	for i, v := range row {
		if v > row[best] {
			best = i
		}
	}
	return best
}

// SortedNames returns the keys of a score table in display order: dense, none, diag,
// rotate, lstsq, then any others alphabetically.
func SortedNames(scores map[string]Score) []string {
	rank := map[string]int{DenseName: 0, string(MethodNone): 1, string(MethodDiag): 2, string(MethodRotate): 3, string(MethodLstsq): 4}
	names := make([]string, 0, len(scores))
	for n := range scores {
		names = append(names, n)
	}
	sort.Slice(names, func(i, j int) bool {
		ri, oki := rank[names[i]]
		rj, okj := rank[names[j]]
		switch {
		case oki && okj:
			return ri < rj
		case oki != okj:
			return oki
		}
		return names[i] < names[j]
	})
	return names
}
