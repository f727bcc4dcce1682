// Package student distills the linear patch P offline (the paper's §3): from cached
// activations X_i entering the cut, the student runs X_i·P through the frozen layers
// j..L−1, the final norm and the head, and AdamW trains P alone against the teacher's
// cached top-k probabilities (or full logits, or final hidden state).
//
// The differentiable part is a gorgonia graph of one window, built once and re-run with new
// inputs for every window: a step of B windows runs it B times and sums the windows'
// gradients in window order (StepGradient), so a window's gradient never depends on the
// other windows of its step, nor on which process computed it. Gorgonia lacks fast causal attention, RMSNorm, RoPE and a sparse
// head, so those (and the frozen projections and SwiGLU) are custom ops with their own
// backward ops, checked against finite differences in the tests; X·P is gorgonia's own
// matmul, whose gradient gives dL/dP. In cgo builds gorgonia's BLAS is OpenBLAS (through
// gonum's netlib bindings); the pure-Go build uses gonum's.
package student

import (
	"errors"
	"fmt"
	"math"

	gtensor "gorgonia.org/tensor"

	"linearpatch/model"
	"linearpatch/model/tensor"
)

// Errors returned by the package; each is wrapped with details.
var (
	// ErrOptions: SuffixOptions are invalid.
	ErrOptions = errors.New("student: invalid options")
	// ErrModel: the model lacks a part the suffix needs or does not fit the patch.
	ErrModel = errors.New("student: model unfit for the suffix")
	// ErrBatch: a batch of examples does not fit the suffix (lengths, token ids, values).
	ErrBatch = errors.New("student: invalid batch")
	// ErrGraph: gorgonia failed to build or run the graph (a bug, reported as an error).
	ErrGraph = errors.New("student: graph failure")
)

// LossKind names a distillation loss (the --loss flag).
type LossKind string

const (
	// LossTopKKL is the paper's loss: per window Σ_t Σ_k p[t,k]·(log p[t,k] − log q[t,k]) / T,
	// p the teacher's top-k probabilities and q the softmax of the student's logits at the
	// teacher's top-k ids, taken over those k only. Only k head rows per token are computed.
	LossTopKKL LossKind = "topk-kl"
	// LossFullKL is the same KL over the whole vocabulary, the teacher's logits recomputed
	// from the cached X_L with the (shared) final norm and head.
	LossFullKL LossKind = "full-kl"
	// LossMSE is the mean squared error between the student's and the teacher's final
	// hidden state X_L (before the final norm): per window Σ_t Σ_c (x − y)² / (T·d).
	LossMSE LossKind = "mse"
)

// PaperLossScale is the factor between the paper's loss and LossTopKKL: 1. The official
// code computes KLDivLoss(reduction='batchmean') on [1, T, k] tensors (batch 1), which
// divides the sum by 1, then divides by T ("/ seq-len"): exactly Σ_t Σ_k p(log p − log q)/T.
const PaperLossScale = 1.0

// SuffixOptions configure a Suffix; Validate fills the defaults.
type SuffixOptions struct {
	SeqLen int      // tokens per window T (required)
	Loss   LossKind // default LossTopKKL
	K      int      // teacher top-k (default 50); used by LossTopKKL only
}

// Validate checks the options and fills defaults. It returns an error wrapping ErrOptions.
func (o *SuffixOptions) Validate() error {
	if o.Loss == "" {
		o.Loss = LossTopKKL
	}
	if o.K == 0 {
		o.K = 50
	}
	switch {
	case o.SeqLen <= 0:
		return fmt.Errorf("%w: seq-len %d must be positive", ErrOptions, o.SeqLen)
	case o.K < 0:
		return fmt.Errorf("%w: top-k %d must be positive", ErrOptions, o.K)
	}
	switch o.Loss {
	case LossTopKKL, LossFullKL, LossMSE:
	default:
		return fmt.Errorf("%w: loss %q (want topk-kl, full-kl or mse)", ErrOptions, o.Loss)
	}
	return nil
}

// Example is one training window of T tokens as the teacher cached it. Slices are read,
// never kept or modified.
type Example struct {
	XCut     []float32 // T×d: X_i, the hidden state entering the cut
	TopKIdx  []int32   // T×K: teacher top-k token ids (topk-kl)
	TopKProb []float32 // T×K: teacher top-k probabilities, softmax over the top-k logits (topk-kl)
	XFinal   []float32 // T×d: X_L, the teacher's last layer output before the final norm (full-kl, mse)
}

