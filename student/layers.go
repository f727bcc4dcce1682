package student

import (
	"fmt"

	"github.com/chewxy/hm"
	"gorgonia.org/gorgonia"
	gtensor "gorgonia.org/tensor"

	"linearpatch/model/tensor"
)

// The functions below add one custom op (forward) to a graph and wire its backward op
// through SymDiff. Weights are frozen: they live in the ops, not in nodes, so gorgonia
// never builds weight-gradient products; only activations carry gradients.

// Op types: fresh values on every call (see op.typ).
func unary() hm.Type   { return hm.NewFnType(matF32, matF32) }
func binary() hm.Type  { return hm.NewFnType(matF32, matF32, matF32) }
func ternary() hm.Type { return hm.NewFnType(matF32, matF32, matF32, matF32) }
func gatherType() hm.Type {
	return hm.NewFnType(matF32, matI32, matF32)
}

func nodes(ns ...*gorgonia.Node) gorgonia.Nodes { return gorgonia.Nodes(ns) }

// linearNode applies y = x·[W_0; W_1; …]ᵀ (+ biases) with frozen weights stored [out, in];
// the blocks' outputs sit side by side in y's columns. bias may be nil or hold nil entries.
func linearNode(name string, x *gorgonia.Node, ws []*tensor.Matrix, bias [][]float32) (*gorgonia.Node, error) {
	in, out := ws[0].Cols, 0
	for _, w := range ws {
		if w.Cols != in {
			return nil, fmt.Errorf("student: %s: weights of widths %d and %d", name, in, w.Cols)
		}
		out += w.Rows
	}
	back := func() *op { // a fresh op (and output buffer) per gradient node
		return &op{
			name: name + ".backward", typ: unary, arity: 1,
			shape: func(s []gtensor.Shape) (gtensor.Shape, error) {
				n, err := matShape(name+".backward", s[0], out)
				return gtensor.Shape{n, in}, err
			},
			run: func(o []float32, v []gorgonia.Value) error {
				dy, err := floats(v[0])
				if err != nil {
					return err
				}
				linearBackward(o, dy, len(dy)/out, ws)
				return nil
			},
		}
	}
	fwd := &op{
		name: name, typ: unary, arity: 1, wrt: []bool{true},
		shape: func(s []gtensor.Shape) (gtensor.Shape, error) {
			n, err := matShape(name, s[0], in)
			return gtensor.Shape{n, out}, err
		},
		run: func(o []float32, v []gorgonia.Value) error {
			x, err := floats(v[0])
			if err != nil {
				return err
			}
			linearForward(o, x, len(x)/in, ws, bias)
			return nil
		},
		diff: func(in gorgonia.Nodes, _, grad *gorgonia.Node) (gorgonia.Nodes, error) {
			dx, err := gorgonia.ApplyOp(back(), grad)
			return nodes(dx), err
		},
	}
	return gorgonia.ApplyOp(fwd, x)
}

// rmsNormNode applies RMSNorm with the frozen weight w (as Hugging Face's LlamaRMSNorm).
func rmsNormNode(name string, x *gorgonia.Node, w []float32, eps float32) (*gorgonia.Node, error) {
	d := len(w)
	same := func(s []gtensor.Shape) (gtensor.Shape, error) {
		if err := sameShapes(name, s); err != nil {
			return nil, err
		}
		_, err := matShape(name, s[0], d)
		return s[0].Clone(), err
	}
	back := func() *op { // a fresh op (and output buffer) per gradient node
		return &op{
			name: name + ".backward", typ: binary, arity: 2, shape: same,
			run: func(o []float32, v []gorgonia.Value) error {
				f, err := inputs(v)
				if err != nil {
					return err
				}
				rmsNormBackward(o, f[0], f[1], w, eps)
				return nil
			},
		}
	}
	fwd := &op{
		name: name, typ: unary, arity: 1, wrt: []bool{true}, shape: same,
		run: func(o []float32, v []gorgonia.Value) error {
			x, err := floats(v[0])
			if err != nil {
				return err
			}
			rmsNormForward(o, x, w, eps)
			return nil
		},
		diff: func(in gorgonia.Nodes, _, grad *gorgonia.Node) (gorgonia.Nodes, error) {
			dx, err := gorgonia.ApplyOp(back(), in[0], grad)
			return nodes(dx), err
		},
	}
	return gorgonia.ApplyOp(fwd, x)
}

