//go:build cgo && !purego

package tensor

/*
#cgo CFLAGS: -I/usr/include/x86_64-linux-gnu/openblas-pthread
#cgo LDFLAGS: -lopenblas
#include <cblas.h>
*/
import "C"

import "unsafe"

const backendName = "openblas"

// gemm computes, in row-major order, c = alpha·op(a)·op(b) + beta·c where op(a) is m×k and
// op(b) is k×n; transA/transB select the transpose. The caller has checked the shapes and
// handled m, n or k equal to zero.
func gemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int,
	b []float32, ldb int, beta float32, c []float32, ldc int) {
	ta, tb := uint32(C.CblasNoTrans), uint32(C.CblasNoTrans)
	if transA {
		ta = uint32(C.CblasTrans)
	}
	if transB {
		tb = uint32(C.CblasTrans)
	}
	C.cblas_sgemm(C.CblasRowMajor, C.enum_CBLAS_TRANSPOSE(ta), C.enum_CBLAS_TRANSPOSE(tb),
		C.blasint(m), C.blasint(n), C.blasint(k), C.float(alpha),
		(*C.float)(unsafe.Pointer(&a[0])), C.blasint(lda),
		(*C.float)(unsafe.Pointer(&b[0])), C.blasint(ldb), C.float(beta),
		(*C.float)(unsafe.Pointer(&c[0])), C.blasint(ldc))
}

// padRowBlocks: OpenBLAS chooses kernels and tail code from a call's shape, so mulInto gives
// every call exactly gemmRowBlock rows (see mulInto). OpenBLAS runs single-threaded and
// mulInto splits products across goroutines itself. Measured here, this matches OpenBLAS's
// own threading on large products and avoids its pool's spinning (seconds of system time)
// on the many small products of a small model, and it composes with the Go kernels'
// goroutines.
const padRowBlocks = true

func init() { C.openblas_set_num_threads(1) }

// setBLASThreads keeps OpenBLAS at one thread: the parallelism is the goroutines'.
func setBLASThreads(int) { C.openblas_set_num_threads(1) }

// nativeBLASThreads sets OpenBLAS's own (process-wide) thread count; for benchmarks only.
func nativeBLASThreads(n int) { C.openblas_set_num_threads(C.int(n)) }

// blasThreads returns OpenBLAS's current thread count.
func blasThreads() int { return int(C.openblas_get_num_threads()) }

// BLASCore names the kernel set OpenBLAS runs on this CPU (openblas_get_corename: for
// example "Haswell", "SkylakeX" or "Prescott"; OPENBLAS_CORETYPE can force one).
func BLASCore() string { return C.GoString(C.openblas_get_corename()) }