// Suffix is the trainable part of the patched model: P (learnable), the frozen layers
// end..L−1, the final norm and the head. It shares the model's weights, which must not
// change while it is in use. A Suffix is not safe for concurrent use.
type Suffix struct {
	m    *model.Model
	end  int
	opts SuffixOptions
	d    int

	p      []float32      // P, d×d row-major (x·P for row vectors)
	pv     *gtensor.Dense // wraps p; bound to the P node of every graph
	rope   *ropeTables
	graphs map[graphKey]*graph
}

// NewSuffix returns the suffix of m after the cut at layer end with P initialized to a copy
// of p0 (nil: the identity). m must hold layers end..L−1 and, except for LossMSE, the final
// norm and the head; its other layers may be nil. Layer indices are the unpruned model's;
// m.Patch, if any, is ignored (P is the suffix's own). The training graph (one window) is
// built at once. Errors wrap ErrOptions, ErrModel or ErrGraph.
func NewSuffix(m *model.Model, end int, p0 *tensor.Matrix, opts SuffixOptions) (*Suffix, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	if m == nil {
		return nil, fmt.Errorf("%w: nil model", ErrModel)
	}
	if err := m.Config.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrModel, err)
	}
	c := m.Config
	if end < 0 || end > c.Layers || len(m.Layers) != c.Layers {
		return nil, fmt.Errorf("%w: cut at layer %d of %d (%d loaded)", ErrModel, end, c.Layers, len(m.Layers))
	}
	for l := end; l < c.Layers; l++ {
		if err := checkLayer(m.Layers[l], &c); err != nil {
			return nil, fmt.Errorf("%w: layer %d: %v", ErrModel, l, err)
		}
	}
	if opts.Loss != LossMSE || m.Head != nil {
		if len(m.Norm) != c.Dim {
			return nil, fmt.Errorf("%w: final norm has %d weights, want %d", ErrModel, len(m.Norm), c.Dim)
		}
		if m.Head == nil || m.Head.Rows != c.Vocab || m.Head.Cols != c.Dim {
			return nil, fmt.Errorf("%w: head missing or not %d×%d", ErrModel, c.Vocab, c.Dim)
		}
	}
	if opts.Loss == LossTopKKL && opts.K > c.Vocab {
		return nil, fmt.Errorf("%w: top-k %d exceeds the vocabulary %d", ErrOptions, opts.K, c.Vocab)
	}
	s := &Suffix{m: m, end: end, opts: opts, d: c.Dim, graphs: map[graphKey]*graph{}}
	s.p = make([]float32, c.Dim*c.Dim)
	switch {
	case p0 == nil:
		for i := range c.Dim {
			s.p[i*c.Dim+i] = 1
		}
	case p0.Rows != c.Dim || p0.Cols != c.Dim:
		return nil, fmt.Errorf("%w: patch is %d×%d, want %d×%d", ErrModel, p0.Rows, p0.Cols, c.Dim, c.Dim)
	default:
		copy(s.p, p0.Data)
	}
	s.pv = gtensor.New(gtensor.WithShape(c.Dim, c.Dim), gtensor.WithBacking(s.p))
	s.rope = newRopeTables(ropeInvFreq(c), opts.SeqLen)
	if _, err := s.graphFor(graphKey{kind: opts.Loss, batch: 1}); err != nil {
		return nil, err
	}
	return s, nil
}

func checkLayer(ly *model.Layer, c *model.Config) error {
	if ly == nil {
		return errors.New("not loaded")
	}
	d, q, kv := c.Dim, c.Heads*c.HeadDim, c.KVHeads*c.HeadDim
	shapes := []struct {
		w          *tensor.Matrix
		rows, cols int
	}{{ly.Wq, q, d}, {ly.Wk, kv, d}, {ly.Wv, kv, d}, {ly.Wo, d, q}, {ly.Wgate, c.FFN, d}, {ly.Wup, c.FFN, d}, {ly.Wdown, d, c.FFN}}
	for _, s := range shapes {
		if s.w == nil || s.w.Rows != s.rows || s.w.Cols != s.cols {
			return fmt.Errorf("projection missing or not %d×%d", s.rows, s.cols)
		}
	}
	if len(ly.AttnNorm) != d || len(ly.MLPNorm) != d {
		return errors.New("norm weights missing")
	}
	if (ly.Bq != nil && len(ly.Bq) != q) || (ly.Bk != nil && len(ly.Bk) != kv) || (ly.Bv != nil && len(ly.Bv) != kv) {
		return errors.New("q/k/v bias of the wrong size")
	}
	if c.QKVBias && (ly.Bq == nil || ly.Bk == nil || ly.Bv == nil) {
		return errors.New("q/k/v biases missing")
	}
	if (ly.QNorm != nil || ly.KNorm != nil || c.QKNorm) && (len(ly.QNorm) != c.HeadDim || len(ly.KNorm) != c.HeadDim) {
		return fmt.Errorf("q/k norm weights missing or not of head_dim %d", c.HeadDim)
	}
	return nil
}

