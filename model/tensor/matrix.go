// Package tensor holds the engine's compute core: float32 row-major matrices and the
// kernels the LLaMA forward pass needs (matmul through BLAS, RMSNorm, RoPE, causal
// grouped-query attention, SwiGLU, softmax). Every optimized kernel has a naive twin
// in naive.go that the tests compare it against.
//
// Kernels write into their first argument. A shape mismatch is a caller bug and panics
// (as in gonum's (*Dense).Mul); kernels never return errors.
package tensor

import "fmt"

// Matrix is a dense matrix in row-major order. A float32 matrix (DType F32, the zero value)
// holds element (r, c) in Data[r*Cols+c], and len(Data) is always Rows*Cols. A weight may
// instead be kept in half precision (DType BF16 or F16, made by FromHalf): its elements are
// the bits in Half (len(Half) == Rows*Cols) and Data is nil. Half matrices are read-only
// operands: MulT takes one as its right-hand side and widens it block by block, RowF32 and
// RowsF32 widen rows; every other kernel wants float32 matrices and panics on a half one.
type Matrix struct {
	Rows, Cols int
	Data       []float32
	Half       []uint16 // BF16 or F16 bits when DType is not F32; may alias a file mapping
	DType      DType

	owner any // keeps the memory Half points into alive (a file mapping); nil otherwise
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

// FromHalf wraps data (not copied), the BF16 or F16 bits of a rows×cols matrix, as a half
// matrix. owner, when non-nil, is kept reachable as long as the matrix is: pass what keeps
// data's memory valid (a file mapping released by a cleanup). It panics if dt is F32 or
// len(data) != rows*cols.
func FromHalf(rows, cols int, dt DType, data []uint16, owner any) *Matrix {
	if dt != BF16 && dt != F16 {
		panic(fmt.Sprintf("tensor: FromHalf: dtype %v is not a half-precision type", dt))
	}
	if rows < 0 || cols < 0 || len(data) != rows*cols {
		panic(fmt.Sprintf("tensor: %d values for shape %d×%d", len(data), rows, cols))
	}
	return &Matrix{Rows: rows, Cols: cols, Half: data, DType: dt, owner: owner}
}

// IsHalf reports whether m keeps its elements in half precision (Half, not Data).
func (m *Matrix) IsHalf() bool { return m.DType != F32 }

// Row returns row r as a slice aliasing the matrix's storage. It panics on a half matrix
// (use RowF32).
func (m *Matrix) Row(r int) []float32 {
	if m.IsHalf() {
		panic(fmt.Sprintf("tensor: Row of a %v matrix (use RowF32)", m.DType))
	}
	return m.Data[r*m.Cols : (r+1)*m.Cols]
}

// RowF32 returns row r as float32: a slice aliasing Data for a float32 matrix, else buf
// (len(buf) >= Cols) filled with the widened row. It panics when r is out of range.
func (m *Matrix) RowF32(r int, buf []float32) []float32 { return m.RowsF32(r, r+1, buf) }

// RowsF32 returns rows [lo, hi) as a row-major float32 slice: aliasing Data for a float32
// matrix, else buf[:(hi-lo)·Cols] filled with the widened rows (exact: every half value is
// a float32). It panics when the range is invalid or buf is too short for a half matrix.
func (m *Matrix) RowsF32(lo, hi int, buf []float32) []float32 {
	if lo < 0 || hi > m.Rows || lo > hi {
		panic(fmt.Sprintf("tensor: rows [%d, %d) of a %d-row matrix", lo, hi, m.Rows))
	}
	if !m.IsHalf() {
		return m.Data[lo*m.Cols : hi*m.Cols]
	}
	n := (hi - lo) * m.Cols
	mustShape("RowsF32", len(buf) >= n, "buffer of %d values for %d", len(buf), n)
	WidenHalf(buf[:n], m.Half[lo*m.Cols:hi*m.Cols], m.DType)
	return buf[:n]
}

// F32 returns m itself when it is float32, else a new float32 matrix with the widened values.
func (m *Matrix) F32() *Matrix {
	if !m.IsHalf() {
		return m
	}
	c := New(m.Rows, m.Cols)
	WidenHalf(c.Data, m.Half, m.DType)
	return c
}

// Clone returns a deep copy of m, in m's dtype (a half matrix's copy owns its own memory).
func (m *Matrix) Clone() *Matrix {
	if m.IsHalf() {
		return &Matrix{Rows: m.Rows, Cols: m.Cols, Half: append([]uint16(nil), m.Half...), DType: m.DType}
	}
	c := New(m.Rows, m.Cols)
	copy(c.Data, m.Data)
	return c
}

// mustF32 panics unless every matrix given keeps float32 elements.
func mustF32(op string, ms ...*Matrix) {
	for _, m := range ms {
		mustShape(op, !m.IsHalf(), "a %v operand where float32 is needed", m.DType)
	}
}

// SameShape reports whether m and o have equal dimensions.
func (m *Matrix) SameShape(o *Matrix) bool { return m.Rows == o.Rows && m.Cols == o.Cols }

func mustShape(op string, ok bool, format string, args ...any) {
	if !ok {
		panic("tensor: " + op + ": " + fmt.Sprintf(format, args...))
	}
}