// headNormNode applies per-head RMSNorm to the q and k heads of fused [q | k | v] rows of
// width `width`: the first qHeads heads with wq, the next kHeads with wk (len(wq) = len(wk) =
// hd); the other columns pass through.
func headNormNode(name string, x *gorgonia.Node, width, qHeads, kHeads int, wq, wk []float32, eps float32) (*gorgonia.Node, error) {
	if len(wq) == 0 || len(wk) != len(wq) || (qHeads+kHeads)*len(wq) > width {
		return nil, fmt.Errorf("student: %s: %d q and %d k norm weights for %d+%d heads in rows of %d", name, len(wq), len(wk), qHeads, kHeads, width)
	}
	same := func(s []gtensor.Shape) (gtensor.Shape, error) {
		if err := sameShapes(name, s); err != nil {
			return nil, err
		}
		_, err := matShape(name, s[0], width)
		return s[0].Clone(), err
	}
	back := func() *op { // a fresh op (and output buffer) per gradient node
		return &op{
			name: name + ".backward", typ: binary, arity: 2, shape: same,
			run: func(o []float32, v []gorgonia.Value) error {
				f, err := inputs(v)
				if err != nil {
					return err
				}
				headNormBackward(o, f[0], f[1], width, qHeads, kHeads, wq, wk, eps)
				return nil
			},
		}
	}
	fwd := &op{
		name: name, typ: unary, arity: 1, wrt: []bool{true}, shape: same,
		run: func(o []float32, v []gorgonia.Value) error {
			x, err := floats(v[0])
			if err != nil {
				return err
			}
			headNormForward(o, x, width, qHeads, kHeads, wq, wk, eps)
			return nil
		},
		diff: func(in gorgonia.Nodes, _, grad *gorgonia.Node) (gorgonia.Nodes, error) {
			dx, err := gorgonia.ApplyOp(back(), in[0], grad)
			return nodes(dx), err
		},
	}
	return gorgonia.ApplyOp(fwd, x)
}

// ropeNode rotates the first `heads` heads of every row of x (rows of width `width`,
// positions row % T) and passes the other columns through.
func ropeNode(name string, x *gorgonia.Node, width, heads, T int, tab *ropeTables) (*gorgonia.Node, error) {
	same := func(s []gtensor.Shape) (gtensor.Shape, error) {
		n, err := matShape(name, s[0], width)
		if err == nil && n%T != 0 {
			err = fmt.Errorf("student: %s: %d rows are not whole %d-token sequences", name, n, T)
		}
		return s[0].Clone(), err
	}
	back := func() *op { // a fresh op (and output buffer) per gradient node
		return &op{
			name: name + ".backward", typ: unary, arity: 1, shape: same,
			run: func(o []float32, v []gorgonia.Value) error {
				dy, err := floats(v[0])
				if err != nil {
					return err
				}
				ropeBackward(o, dy, width, heads, T, tab)
				return nil
			},
		}
	}
	fwd := &op{
		name: name, typ: unary, arity: 1, wrt: []bool{true}, shape: same,
		run: func(o []float32, v []gorgonia.Value) error {
			x, err := floats(v[0])
			if err != nil {
				return err
			}
			ropeForward(o, x, width, heads, T, tab)
			return nil
		},
		diff: func(in gorgonia.Nodes, _, grad *gorgonia.Node) (gorgonia.Nodes, error) {
			dx, err := gorgonia.ApplyOp(back(), grad)
			return nodes(dx), err
		},
	}
	return gorgonia.ApplyOp(fwd, x)
}