// ropeInvFreq returns the rotary inverse frequencies exactly as the engine computes them
// (model.invFreq32): for Hugging Face LLaMA, 1/θ^(2i/hd) in float32 arithmetic as PyTorch
// does; with llama3 scaling, the float64 frequencies rounded.
func ropeInvFreq(c model.Config) []float32 {
	f64 := c.InvFreq()
	out := make([]float32, len(f64))
	if c.Scaling != nil {
		for i, v := range f64 {
			out[i] = float32(v)
		}
		return out
	}
	for i := range out {
		e := float32(2*i) / float32(c.HeadDim)
		out[i] = 1 / float32(math.Pow(float64(float32(c.RopeTheta)), float64(e)))
	}
	return out
}

// Options returns the options in effect (defaults filled).
func (s *Suffix) Options() SuffixOptions { return s.opts }

// P returns a copy of the current patch, d×d row-major.
func (s *Suffix) P() []float32 { return append([]float32(nil), s.p...) }

// SetP replaces the patch with a copy of p. It panics unless len(p) == d·d.
func (s *Suffix) SetP(p []float32) {
	if len(p) != len(s.p) {
		panic(fmt.Sprintf("student: SetP with %d values, want %d", len(p), len(s.p)))
	}
	copy(s.p, p)
}

// WindowGradient runs one window's loss and its gradient: a forward and a backward
// through the one-window graph, whose shapes (and so whose bits) are the same whatever the
// step's batch. It returns dL/dP (d×d, a fresh slice) and the window's loss, its mean over
// the window's T tokens. Errors wrap ErrBatch for an example that does not fit and
// ErrGraph for failures inside gorgonia.
func (s *Suffix) WindowGradient(ex Example) (grad []float32, loss float64, err error) {
	g, err := s.prepare(ex)
	if err != nil {
		return nil, 0, err
	}
	if err := g.run(g.train); err != nil {
		return nil, 0, err
	}
	gv, err := floats(g.grad.Value())
	if err != nil {
		return nil, 0, fmt.Errorf("%w: gradient: %v", ErrGraph, err)
	}
	loss, err = g.lossValue()
	return append([]float32(nil), gv...), loss, err
}

// WindowLoss returns one window's loss, forward only (validation); it equals
// WindowGradient's loss bit for bit.
func (s *Suffix) WindowLoss(ex Example) (float64, error) {
	g, err := s.prepare(ex)
	if err != nil {
		return 0, err
	}
	if err := g.run(g.eval); err != nil {
		return 0, err
	}
	return g.lossValue()
}

// Step returns the mean loss of a batch of windows and the step's gradient as the trainer
// computes it: the windows' gradients (WindowGradient) summed in float64 in batch order,
// divided by the batch size, here rounded to float32. Errors as WindowGradient's, and
// ErrBatch for an empty batch.
func (s *Suffix) Step(batch []Example) (loss float64, grad []float32, err error) {
	if len(batch) == 0 {
		return 0, nil, fmt.Errorf("%w: empty batch", ErrBatch)
	}
	sum := newGradSum(len(s.p))
	for i, ex := range batch {
		g, l, err := s.WindowGradient(ex)
		if err != nil {
			return 0, nil, fmt.Errorf("example %d: %w", i, err)
		}
		sum.add(g, l)
	}
	mean, loss := sum.mean()
	grad = make([]float32, len(mean))
	for i, v := range mean {
		grad[i] = float32(v)
	}
	return loss, grad, nil
}

// Loss returns the mean of the windows' losses (WindowLoss), summed in batch order.
func (s *Suffix) Loss(batch []Example) (float64, error) {
	if len(batch) == 0 {
		return 0, fmt.Errorf("%w: empty batch", ErrBatch)
	}
	var sum float64
	for i, ex := range batch {
		l, err := s.WindowLoss(ex)
		if err != nil {
			return 0, fmt.Errorf("example %d: %w", i, err)
		}
		sum += l
	}
	return sum / float64(len(batch)), nil
}

