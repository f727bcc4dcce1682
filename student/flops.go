package student

import "linearpatch/model"

// StepFLOPs returns the floating-point operations (2 per multiply-add) of the matrix
// products in one training step (forward and backward) over one window of T tokens for
// a suffix cut at layer end of a model with configuration cfg; a step over B windows costs
// B times as much. It counts what Step computes: X·P and dL/dP = Xᵀ·dY; in each layer the
// projections forward and their input gradients (weights are frozen: no weight gradients),
// causal attention over the T(T+1)/2 (query, key) pairs — scores and values forward; scores
// again (recomputed), dV, dP, dQ and dK backward —; and the head: k rows per token for
// topk-kl, the whole vocabulary for full-kl (plus the teacher's logits, recomputed from X_L),
// none for mse. Elementwise work (norms, RoPE,
// softmax, SwiGLU) is left out.
func StepFLOPs(cfg model.Config, end, T, K int, loss LossKind) float64 {
	t, d := float64(T), float64(cfg.Dim)
	q := float64(cfg.Heads * cfg.HeadDim)
	kv := float64(cfg.KVHeads * cfg.HeadDim)
	f := float64(cfg.FFN)
	pairs := t * (t + 1) / 2
	proj := 2 * t * (d*(q+2*kv) + q*d + 3*d*f) // q/k/v, o, gate/up, down
	attn := 2 * pairs * float64(cfg.HeadDim) * float64(cfg.Heads)
	layer := 2*proj + 7*attn // forward 2 products, backward 5
	layers := float64(max(cfg.Layers-end, 0))
	total := 2*2*t*d*d + layers*layer
	switch loss {
	case LossTopKKL, "":
		total += 2 * 2 * t * float64(K) * d
	case LossFullKL:
		total += 3 * 2 * t * float64(cfg.Vocab) * d
	}
	return total
}
