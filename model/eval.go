package model

import (
	"context"
	"errors"
	"fmt"
	"math"

	"linearpatch/model/tensor"
)

// Perplexity is the result of the windows protocol: exp of the mean next-token negative
// log-likelihood over every prediction of every window.
type Perplexity struct {
	PPL     float64 `json:"ppl"`
	NLL     float64 `json:"nll"`     // mean negative log-likelihood, nats/token
	Windows int     `json:"windows"` // windows evaluated
	Tokens  int     `json:"tokens"`  // predictions averaged: windows × (seq-len − 1)
}

// ErrNotFinite is wrapped when a perplexity comes out NaN or infinite: the model's logits
// hold NaN or Inf (NaN or huge weights, or an overflow), so the score means nothing.
var ErrNotFinite = errors.New("model: perplexity is not finite")

// NLLSum accumulates next-token negative log-likelihoods in float64.
type NLLSum struct {
	Sum   float64
	Count int
}

// Add adds the predictions of logits (a batch of seqLen-token sequences stacked in rows)
// for the token ids of windows: position t predicts token t+1 of the same window.
func (s *NLLSum) Add(logits *tensor.Matrix, windows [][]int) {
	T := len(windows[0])
	for b, w := range windows {
		for t := 0; t+1 < T; t++ {
			row := logits.Row(b*T + t)
			s.Sum += float64(tensor.LogSumExp(row)) - float64(row[w[t+1]])
			s.Count++
		}
	}
}

// Result turns the sum into a Perplexity over the given number of windows.
func (s NLLSum) Result(windows int) Perplexity {
	nll := s.Sum / float64(max(s.Count, 1))
	return Perplexity{PPL: math.Exp(nll), NLL: nll, Windows: windows, Tokens: s.Count}
}

// BatchWindows is how many windows of seqLen tokens one forward should hold: enough rows
// to keep the matmuls efficient, few enough to bound the logits' memory (~64 MiB).
func BatchWindows(seqLen, vocab int) int {
	byRows := max(1, 2048/seqLen)
	byLogits := max(1, (16<<20)/(seqLen*max(vocab, 1)))
	return min(byRows, byLogits)
}

// EvalPerplexity runs m over the windows (each from position 0) in batches and returns the
// perplexity. progress, when non-nil, is called with the number of windows done so far.
// It stops early with ctx's error when ctx ends, and with an error wrapping ErrNotFinite
// as soon as a batch makes the negative log-likelihood NaN or infinite.
func (m *Model) EvalPerplexity(ctx context.Context, windows [][]int, progress func(done int)) (Perplexity, error) {
	var sum NLLSum
	if len(windows) == 0 {
		return sum.Result(0), nil
	}
	bs := BatchWindows(len(windows[0]), m.Vocab)
	for lo := 0; lo < len(windows); lo += bs {
		if err := ctx.Err(); err != nil {
			return Perplexity{}, err
		}
		batch := windows[lo:min(lo+bs, len(windows))]
		logits, err := m.ForwardContext(ctx, batch)
		if err != nil {
			return Perplexity{}, err
		}
		sum.Add(logits, batch)
		if math.IsNaN(sum.Sum) || math.IsInf(sum.Sum, 0) {
			return Perplexity{}, fmt.Errorf("%w: the negative log-likelihood became %v in windows %d..%d (the logits hold NaN or Inf: check the weights and config.json)",
				ErrNotFinite, sum.Sum, lo, lo+len(batch)-1)
		}
		if progress != nil {
			progress(lo + len(batch))
		}
	}
	res := sum.Result(len(windows))
	if math.IsInf(res.PPL, 0) {
		return Perplexity{}, fmt.Errorf("%w: mean negative log-likelihood %v nats overflows exp", ErrNotFinite, res.NLL)
	}
	return res, nil
}

// ForwardFLOPs is the floating-point operation count of one forward over batch sequences
// of seqLen tokens, logits included: 2 per multiply-add of every projection, and the causal
// half of the attention score and value products (with a sliding window W < seqLen, the
// T·W − W²/2 query-key pairs it keeps).
func ForwardFLOPs(c Config, batch, seqLen int) float64 {
	n := float64(batch * seqLen)
	q, kv := float64(c.Heads*c.HeadDim), float64(c.KVHeads*c.HeadDim)
	d, f := float64(c.Dim), float64(c.FFN)
	T := float64(seqLen)
	pairs := T * T / 2
	if w := float64(c.SlidingWindow); c.SlidingWindow > 0 && w < T {
		pairs = T*w - w*w/2
	}
	perLayer := 2*n*(d*q+2*d*kv+q*d+3*d*f) + 4*float64(batch)*pairs*q
	return float64(c.Layers)*perLayer + 2*n*d*float64(c.Vocab)
}