// Forward runs one window X_i (T×d, row-major) through P, the layers, the final norm and
// the head and returns the logits (T×vocab): the patched model's output, for checks
// against the engine. It panics if len(xcut) != SeqLen·d or the model has no head.
func (s *Suffix) Forward(xcut []float32) []float32 {
	T := s.opts.SeqLen
	if len(xcut) != T*s.d {
		panic(fmt.Sprintf("student: Forward with %d values, want %d×%d", len(xcut), T, s.d))
	}
	if s.m.Head == nil {
		panic("student: Forward needs the head")
	}
	g, err := s.graphFor(graphKey{kind: kindLogits, batch: 1})
	if err != nil {
		panic(err)
	}
	copy(g.xv.Float32s(), xcut)
	if err := g.run(g.eval); err != nil {
		panic(err)
	}
	out, err := floats(g.out.Value())
	if err != nil {
		panic(err)
	}
	return append([]float32(nil), out...)
}

// prepare checks an example, finds (or builds) the one-window graph and loads the inputs
// into it.
func (s *Suffix) prepare(ex Example) (*graph, error) {
	T, d, K, V := s.opts.SeqLen, s.d, s.opts.K, s.m.Vocab
	if len(ex.XCut) != T*d {
		return nil, fmt.Errorf("%w: XCut has %d values, want %d×%d", ErrBatch, len(ex.XCut), T, d)
	}
	switch s.opts.Loss {
	case LossTopKKL:
		if len(ex.TopKIdx) != T*K || len(ex.TopKProb) != T*K {
			return nil, fmt.Errorf("%w: %d top-k ids and %d probabilities, want %d×%d",
				ErrBatch, len(ex.TopKIdx), len(ex.TopKProb), T, K)
		}
		for _, id := range ex.TopKIdx {
			if id < 0 || int(id) >= V {
				return nil, fmt.Errorf("%w: token id %d outside the vocabulary of %d", ErrBatch, id, V)
			}
		}
		for _, p := range ex.TopKProb {
			if !(p >= 0 && p <= 1) {
				return nil, fmt.Errorf("%w: probability %v outside [0, 1]", ErrBatch, p)
			}
		}
	case LossFullKL, LossMSE:
		if len(ex.XFinal) != T*d {
			return nil, fmt.Errorf("%w: XFinal has %d values, want %d×%d", ErrBatch, len(ex.XFinal), T, d)
		}
	}
	g, err := s.graphFor(graphKey{kind: s.opts.Loss, batch: 1})
	if err != nil {
		return nil, err
	}
	copy(g.xv.Float32s(), ex.XCut)
	switch s.opts.Loss {
	case LossTopKKL:
		copy(g.tv.Float32s(), ex.TopKProb)
		copy(g.iv.Int32s(), ex.TopKIdx)
		g.constant = negEntropy(g.tv.Float32s(), K)
	case LossFullKL:
		copy(g.xf.Data, ex.XFinal)
		g.constant = s.teacherProbs(g)
	case LossMSE:
		copy(g.tv.Float32s(), ex.XFinal)
	}
	return g, nil
}

// teacherProbs sets the full-kl target to softmax(head(norm(X_L))) row by row and returns
// the targets' mean negative entropy Σ p·log p per token, computed as Σ p·(z − lse(z)).
func (s *Suffix) teacherProbs(g *graph) float64 {
	V := s.m.Vocab
	tensor.RMSNorm(g.xfn, g.xf, s.m.Norm, s.m.NormEps)
	logits := tensor.FromData(g.xf.Rows, V, g.tv.Float32s())
	tensor.MulT(logits, g.xfn, s.m.Head)
	rows := logits.Rows
	parts := make([]float64, rows)
	parallelRows(rows, V, func(lo, hi int) {
		z0 := make([]float32, V)
		for r := lo; r < hi; r++ {
			z := logits.Row(r)
			copy(z0, z)
			lse := float64(tensor.LogSumExp(z))
			tensor.Softmax(z)
			var pz float64 // Σ p·z; Σ p·log p = Σ p·z − lse since Σ p = 1
			for j, p := range z {
				pz += float64(p) * float64(z0[j])
			}
			parts[r] = pz - lse
		}
	})
	var sum float64
	for _, v := range parts {
		sum += v
	}
	return sum / float64(rows)
}
