package student

import (
	"fmt"
	"hash"
	"hash/fnv"
	"io"

	"github.com/chewxy/hm"
	"gorgonia.org/gorgonia"
	"gorgonia.org/tensor"
)

// Gorgonia types of the values the ops exchange: float32 matrices, int32 index matrices
// and float32 scalars (the losses).
var (
	matF32 = gorgonia.TensorType{Dims: 2, Of: gorgonia.Float32}
	matI32 = gorgonia.TensorType{Dims: 2, Of: gorgonia.Int32}
	scaF32 = gorgonia.Float32
)

// op is a gorgonia.Op (and SDOp when diff is set) assembled from a kernel: every custom
// op of the student, forward and backward alike, is one of these. Inputs are float32
// matrices, int32 index matrices or float32 scalars; the output is a float32 matrix or,
// when shape returns a scalar shape, a float32 scalar. run writes the output's elements
// into out (len = the output's size) and must not keep the slices.
//
// An op never panics out of Do: gorgonia runs the tape on its own goroutine, where a
// panic cannot be recovered by the caller, so run's panics become errors.
type op struct {
	name  string         // unique within a graph: it is the op's hash, and gorgonia merges equal nodes
	typ   func() hm.Type // a fresh type each call: hm's Apply mutates function types in place
	arity int
	shape func(in []tensor.Shape) (tensor.Shape, error)
	run   func(out []float32, in []gorgonia.Value) error

	wrt  []bool // differentiable inputs; nil for a backward op
	diff func(in gorgonia.Nodes, out, grad *gorgonia.Node) (gorgonia.Nodes, error)

	// out is the output of the previous run, reused when the shape matches. The tape
	// machine forgets its registers on Reset, so without it every op would allocate (and
	// zero) its output on every step. Each op is one node of one graph and runs once per
	// run, so the previous output is dead by the time the op runs again.
	out *tensor.Dense
}

var (
	_ gorgonia.SDOp            = (*op)(nil)
	_ gorgonia.UsePreallocDoer = (*op)(nil)
)

func (o *op) Arity() int                { return o.arity }
func (o *op) Type() hm.Type             { return o.typ() }
func (o *op) ReturnsPtr() bool          { return false }
func (o *op) CallsExtern() bool         { return false }
func (o *op) OverwritesInput() int      { return -1 }
func (o *op) WriteHash(h hash.Hash)     { _, _ = io.WriteString(h, o.name) }
func (o *op) String() string            { return o.name }
func (o *op) DiffWRT(inputs int) []bool { return o.wrt }
func (o *op) Hashcode() uint32 {
	h := fnv.New32a()
	o.WriteHash(h)
	return h.Sum32()
}

func (o *op) InferShape(in ...gorgonia.DimSizer) (tensor.Shape, error) {
	shapes := make([]tensor.Shape, len(in))
	for i, d := range in {
		s, ok := d.(tensor.Shape)
		if !ok {
			return nil, fmt.Errorf("student: %s: input %d has no shape (%T)", o.name, i, d)
		}
		shapes[i] = s
	}
	return o.shape(shapes)
}

// SymDiff returns the gradients of the inputs (nil for the non-differentiable ones).
func (o *op) SymDiff(in gorgonia.Nodes, out, grad *gorgonia.Node) (gorgonia.Nodes, error) {
	if o.diff == nil {
		return nil, fmt.Errorf("student: %s is not differentiable", o.name)
	}
	return o.diff(in, out, grad)
}

func (o *op) outShape(in []gorgonia.Value) (tensor.Shape, error) {
	if len(in) != o.arity {
		return nil, fmt.Errorf("student: %s takes %d inputs, got %d", o.name, o.arity, len(in))
	}
	shapes := make([]tensor.Shape, len(in))
	for i, v := range in {
		shapes[i] = v.Shape()
	}
	return o.shape(shapes)
}

