package student

import (
	"fmt"

	"gorgonia.org/gorgonia"
	gtensor "gorgonia.org/tensor"

	"linearpatch/model/tensor"
)

// kindLogits keys the forward-only graph behind Forward (not a loss).
const kindLogits LossKind = "logits"

type graphKey struct {
	kind  LossKind
	batch int // windows; the suffix builds one-window graphs only (see WindowGradient)
}

// graph is one compiled gorgonia graph for a fixed batch shape. Its input values are
// allocated once; a step copies the batch into them and re-runs the tape.
type graph struct {
	g        *gorgonia.ExprGraph
	xv       *gtensor.Dense // input X_i, (B·T)×d
	tv       *gtensor.Dense // target: top-k probabilities, full teacher probabilities or X_L
	iv       *gtensor.Dense // top-k ids (topk-kl)
	xf       *tensor.Matrix // teacher X_L (full-kl), normed into xfn
	xfn      *tensor.Matrix
	loss     *gorgonia.Node // scalar; nil for the logits graph
	grad     *gorgonia.Node // dL/dP
	out      *gorgonia.Node // logits (logits graph)
	train    gorgonia.VM    // loss and gradient
	eval     gorgonia.VM    // loss only, or logits
	constant float64        // added to the loss node's value: the targets' negative entropy (KL losses)
}

func (s *Suffix) graphFor(k graphKey) (*graph, error) {
	if g, ok := s.graphs[k]; ok {
		return g, nil
	}
	g, err := s.build(k)
	if err != nil {
		return nil, fmt.Errorf("%w: building the %s graph for %d windows: %v", ErrGraph, k.kind, k.batch, err)
	}
	s.graphs[k] = g
	return g, nil
}

// buildPanic carries an error out of the graph construction (see must).
type buildPanic struct{ err error }

func must(n *gorgonia.Node, err error) *gorgonia.Node {
	if err != nil {
		panic(buildPanic{err})
	}
	return n
}

// build constructs and compiles the graph X·P → layers → (norm → head) → loss or logits.
// Gorgonia reports some failures by panicking (NewTapeMachine); they come back as errors.
func (s *Suffix) build(k graphKey) (gr *graph, err error) {
	defer func() {
		if r := recover(); r != nil {
			if b, ok := r.(buildPanic); ok {
				err = b.err
			} else {
				err = fmt.Errorf("%v", r)
			}
			gr = nil
		}
	}()
	c := s.m.Config
	T, d, K, V := s.opts.SeqLen, c.Dim, s.opts.K, c.Vocab
	N := k.batch * T
	gr = &graph{g: gorgonia.NewGraph()}
	g := gr.g
	matrix := func(name string, v *gtensor.Dense) *gorgonia.Node {
		return gorgonia.NewMatrix(g, v.Dtype(), gorgonia.WithShape(v.Shape()...), gorgonia.WithName(name), gorgonia.WithValue(v))
	}
	f32 := func(rows, cols int) *gtensor.Dense {
		return gtensor.New(gtensor.WithShape(rows, cols), gtensor.WithBacking(make([]float32, rows*cols)))
	}
	gr.xv = f32(N, d)
	x := matrix("x", gr.xv)
	p := matrix("P", s.pv)

	h := must(patchNode("patch", x, p))
	for l := s.end; l < c.Layers; l++ {
		h = s.layer(h, l)
	}
	normed := func() *gorgonia.Node { return must(rmsNormNode("norm", h, s.m.Norm, c.NormEps)) }
	switch k.kind {
	case kindLogits:
		gr.out = must(linearNode("head", normed(), []*tensor.Matrix{s.m.Head}, nil))
	case LossTopKKL:
		gr.iv = gtensor.New(gtensor.WithShape(N, K), gtensor.WithBacking(make([]int32, N*K)))
		gr.tv = f32(N, K)
		z := must(gatherHeadNode("head.topk", normed(), matrix("topk.idx", gr.iv), s.m.Head, K))
		gr.loss = must(crossEntropyNode("loss.topk-kl", z, matrix("topk.prob", gr.tv)))
	case LossFullKL:
		gr.tv = f32(N, V)
		gr.xf, gr.xfn = tensor.New(N, d), tensor.New(N, d)
		z := must(linearNode("head", normed(), []*tensor.Matrix{s.m.Head}, nil))
		gr.loss = must(crossEntropyNode("loss.full-kl", z, matrix("teacher.prob", gr.tv)))
	case LossMSE:
		gr.tv = f32(N, d)
		gr.loss = must(mseNode("loss.mse", h, matrix("teacher.x_final", gr.tv)))
	default:
		return nil, fmt.Errorf("unknown graph kind %q", k.kind)
	}

	if gr.loss == nil {
		gr.eval = gorgonia.NewTapeMachine(g.ExactSubgraphRoots(gr.out))
		return gr, nil
	}
	grads, err := gorgonia.Grad(gr.loss, p)
	if err != nil {
		return nil, err
	}
	gr.grad = grads[0]
	gr.train = gorgonia.NewTapeMachine(g.ExactSubgraphRoots(gr.loss, gr.grad))
	gr.eval = gorgonia.NewTapeMachine(g.ExactSubgraphRoots(gr.loss))
	return gr, nil
}