// attentionNode applies causal grouped-query attention (with a.window, sliding) to fused
// [q | k | v] rows.
func attentionNode(name string, qkv *gorgonia.Node, a attnShape) (*gorgonia.Node, error) {
	W, OW := a.width(), a.outWidth()
	rows := func(s gtensor.Shape, cols int) (int, error) {
		n, err := matShape(name, s, cols)
		if err == nil && n%a.T != 0 {
			err = fmt.Errorf("student: %s: %d rows are not whole %d-token sequences", name, n, a.T)
		}
		return n, err
	}
	back := func() *op { // a fresh op (and output buffer) per gradient node
		return &op{
			name: name + ".backward", typ: ternary, arity: 3,
			shape: func(s []gtensor.Shape) (gtensor.Shape, error) {
				n, err := rows(s[0], W)
				if err != nil {
					return nil, err
				}
				if err := sameShapes(name, s[1:]); err != nil {
					return nil, err
				}
				if m, err := rows(s[1], OW); err != nil || m != n {
					return nil, fmt.Errorf("student: %s: shapes %v", name, s)
				}
				return s[0].Clone(), nil
			},
			run: func(o []float32, v []gorgonia.Value) error {
				f, err := inputs(v)
				if err != nil {
					return err
				}
				attentionBackward(o, f[0], f[1], f[2], a)
				return nil
			},
		}
	}
	fwd := &op{
		name: name, typ: unary, arity: 1, wrt: []bool{true},
		shape: func(s []gtensor.Shape) (gtensor.Shape, error) {
			n, err := rows(s[0], W)
			return gtensor.Shape{n, OW}, err
		},
		run: func(o []float32, v []gorgonia.Value) error {
			x, err := floats(v[0])
			if err != nil {
				return err
			}
			attentionForward(o, x, a)
			return nil
		},
		diff: func(in gorgonia.Nodes, out, grad *gorgonia.Node) (gorgonia.Nodes, error) {
			dx, err := gorgonia.ApplyOp(back(), in[0], out, grad)
			return nodes(dx), err
		},
	}
	return gorgonia.ApplyOp(fwd, qkv)
}

// swigluNode applies silu(gate)·up to rows laid out [gate | up] of width 2f.
func swigluNode(name string, gu *gorgonia.Node, f int) (*gorgonia.Node, error) {
	back := func() *op { // a fresh op (and output buffer) per gradient node
		return &op{
			name: name + ".backward", typ: binary, arity: 2,
			shape: func(s []gtensor.Shape) (gtensor.Shape, error) {
				n, err := matShape(name, s[0], 2*f)
				if err != nil {
					return nil, err
				}
				if m, err := matShape(name, s[1], f); err != nil || m != n {
					return nil, fmt.Errorf("student: %s: shapes %v", name, s)
				}
				return s[0].Clone(), nil
			},
			run: func(o []float32, v []gorgonia.Value) error {
				x, err := inputs(v)
				if err != nil {
					return err
				}
				swigluBackward(o, x[0], x[1], f)
				return nil
			},
		}
	}
	fwd := &op{
		name: name, typ: unary, arity: 1, wrt: []bool{true},
		shape: func(s []gtensor.Shape) (gtensor.Shape, error) {
			n, err := matShape(name, s[0], 2*f)
			return gtensor.Shape{n, f}, err
		},
		run: func(o []float32, v []gorgonia.Value) error {
			x, err := floats(v[0])
			if err != nil {
				return err
			}
			swigluForward(o, x, f)
			return nil
		},
		diff: func(in gorgonia.Nodes, _, grad *gorgonia.Node) (gorgonia.Nodes, error) {
			dx, err := gorgonia.ApplyOp(back(), in[0], grad)
			return nodes(dx), err
		},
	}
	return gorgonia.ApplyOp(fwd, gu)
}

