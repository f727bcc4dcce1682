//go:build cgo && !purego

package student

import (
	"gonum.org/v1/netlib/blas/netlib"
	"gorgonia.org/gorgonia"
)

// BLASBackend names the BLAS behind gorgonia's matmuls and the student's custom ops.
const BLASBackend = "openblas (gonum netlib)"

// init points gorgonia (a process-wide setting) at OpenBLAS through gonum's cgo netlib
// bindings, as the engine uses OpenBLAS. netlib declares no link flags of its own: the
// -lopenblas of linearpatch/model/tensor, which this package imports, resolves it.
func init() { gorgonia.Use(netlib.Implementation{}) }
