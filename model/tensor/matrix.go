// Package tensor holds the engine's compute core: float32 row-major matrices and the
// kernels the LLaMA forward pass needs (matmul through BLAS, RMSNorm, RoPE, causal
// grouped-query attention, SwiGLU, softmax). Every optimized kernel has a naive twin
// in naive.go that the tests compare it against.
//
// Kernels write into their first argument. A shape mismatch is a caller bug and panics
// (as in gonum's (*Dense).Mul); kernels never return errors.
package tensor

import "fmt"

// Matrix is a dense float32 matrix in row-major order: element (r, c) is Data[r*Cols+c].
// Len(Data) is always Rows*Cols.
type Matrix struct {
	Rows, Cols int
	Data       []float32
}

// New returns a zeroed rows×cols matrix. It panics if either dimension is negative.
func New(rows, cols int) *Matrix {
	if rows < 0 || cols < 0 {
		panic(fmt.Sprintf("tensor: negative shape %d×%d", rows, cols))
	}
	return &Matrix{Rows: rows, Cols: cols, Data: make([]float32, rows*cols)}
}

// FromData wraps data (not copied) as a rows×cols matrix. It panics if len(data) != rows*cols.
func FromData(rows, cols int, data []float32) *Matrix {
	if rows < 0 || cols < 0 || len(data) != rows*cols {
		panic(fmt.Sprintf("tensor: %d values for shape %d×%d", len(data), rows, cols))
	}
	return &Matrix{Rows: rows, Cols: cols, Data: data}
}

// Row returns row r as a slice aliasing the matrix's storage.
func (m *Matrix) Row(r int) []float32 { return m.Data[r*m.Cols : (r+1)*m.Cols] }

// Clone returns a deep copy of m.
func (m *Matrix) Clone() *Matrix {
	c := New(m.Rows, m.Cols)
	copy(c.Data, m.Data)
	return c
}

// SameShape reports whether m and o have equal dimensions.
func (m *Matrix) SameShape(o *Matrix) bool { return m.Rows == o.Rows && m.Cols == o.Cols }

func mustShape(op string, ok bool, format string, args ...any) {
	if !ok {
		panic("tensor: " + op + ": " + fmt.Sprintf(format, args...))
	}
}
