package student

import (
	"fmt"
	"sync"
	"sync/atomic"

	"linearpatch/model/tensor"
)

// gemmCols is the column block of the student's parallel products (psgemm): a product is
// cut into blocks of gemmCols output columns from its first column, each one BLAS call over
// all the rows. The cut depends on the shapes alone, never on the thread count, so neither
// do the bits; and the student's products are all over one window (T rows, or d rows for
// dL/dP), so a window's bits never depend on the rest of its step. Measured on the d=1024
// shapes (OpenBLAS, single-threaded per call): whole-row blocks of 256 columns cost about
// 8% more CPU than one call, 64-row blocks (the engine's cut, for batch independence)
// about 50% more, since every call packs the other operand again.
const gemmCols = 256

// psgemm is sgemm (c = alpha·op(a)·op(b) + beta·c, row-major) with c's n columns cut into
// gemmCols-column blocks that run on up to tensor.Threads() goroutines. OpenBLAS itself
// runs single-threaded (the engine's setting, see model/tensor): the parallelism is here.
func psgemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int,
	b []float32, ldb int, beta float32, c []float32, ldc int) {
	if m == 0 || n == 0 {
		return
	}
	forEach((n+gemmCols-1)/gemmCols, func(i int) {
		lo := i * gemmCols
		cols := min(gemmCols, n-lo)
		var bb []float32
		if transB {
			bb = b[lo*ldb:]
		} else {
			bb = b[lo:]
		}
		sgemm(transA, transB, m, cols, k, alpha, a, lda, bb, ldb, beta, c[lo:], ldc)
	})
}

// forEach runs fn(i) for every i in [0, n) on up to tensor.Threads() goroutines (the
// caller's among them), which take the items in order from a shared counter. A panic in fn
// is re-raised on the caller's goroutine once all have stopped (so that an op's recover
// turns it into an error).
func forEach(n int, fn func(i int)) {
	w := min(tensor.Threads(), n)
	if w <= 1 {
		for i := range n {
			fn(i)
		}
		return
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Value
	run := func() {
		defer func() {
			if r := recover(); r != nil {
				failed.CompareAndSwap(nil, fmt.Sprint(r))
				next.Store(int64(n)) // the others stop at their next item
			}
		}()
		for {
			i := int(next.Add(1) - 1)
			if i >= n {
				return
			}
			fn(i)
		}
	}
	for range w - 1 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			run()
		}()
	}
	run()
	wg.Wait()
	if r := failed.Load(); r != nil {
		panic(r)
	}
}
