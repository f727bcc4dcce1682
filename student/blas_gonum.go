//go:build !cgo || purego

package student

// BLASBackend names the BLAS behind gorgonia's matmuls and the student's custom ops: in
// the pure-Go build, gorgonia's default, gonum's native implementation.
const BLASBackend = "gonum (pure Go)"
