package model

import (
	"fmt"
	"math"
	"sync"

	"linearpatch/model/tensor"
)

// Patch is a d×d matrix applied to the hidden state entering layer Before: x ← x·P.
// A pruned model whose block [i, j) was removed carries Patch{Before: i} in its renumbered
// layers; Before == Layers means the patch sits right before the final norm.
type Patch struct {
	Before int
	P      *tensor.Matrix // d×d, row-major; x·P for row vectors x
}

// Pruned returns a view of m with layers [start, end) removed and, when p is non-nil, the
// d×d patch p applied at the cut. The view shares weights with m. It panics on an invalid
// block (a caller bug: validate with CheckBlock first).
func (m *Model) Pruned(start, end int, p *tensor.Matrix) *Model {
	if err := m.CheckBlock(start, end); err != nil {
		panic(err)
	}
	if m.Patch != nil {
		panic("model: Pruned on a model that already carries a patch")
	}
	v := *m
	v.Layers = append(append([]*Layer(nil), m.Layers[:start]...), m.Layers[end:]...)
	v.Config.Layers = len(v.Layers)
	if p != nil {
		if p.Rows != m.Dim || p.Cols != m.Dim {
			panic(fmt.Sprintf("model: patch is %d×%d, want %d×%d", p.Rows, p.Cols, m.Dim, m.Dim))
		}
		v.Patch = &Patch{Before: start, P: p}
	}
	return &v
}

// CheckBlock reports whether [start, end) is a non-empty block of m's layers.
func (m *Model) CheckBlock(start, end int) error {
	if start < 0 || end > m.Config.Layers || start >= end {
		return fmt.Errorf("%w: block [%d, %d) is not inside the model's %d layers", ErrConfig, start, end, m.Config.Layers)
	}
	return nil
}

// Embeddings returns the hidden states X_0 of a batch of sequences of equal length,
// stacked in rows: row b·T+t is sequence b at position t. It panics on ids outside the
// vocabulary or sequences of different lengths (validate data when reading it).
func (m *Model) Embeddings(ids [][]int) *tensor.Matrix {
	if m.Embed == nil {
		panic("model: embeddings were not loaded")
	}
	T := len(ids[0])
	x := tensor.New(len(ids)*T, m.Dim)
	for b, seq := range ids {
		if len(seq) != T {
			panic(fmt.Sprintf("model: sequence %d has %d tokens, want %d", b, len(seq), T))
		}
		for t, id := range seq {
			row := x.Row(b*T + t)
			copy(row, m.Embed.RowF32(id, row)) // widens a half embedding into row itself
		}
	}
	return x
}

// RunLayers runs layers [from, to) on x in place. x holds a batch of sequences of length
// seqLen stacked in rows (see Embeddings). The model's patch, if any, is applied on entry to
// layer Patch.Before when from ≤ Before < to, or at the end when Before == to == Layers.
// After, when non-nil, is called with each layer index l and the state leaving layer l
// (entering l+1); it must not keep x. It panics when a layer in range was not loaded.
func (m *Model) RunLayers(x *tensor.Matrix, seqLen, from, to int, after func(l int, x *tensor.Matrix)) {
	if from < 0 || to > len(m.Layers) || from > to {
		panic(fmt.Sprintf("model: RunLayers [%d, %d) outside %d layers", from, to, len(m.Layers)))
	}
	if x.Rows%seqLen != 0 || x.Cols != m.Dim {
		panic(fmt.Sprintf("model: hidden state %d×%d is not a batch of %d-token sequences of width %d", x.Rows, x.Cols, seqLen, m.Dim))
	}
	ws := newWorkspace(&m.Config, x.Rows)
	for l := from; l < to; l++ {
		if m.Patch != nil && m.Patch.Before == l {
			m.applyPatch(x, seqLen, ws)
		}
		if m.Layers[l] == nil {
			panic(fmt.Sprintf("model: layer %d was not loaded", l))
		}
		m.layerForward(m.Layers[l], x, seqLen, ws)
		if after != nil {
			after(l, x)
		}
	}
	if m.Patch != nil && m.Patch.Before == to && to == len(m.Layers) && from < to {
		m.applyPatch(x, seqLen, ws)
	}
}

func (m *Model) applyPatch(x *tensor.Matrix, seqLen int, ws *workspace) {
	tensor.MulSeq(ws.h, x, m.Patch.P, seqLen)
	copy(x.Data, ws.h.Data)
}

// Logits applies the final norm and the head to x, returning (rows × vocab) logits. The
// rows of x are one sequence; for a batch, LogitsSeq gives every window the bits it has alone.
func (m *Model) Logits(x *tensor.Matrix) *tensor.Matrix { return m.LogitsSeq(x, x.Rows) }

// LogitsSeq is Logits for a batch of sequences of seqLen rows each stacked in x: a row's
// logits do not depend on the other sequences of the batch (see tensor.MulTSeq).
func (m *Model) LogitsSeq(x *tensor.Matrix, seqLen int) *tensor.Matrix {
	if m.Head == nil {
		panic("model: head was not loaded")
	}
	h := tensor.New(x.Rows, x.Cols)
	tensor.RMSNorm(h, x, m.Norm, m.NormEps)
	out := tensor.New(x.Rows, m.Vocab)
	tensor.MulTSeq(out, h, m.Head, seqLen)
	return out
}