// Do allocates the output and runs the kernel.
func (o *op) Do(in ...gorgonia.Value) (gorgonia.Value, error) {
	s, err := o.outShape(in)
	if err != nil {
		return nil, err
	}
	if s.IsScalar() {
		var out [1]float32
		if err := o.safeRun(out[:], in); err != nil {
			return nil, err
		}
		return gorgonia.NewF32(out[0]), nil
	}
	t := o.out
	if t == nil || !t.Shape().Eq(s) {
		t = tensor.New(tensor.Of(tensor.Float32), tensor.WithShape(s...))
		o.out = t
	}
	if err := o.safeRun(t.Float32s()[:s.TotalSize()], in); err != nil {
		return nil, err
	}
	return t, nil
}

// UsePreallocDo runs the kernel into prealloc, the value the tape machine kept from the
// previous run; it fails (and the machine falls back to Do) when prealloc does not fit.
func (o *op) UsePreallocDo(prealloc gorgonia.Value, in ...gorgonia.Value) (gorgonia.Value, error) {
	s, err := o.outShape(in)
	if err != nil {
		return nil, err
	}
	if s.IsScalar() {
		return o.Do(in...)
	}
	t, ok := prealloc.(*tensor.Dense)
	if !ok || t.Dtype() != tensor.Float32 || !t.Shape().Eq(s) || t.IsMaterializable() {
		return nil, fmt.Errorf("student: %s: preallocated value does not fit %v", o.name, s)
	}
	if err := o.safeRun(t.Float32s()[:s.TotalSize()], in); err != nil {
		return nil, err
	}
	return t, nil
}

func (o *op) safeRun(out []float32, in []gorgonia.Value) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("student: %s: %v", o.name, r)
		}
	}()
	return o.run(out, in)
}

// floats returns the float32 elements of a matrix value.
func floats(v gorgonia.Value) ([]float32, error) {
	t, ok := v.(*tensor.Dense)
	if !ok || t.Dtype() != tensor.Float32 || t.IsMaterializable() {
		return nil, fmt.Errorf("student: want a contiguous float32 tensor, got %T %v", v, v.Dtype())
	}
	return t.Float32s()[:t.Shape().TotalSize()], nil
}

// ints returns the int32 elements of an index matrix value.
func ints(v gorgonia.Value) ([]int32, error) {
	t, ok := v.(*tensor.Dense)
	if !ok || t.Dtype() != tensor.Int32 || t.IsMaterializable() {
		return nil, fmt.Errorf("student: want a contiguous int32 tensor, got %T %v", v, v.Dtype())
	}
	return t.Int32s()[:t.Shape().TotalSize()], nil
}

// scalar returns the value of a float32 scalar.
func scalar(v gorgonia.Value) (float32, error) {
	switch s := v.(type) {
	case *gorgonia.F32:
		return float32(*s), nil
	case *tensor.Dense:
		if s.Dtype() == tensor.Float32 && s.Shape().TotalSize() == 1 {
			return s.Float32s()[0], nil
		}
	}
	return 0, fmt.Errorf("student: want a float32 scalar, got %T", v)
}

// inputs converts the float32 matrix values of in; it fails on any other kind of value.
func inputs(in []gorgonia.Value) ([][]float32, error) {
	out := make([][]float32, len(in))
	for i, v := range in {
		f, err := floats(v)
		if err != nil {
			return nil, err
		}
		out[i] = f
	}
	return out, nil
}

// matShape checks that s is a matrix with cols columns (any cols when cols < 0) and returns
// its row count.
func matShape(name string, s tensor.Shape, cols int) (int, error) {
	if len(s) != 2 || (cols >= 0 && s[1] != cols) {
		return 0, fmt.Errorf("student: %s: input shape %v, want (n, %d)", name, s, cols)
	}
	return s[0], nil
}

// sameShapes checks that all shapes equal the first and are matrices.
func sameShapes(name string, in []tensor.Shape) error {
	for _, s := range in {
		if len(s) != 2 || !s.Eq(in[0]) {
			return fmt.Errorf("student: %s: input shapes %v differ", name, in)
		}
	}
	return nil
}
