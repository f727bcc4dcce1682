//go:build !cgo || purego

package tensor

import (
	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/gonum"
)

const backendName = "gonum (pure Go)"

var impl gonum.Implementation

// gemm computes, in row-major order, c = alpha·op(a)·op(b) + beta·c where op(a) is m×k and
// op(b) is k×n; transA/transB select the transpose. The caller has checked the shapes and
// handled m, n or k equal to zero.
func gemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int,
	b []float32, ldb int, beta float32, c []float32, ldc int) {
	ta, tb := blas.NoTrans, blas.NoTrans
	if transA {
		ta = blas.Trans
	}
	if transB {
		tb = blas.Trans
	}
	impl.Sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

// setBLASThreads is a no-op: gonum's Sgemm sizes its own goroutine pool from GOMAXPROCS.
func setBLASThreads(int) {}

// padRowBlocks: gonum's Sgemm computes each output element with the same loops whatever
// the row count of the call (its kernel choice depends on the column and inner sizes, and
// on the row count only through blocks that mulInto already fixes at gemmRowBlock rows), so
// a partial row block needs no padding.
const padRowBlocks = false

func nativeBLASThreads(int) {}

// blasThreads reports 1: gonum has no thread setting of its own.
func blasThreads() int { return 1 }

// BLASCore names the BLAS kernels: gonum's Go and assembly code in this build.
func BLASCore() string { return "gonum" }
