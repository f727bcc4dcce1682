package student

import (
	"fmt"

	"gorgonia.org/gorgonia"
	gtensor "gorgonia.org/tensor"
)

// patchNode is y = x·P for a window's cached input x (n×d, no gradient) and the patch P
// (d×d). Its backward op computes only dL/dP = xᵀ·dy: gorgonia's own matmul would also
// build dL/dx (pruned again from the tape) and runs its products in one single-threaded
// BLAS call; this op runs them in psgemm's row blocks.
func patchNode(name string, x, p *gorgonia.Node) (*gorgonia.Node, error) {
	shape := func(s []gtensor.Shape) (int, int, error) {
		if len(s[1]) != 2 || s[1][0] != s[1][1] {
			return 0, 0, fmt.Errorf("student: %s: patch shape %v is not square", name, s[1])
		}
		d := s[1][0]
		n, err := matShape(name, s[0], d)
		return n, d, err
	}
	back := func() *op { // a fresh op (and output buffer) per gradient node
		return &op{
			name: name + ".backward", typ: binary, arity: 2,
			shape: func(s []gtensor.Shape) (gtensor.Shape, error) {
				n, err := matShape(name+".backward", s[0], -1)
				if err != nil {
					return nil, err
				}
				if m, err := matShape(name+".backward", s[1], s[0][1]); err != nil || m != n {
					return nil, fmt.Errorf("student: %s.backward: shapes %v", name, s)
				}
				return gtensor.Shape{s[0][1], s[0][1]}, nil
			},
			run: func(o []float32, v []gorgonia.Value) error {
				f, err := inputs(v)
				if err != nil {
					return err
				}
				x, dy := f[0], f[1]
				d := v[0].Shape()[1]
				n := len(x) / d
				psgemm(true, false, d, d, n, 1, x, d, dy, d, 0, o, d) // dP = xᵀ·dy
				return nil
			},
		}
	}
	fwd := &op{
		name: name, typ: binary, arity: 2, wrt: []bool{false, true},
		shape: func(s []gtensor.Shape) (gtensor.Shape, error) {
			n, d, err := shape(s)
			return gtensor.Shape{n, d}, err
		},
		run: func(o []float32, v []gorgonia.Value) error {
			f, err := inputs(v)
			if err != nil {
				return err
			}
			x, p := f[0], f[1]
			d := v[1].Shape()[0]
			psgemm(false, false, len(x)/d, d, d, 1, x, d, p, d, 0, o, d)
			return nil
		},
		diff: func(in gorgonia.Nodes, _, grad *gorgonia.Node) (gorgonia.Nodes, error) {
			dp, err := gorgonia.ApplyOp(back(), in[0], grad)
			return nodes(nil, dp), err
		},
	}
	return gorgonia.ApplyOp(fwd, x, p)
}