// Forward runs whole sequences through the model (patch included) and returns the logits.
func (m *Model) Forward(ids [][]int) *tensor.Matrix {
	x := m.Embeddings(ids)
	m.RunLayers(x, len(ids[0]), 0, len(m.Layers), nil)
	return m.LogitsSeq(x, len(ids[0]))
}

// HiddenStates runs the sequences through the whole model and returns copies of the
// hidden states X_l entering each requested layer l (0 ≤ l ≤ Layers; X_Layers is the last
// layer's output before the final norm), keyed by l. It panics on a layer outside that range.
func (m *Model) HiddenStates(ids [][]int, layers []int) map[int]*tensor.Matrix {
	want := make(map[int]bool, len(layers))
	last := 0
	for _, l := range layers {
		if l < 0 || l > len(m.Layers) {
			panic(fmt.Sprintf("model: hidden state %d outside 0..%d", l, len(m.Layers)))
		}
		want[l] = true
		last = max(last, l)
	}
	out := make(map[int]*tensor.Matrix, len(want))
	x := m.Embeddings(ids)
	if want[0] {
		out[0] = x.Clone()
	}
	m.RunLayers(x, len(ids[0]), 0, last, func(l int, x *tensor.Matrix) {
		if want[l+1] {
			out[l+1] = x.Clone()
		}
	})
	return out
}

// workspace holds the scratch matrices of one layer forward for a fixed number of rows.
type workspace struct {
	h, q, k, v, att *tensor.Matrix
	gate, up        *tensor.Matrix
	rope            *tensor.Rope
}

func newWorkspace(c *Config, rows int) *workspace {
	return &workspace{
		h:    tensor.New(rows, c.Dim),
		q:    tensor.New(rows, c.Heads*c.HeadDim),
		k:    tensor.New(rows, c.KVHeads*c.HeadDim),
		v:    tensor.New(rows, c.KVHeads*c.HeadDim),
		att:  tensor.New(rows, c.Heads*c.HeadDim),
		gate: tensor.New(rows, c.FFN),
		up:   tensor.New(rows, c.FFN),
	}
}

func (m *Model) layerForward(ly *Layer, x *tensor.Matrix, seqLen int, ws *workspace) {
	c := &m.Config
	tensor.RMSNorm(ws.h, x, ly.AttnNorm, c.NormEps)
	tensor.MulTSeq(ws.q, ws.h, ly.Wq, seqLen)
	tensor.MulTSeq(ws.k, ws.h, ly.Wk, seqLen)
	tensor.MulTSeq(ws.v, ws.h, ly.Wv, seqLen)
	if ly.Bq != nil {
		tensor.AddBias(ws.q, ly.Bq)
		tensor.AddBias(ws.k, ly.Bk)
		tensor.AddBias(ws.v, ly.Bv)
	}
	if ly.QNorm != nil {
		// Per-head RMSNorm: each row of heads·hd values is heads rows of hd.
		qh := tensor.FromData(ws.q.Rows*c.Heads, c.HeadDim, ws.q.Data)
		kh := tensor.FromData(ws.k.Rows*c.KVHeads, c.HeadDim, ws.k.Data)
		tensor.RMSNorm(qh, qh, ly.QNorm, c.NormEps)
		tensor.RMSNorm(kh, kh, ly.KNorm, c.NormEps)
	}
	rope := m.ropeFor(seqLen)
	rope.Apply(ws.q, c.Heads, seqLen)
	rope.Apply(ws.k, c.KVHeads, seqLen)
	tensor.AttentionWindow(ws.att, ws.q, ws.k, ws.v, seqLen, c.Heads, c.KVHeads, c.SlidingWindow)
	tensor.MulTSeq(ws.h, ws.att, ly.Wo, seqLen)
	tensor.Add(x, ws.h)

	tensor.RMSNorm(ws.h, x, ly.MLPNorm, c.NormEps)
	tensor.MulTSeq(ws.gate, ws.h, ly.Wgate, seqLen)
	tensor.MulTSeq(ws.up, ws.h, ly.Wup, seqLen)
	tensor.SwiGLU(ws.gate, ws.gate, ws.up)
	tensor.MulTSeq(ws.h, ws.gate, ly.Wdown, seqLen)
	tensor.Add(x, ws.h)
}

// ropeCache holds the rotary tables of a model; views made by Pruned share it.
type ropeCache struct {
	mu   sync.Mutex
	rope *tensor.Rope
	n    int
}

// ropeFor returns rotary tables covering seqLen positions, building them on first use (and
// again, larger, for a longer sequence). Built tables are immutable, so concurrent forwards
// may hold an older one safely.
func (m *Model) ropeFor(seqLen int) *tensor.Rope {
	rc := m.rope
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if rc.rope == nil || rc.n < seqLen {
		rc.n = max(seqLen, m.MaxSeq, 256)
		rc.rope = tensor.NewRope(m.invFreq32(), rc.n)
	}
	return rc.rope
}

// invFreq32 computes the inverse frequencies as PyTorch does for Hugging Face LLaMA: in
// float32, 1 / θ^(2i/hd).
func (m *Model) invFreq32() []float32 {
	f64 := m.Config.InvFreq()
	out := make([]float32, len(f64))
	if m.Scaling != nil {
		for i, v := range f64 {
			out[i] = float32(v)
		}
		return out
	}
	for i := range out {
		e := float32(2*i) / float32(m.HeadDim)
		out[i] = 1 / float32(math.Pow(float64(float32(m.RopeTheta)), float64(e)))
	}
	return out
}
