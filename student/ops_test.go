package student

import (
	"math/rand/v2"
	"testing"

	"gorgonia.org/gorgonia"
	gtensor "gorgonia.org/tensor"

	"linearpatch/model/tensor"
)

// Each custom op through gorgonia: a graph x → op → Σ r⊙y (or the scalar loss itself),
// differentiated by gorgonia.Grad through the op's SymDiff, must give the twin's forward
// and the finite-difference gradient of the twin. This checks the wiring (which inputs
// reach the backward op, which get no gradient) on top of the kernel tests.

// opCase builds the op on the input node x (rows×cols) in graph g.
type opCase struct {
	name       string
	rows, cols int
	build      func(g *gorgonia.ExprGraph, x *gorgonia.Node) (*gorgonia.Node, error)
	ref        func(x []float64) []float64 // the twin; one value for a scalar op
}

func runOpCase(t *testing.T, rng *rand.Rand, c opCase) {
	t.Helper()
	g := gorgonia.NewGraph()
	xs := randSlice(rng, c.rows*c.cols, 1)
	xv := gtensor.New(gtensor.WithShape(c.rows, c.cols), gtensor.WithBacking(append([]float32(nil), xs...)))
	x := gorgonia.NewMatrix(g, gorgonia.Float32, gorgonia.WithShape(c.rows, c.cols), gorgonia.WithName("x"), gorgonia.WithValue(xv))
	y, err := c.build(g, x)
	if err != nil {
		t.Fatal(err)
	}
	var r []float32
	cost := y
	if !y.IsScalar() {
		s := y.Shape()
		r = randSlice(rng, s.TotalSize(), 1)
		rv := gtensor.New(gtensor.WithShape(s...), gtensor.WithBacking(r))
		rn := gorgonia.NewMatrix(g, gorgonia.Float32, gorgonia.WithShape(s...), gorgonia.WithName("r"), gorgonia.WithValue(rv))
		cost = gorgonia.Must(gorgonia.Sum(gorgonia.Must(gorgonia.HadamardProd(y, rn))))
	}
	grads, err := gorgonia.Grad(cost, x)
	if err != nil {
		t.Fatal(err)
	}
	vm := gorgonia.NewTapeMachine(g)
	defer vm.Close()
	if err := vm.RunAll(); err != nil {
		t.Fatal(err)
	}
	var got []float32
	if y.IsScalar() {
		v, err := scalar(y.Value())
		if err != nil {
			t.Fatal(err)
		}
		got = []float32{v}
	} else if got, err = floats(y.Value()); err != nil {
		t.Fatal(err)
	}
	checkClose(t, c.name+" forward", got, c.ref(to64(xs)), fwdTol)
	dx, err := floats(grads[0].Value())
	if err != nil {
		t.Fatal(err)
	}
	want := fdGrad(func(x []float64) float64 {
		out := c.ref(x)
		if r == nil {
			return out[0]
		}
		return dot64(r, out)
	}, to64(xs), fdEps)
	checkGrad(t, c.name+" gradient", dx, want, gradTol)
}