// layer adds transformer layer l (pre-norm GQA attention and SwiGLU MLP, with residuals)
// on top of x, with the model's q/k/v biases, q/k norm and sliding window when it has
// them. The q/k/v and gate/up projections are fused into one op each.
func (s *Suffix) layer(x *gorgonia.Node, l int) *gorgonia.Node {
	c := s.m.Config
	ly := s.m.Layers[l]
	name := fmt.Sprintf("layer%d.", l)
	a := attnShape{T: s.opts.SeqLen, heads: c.Heads, kvHeads: c.KVHeads, hd: c.HeadDim, window: c.SlidingWindow}
	var bias [][]float32
	if ly.Bq != nil || ly.Bk != nil || ly.Bv != nil {
		bias = [][]float32{ly.Bq, ly.Bk, ly.Bv}
	}
	h := must(rmsNormNode(name+"attn_norm", x, ly.AttnNorm, c.NormEps))
	qkv := must(linearNode(name+"qkv", h, []*tensor.Matrix{ly.Wq, ly.Wk, ly.Wv}, bias))
	if ly.QNorm != nil {
		qkv = must(headNormNode(name+"qk_norm", qkv, a.width(), c.Heads, c.KVHeads, ly.QNorm, ly.KNorm, c.NormEps))
	}
	qkv = must(ropeNode(name+"rope", qkv, a.width(), c.Heads+c.KVHeads, a.T, s.rope))
	att := must(attentionNode(name+"attention", qkv, a))
	x = must(gorgonia.Add(x, must(linearNode(name+"o", att, []*tensor.Matrix{ly.Wo}, nil))))
	h = must(rmsNormNode(name+"mlp_norm", x, ly.MLPNorm, c.NormEps))
	gu := must(linearNode(name+"gate_up", h, []*tensor.Matrix{ly.Wgate, ly.Wup}, nil))
	sw := must(swigluNode(name+"swiglu", gu, c.FFN))
	return must(gorgonia.Add(x, must(linearNode(name+"down", sw, []*tensor.Matrix{ly.Wdown}, nil))))
}

// run executes one pass of vm and rewinds it.
func (g *graph) run(vm gorgonia.VM) error {
	defer vm.Reset()
	if err := vm.RunAll(); err != nil {
		return fmt.Errorf("%w: %v", ErrGraph, err)
	}
	return nil
}

// lossValue returns the loss of the last run: the loss node's value plus the constant.
func (g *graph) lossValue() (float64, error) {
	v, err := scalar(g.loss.Value())
	if err != nil {
		return 0, fmt.Errorf("%w: loss: %v", ErrGraph, err)
	}
	return float64(v) + g.constant, nil
}