// gatherHeadNode computes, for every row t of h, the k logits h_t·W[idx[t,j]] of the head
// rows named by idx (the teacher's top-k token ids): only k rows of the head per token.
func gatherHeadNode(name string, h, idx *gorgonia.Node, w *tensor.Matrix, k int) (*gorgonia.Node, error) {
	d, vocab := w.Cols, w.Rows
	check := func(v gorgonia.Value) ([]int32, error) {
		ix, err := ints(v)
		if err != nil {
			return nil, err
		}
		for _, i := range ix {
			if i < 0 || int(i) >= vocab {
				return nil, fmt.Errorf("student: %s: token id %d outside the vocabulary of %d", name, i, vocab)
			}
		}
		return ix, nil
	}
	back := func() *op { // a fresh op (and output buffer) per gradient node
		return &op{
			name: name + ".backward", typ: gatherType, arity: 2,
			shape: func(s []gtensor.Shape) (gtensor.Shape, error) {
				n, err := matShape(name, s[0], k)
				if err != nil {
					return nil, err
				}
				if !s[1].Eq(s[0]) {
					return nil, fmt.Errorf("student: %s: shapes %v", name, s)
				}
				return gtensor.Shape{n, d}, nil
			},
			run: func(o []float32, v []gorgonia.Value) error {
				dz, err := floats(v[0])
				if err != nil {
					return err
				}
				ix, err := check(v[1])
				if err != nil {
					return err
				}
				gatherBackward(o, dz, ix, w, k)
				return nil
			},
		}
	}
	fwd := &op{
		name: name, typ: gatherType, arity: 2, wrt: []bool{true, false},
		shape: func(s []gtensor.Shape) (gtensor.Shape, error) {
			n, err := matShape(name, s[0], d)
			if err != nil {
				return nil, err
			}
			if m, err := matShape(name, s[1], k); err != nil || m != n {
				return nil, fmt.Errorf("student: %s: shapes %v", name, s)
			}
			return gtensor.Shape{n, k}, nil
		},
		run: func(o []float32, v []gorgonia.Value) error {
			h, err := floats(v[0])
			if err != nil {
				return err
			}
			ix, err := check(v[1])
			if err != nil {
				return err
			}
			gatherForward(o, h, ix, w, k)
			return nil
		},
		diff: func(in gorgonia.Nodes, _, grad *gorgonia.Node) (gorgonia.Nodes, error) {
			dh, err := gorgonia.ApplyOp(back(), grad, in[1])
			return nodes(dh, nil), err
		},
	}
	return gorgonia.ApplyOp(fwd, h, idx)
}

// crossEntropyNode is the scalar −Σ_rows Σ_j p·log softmax(z)_j / rows: the KL divergence
// from p to softmax(z) per token, less p's (constant) negative entropy. The target p gets
// no gradient.
func crossEntropyNode(name string, z, p *gorgonia.Node) (*gorgonia.Node, error) {
	return scalarLossNode(name, z, p, func(z, p []float32, k int) float64 {
		return crossEntropyForward(z, p, k)
	}, crossEntropyBackward)
}

// mseNode is the scalar Σ (y − t)² / len(y); the target t gets no gradient.
func mseNode(name string, y, t *gorgonia.Node) (*gorgonia.Node, error) {
	return scalarLossNode(name, y, t, func(y, t []float32, _ int) float64 {
		return mseForward(y, t)
	}, func(dy, y, t []float32, _ int, g float32) { mseBackward(dy, y, t, g) })
}

// scalarLossNode builds a loss op over two matrices of equal shape (a prediction with a
// gradient, a target without) from its forward and backward kernels; k is the row width.
func scalarLossNode(name string, x, target *gorgonia.Node,
	forward func(x, t []float32, k int) float64,
	backward func(dx, x, t []float32, k int, g float32)) (*gorgonia.Node, error) {
	back := func() *op { // a fresh op (and output buffer) per gradient node
		return &op{
			name: name + ".backward", typ: func() hm.Type { return hm.NewFnType(matF32, matF32, scaF32, matF32) }, arity: 3,
			shape: func(s []gtensor.Shape) (gtensor.Shape, error) {
				if err := sameShapes(name, s[:2]); err != nil {
					return nil, err
				}
				return s[0].Clone(), nil
			},
			run: func(o []float32, v []gorgonia.Value) error {
				f, err := inputs(v[:2])
				if err != nil {
					return err
				}
				g, err := scalar(v[2])
				if err != nil {
					return err
				}
				backward(o, f[0], f[1], v[0].Shape()[1], g)
				return nil
			},
		}
	}
	fwd := &op{
		name: name, typ: func() hm.Type { return hm.NewFnType(matF32, matF32, scaF32) }, arity: 2, wrt: []bool{true, false},
		shape: func(s []gtensor.Shape) (gtensor.Shape, error) {
			return gtensor.ScalarShape(), sameShapes(name, s)
		},
		run: func(o []float32, v []gorgonia.Value) error {
			f, err := inputs(v)
			if err != nil {
				return err
			}
			o[0] = float32(forward(f[0], f[1], v[0].Shape()[1]))
			return nil
		},
		diff: func(in gorgonia.Nodes, _, grad *gorgonia.Node) (gorgonia.Nodes, error) {
			dx, err := gorgonia.ApplyOp(back(), in[0], in[1], grad)
			return nodes(dx, nil), err
		},
	}
	return gorgonia.ApplyOp(fwd, x, target)
}