func TestOpsThroughGorgonia(t *testing.T) {
	rng := rand.New(rand.NewPCG(21, 1))
	ws := []*tensor.Matrix{randMatrix(rng, 5, 6, 1), randMatrix(rng, 3, 6, 1)}
	bias := [][]float32{randSlice(rng, 5, 1), nil}
	w := randSlice(rng, 6, 1)
	inv := []float32{1, 0.3}
	tab := newRopeTables(inv, 3)
	a := attnShape{T: 3, heads: 4, kvHeads: 2, hd: 2}
	aw := attnShape{T: 5, heads: 2, kvHeads: 1, hd: 2, window: 2}
	wq, wk := randSlice(rng, 2, 1), randSlice(rng, 2, 1)
	head := randMatrix(rng, 11, 6, 1)
	idx := make([]int32, 6*4)
	for i := range idx {
		idx[i] = int32(rng.IntN(11))
	}
	target := randSlice(rng, 6*4, 1)
	probs := make([]float32, 6*4)
	for r := range 6 {
		row := randSlice(rng, 4, 2)
		tensor.Softmax(row)
		copy(probs[r*4:], row)
	}
	matrix := func(g *gorgonia.ExprGraph, name string, v *gtensor.Dense) *gorgonia.Node {
		return gorgonia.NewMatrix(g, v.Dtype(), gorgonia.WithShape(v.Shape()...), gorgonia.WithName(name), gorgonia.WithValue(v))
	}
	cases := []opCase{
		{"linear", 4, 6, func(g *gorgonia.ExprGraph, x *gorgonia.Node) (*gorgonia.Node, error) {
			return linearNode("linear", x, ws, bias)
		}, func(x []float64) []float64 { return refLinear(x, ws, bias) }},
		{"rmsnorm", 3, 6, func(g *gorgonia.ExprGraph, x *gorgonia.Node) (*gorgonia.Node, error) {
			return rmsNormNode("rmsnorm", x, w, 1e-5)
		}, func(x []float64) []float64 { return refRMSNorm(x, w, 1e-5) }},
		{"rope", 6, 10, func(g *gorgonia.ExprGraph, x *gorgonia.Node) (*gorgonia.Node, error) {
			return ropeNode("rope", x, 10, 2, 3, tab)
		}, func(x []float64) []float64 { return refRope(x, 10, 2, 3, inv) }},
		{"attention", 6, a.width(), func(g *gorgonia.ExprGraph, x *gorgonia.Node) (*gorgonia.Node, error) {
			return attentionNode("attention", x, a)
		}, func(x []float64) []float64 { return refAttention(x, a) }},
		{"attention-window", 10, aw.width(), func(g *gorgonia.ExprGraph, x *gorgonia.Node) (*gorgonia.Node, error) {
			return attentionNode("attention-window", x, aw)
		}, func(x []float64) []float64 { return refAttention(x, aw) }},
		{"qk-norm", 4, 10, func(g *gorgonia.ExprGraph, x *gorgonia.Node) (*gorgonia.Node, error) {
			return headNormNode("qk-norm", x, 10, 2, 1, wq, wk, 1e-5)
		}, func(x []float64) []float64 { return refHeadNorm(x, 10, 2, 1, wq, wk, 1e-5) }},
		{"swiglu", 3, 8, func(g *gorgonia.ExprGraph, x *gorgonia.Node) (*gorgonia.Node, error) {
			return swigluNode("swiglu", x, 4)
		}, func(x []float64) []float64 { return refSwiGLU(x, 4) }},
		{"gather", 6, 6, func(g *gorgonia.ExprGraph, x *gorgonia.Node) (*gorgonia.Node, error) {
			iv := gtensor.New(gtensor.WithShape(6, 4), gtensor.WithBacking(idx))
			return gatherHeadNode("gather", x, matrix(g, "idx", iv), head, 4)
		}, func(x []float64) []float64 { return refGather(x, idx, head, 4) }},
		{"cross-entropy", 6, 4, func(g *gorgonia.ExprGraph, x *gorgonia.Node) (*gorgonia.Node, error) {
			pv := gtensor.New(gtensor.WithShape(6, 4), gtensor.WithBacking(probs))
			return crossEntropyNode("ce", x, matrix(g, "p", pv))
		}, func(x []float64) []float64 { return []float64{refCE(x, to64(probs), 4)} }},
		{"mse", 6, 4, func(g *gorgonia.ExprGraph, x *gorgonia.Node) (*gorgonia.Node, error) {
			tv := gtensor.New(gtensor.WithShape(6, 4), gtensor.WithBacking(target))
			return mseNode("mse", x, matrix(g, "t", tv))
		}, func(x []float64) []float64 { return []float64{refMSE(x, to64(target))} }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { runOpCase(t, rng, c) })
	}
}

// TestOpShapeErrors checks that ops reject inputs of the wrong shape with an error at
// graph construction, not a panic.
func TestOpShapeErrors(t *testing.T) {
	g := gorgonia.NewGraph()
	x := gorgonia.NewMatrix(g, gorgonia.Float32, gorgonia.WithShape(4, 6), gorgonia.WithName("x"))
	if _, err := linearNode("linear", x, []*tensor.Matrix{tensor.New(3, 5)}, nil); err == nil {
		t.Fatal("linear accepted 6 columns for weights of width 5")
	}
	if _, err := rmsNormNode("norm", x, make([]float32, 5), 1e-5); err == nil {
		t.Fatal("rmsnorm accepted 6 columns for 5 weights")
	}
	if _, err := attentionNode("attention", x, attnShape{T: 3, heads: 1, kvHeads: 1, hd: 2}); err == nil {
		t.Fatal("attention accepted 4 rows for 3-token sequences")
	}
	if _, err := headNormNode("qk-norm", x, 6, 2, 2, make([]float32, 2), make([]float32, 2), 1e-5); err == nil {
		t.Fatal("qk-norm accepted 4 heads of 2 in rows of 6")
	}
	if _, err := headNormNode("qk-norm", x, 6, 1, 1, make([]float32, 2), make([]float32, 3), 1e-5); err == nil {
		t.Fatal("qk-norm accepted q and k norms of different widths")
	}
	if _, err := swigluNode("swiglu", x, 4); err == nil {
		t.Fatal("swiglu accepted 6 columns for 2·4")
	}
}
