package tensor

import (
	"math/rand"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"
)

// threads is the goroutine parallelism of the Go kernels (see SetThreads).
var threads atomic.Int64

func init() { threads.Store(int64(runtime.NumCPU())) }

// SetThreads sets the parallelism of the compute core: the goroutine count of the Go
// kernels and, with the OpenBLAS backend, OpenBLAS's thread count
// (openblas_set_num_threads, a process-wide setting). n <= 0 means runtime.NumCPU().
// Until SetThreads is first called the Go kernels use runtime.NumCPU() goroutines and
// OpenBLAS keeps its own default (OPENBLAS_NUM_THREADS or the core count). With the
// gonum backend the BLAS part sizes itself from GOMAXPROCS and only the Go kernels follow n.
// Safe to call concurrently with kernels; a kernel already running may use either value.
func SetThreads(n int) {
	if n <= 0 {
		n = runtime.NumCPU()
	}
	threads.Store(int64(n))
	single.Lock()
	defer single.Unlock()
	if single.depth > 0 {
		single.restore = n // applied when the last single-threaded section ends
		return
	}
	setBLASThreads(n)
}

// single tracks the sections during which BLAS is held at one thread because the caller
// parallelizes over goroutines itself (see singleBLAS).
var single struct {
	sync.Mutex
	depth   int // sections in progress
	restore int // BLAS thread count to restore when depth drops to 0
}

// singleBLAS restricts BLAS to one thread until the returned function is called. Sections
// may overlap (concurrent kernels); the previous count comes back when the last one ends.
// BLAS products running meanwhile on other goroutines are correct but single-threaded.
func singleBLAS() (done func()) {
	single.Lock()
	if single.depth == 0 {
		single.restore = blasThreads()
		setBLASThreads(1)
	}
	single.depth++
	single.Unlock()
	return func() {
		single.Lock()
		single.depth--
		if single.depth == 0 {
			setBLASThreads(single.restore)
		}
		single.Unlock()
	}
}

// Threads returns the goroutine parallelism of the Go kernels (always >= 1).
func Threads() int { return int(threads.Load()) }

// Backend names the BLAS backend compiled in: "openblas" (cgo build) or
// "gonum (pure Go)" (CGO_ENABLED=0 or build tag purego).
func Backend() string { return backendName }

// MulT sets dst = a·bᵀ, where a is m×k, b is n×k (a weight stored [out,in] as Hugging Face
// does) and dst is m×n. dst is overwritten and must not share storage with a or b.
// b may be a half matrix (BF16 or F16): it is widened to float32 a block of its rows at a
// time inside the product, which accumulates in float32 as for a float32 b. dst and a must
// be float32. It panics on a shape mismatch, aliasing or a half dst or a. The rows of a are
// one sequence: see MulTSeq.
func MulT(dst, a, b *Matrix) { MulTSeq(dst, a, b, a.Rows) }

// MulTSeq is MulT for a batch of sequences of seqLen rows each, stacked in the rows of a
// (a.Rows a multiple of seqLen). The bits of an output row depend only on its row of a, its
// position in its sequence, b and the BLAS kernels: never on the other sequences of the
// batch or on the thread count (see mulInto). It panics on a shape mismatch or aliasing.
func MulTSeq(dst, a, b *Matrix, seqLen int) {
	mustShape("MulT", a.Cols == b.Cols && dst.Rows == a.Rows && dst.Cols == b.Rows,
		"dst %d×%d = a %d×%d · (b %d×%d)ᵀ", dst.Rows, dst.Cols, a.Rows, a.Cols, b.Rows, b.Cols)
	mustShape("MulT", !overlaps(dst, a) && !overlaps(dst, b), "dst aliases an input")
	mustSeq("MulT", a.Rows, seqLen)
	mustF32("MulT", dst, a)
	if b.IsHalf() {
		mulTHalf(dst, a, b, seqLen)
		return
	}
	mulInto(true, dst, a, b, seqLen)
}

// Mul sets dst = a·b, where a is m×k, b is k×n and dst is m×n. dst is overwritten and
// must not share storage with a or b. It panics on a shape mismatch or aliasing. The rows
// of a are one sequence: see MulSeq.
func Mul(dst, a, b *Matrix) { MulSeq(dst, a, b, a.Rows) }

// MulSeq is Mul for a batch of sequences of seqLen rows each, stacked in the rows of a,
// with MulTSeq's guarantee: a row's bits do not depend on the rest of the batch.
func MulSeq(dst, a, b *Matrix, seqLen int) {
	mustShape("Mul", a.Cols == b.Rows && dst.Rows == a.Rows && dst.Cols == b.Cols,
		"dst %d×%d = a %d×%d · b %d×%d", dst.Rows, dst.Cols, a.Rows, a.Cols, b.Rows, b.Cols)
	mustShape("Mul", !overlaps(dst, a) && !overlaps(dst, b), "dst aliases an input")
	mustSeq("Mul", a.Rows, seqLen)
	mustF32("Mul", dst, a, b)
	mulInto(false, dst, a, b, seqLen)
}

// mustSeq checks that rows is a whole number of seqLen-row sequences (0 rows always is).
func mustSeq(op string, rows, seqLen int) {
	mustShape(op, rows == 0 || (seqLen >= 1 && rows%seqLen == 0), "%d rows are not sequences of %d", rows, seqLen)
}

// gemmRowBlock is the row count of the independent products every product is split into.
const gemmRowBlock = 64

// rowBlockScratch holds the padded copies of a product's last, partial row block.
var rowBlockScratch sync.Pool

// mulInto runs the checked product dst = a·op(b) (op(b) = bᵀ when transB) through the BLAS
// backend, a being a batch of seqLen-row sequences.
//
// Every sequence is cut into blocks of gemmRowBlock rows from its first row, each block its
// own BLAS call, whatever the batch and the thread count: the bits of an output row then
// depend only on that row of a, its position in its sequence, b and the backend. OpenBLAS
// picks kernels and tail code from a call's shape, and its kernels round a row differently
// depending on the call's row count (every kernel set measured: Prescott, Haswell,
// SkylakeX, Cooperlake) and, for Haswell, on the row's position inside the call (its
// 12-column micro-tiles compute their two halves differently). So with padRowBlocks a
// sequence's last, partial block is copied into a zero-padded gemmRowBlock-row scratch:
// every call has the same shape and every row the same place in it, whichever windows
// share the batch. The blocks run on up to Threads() goroutines, each a single-threaded
// BLAS call (no BLAS thread pool spinning, and parallelism that composes with the Go
// kernels).
func mulInto(transB bool, dst, a, b *Matrix, seqLen int) {
	m, n, k := dst.Rows, dst.Cols, a.Cols
	if m == 0 || n == 0 {
		return
	}
	if k == 0 {
		clear(dst.Data)
		return
	}
	blocks := rowBlocks(m, seqLen)
	parallelItems(blocks, func(int) {}, func(_, i int) {
		lo, hi := rowBlockRange(i, seqLen)
		rowBlock(transB, lo, hi, n, k, a.Data, b.Data, b.Cols, dst.Data, dst.Cols)
	})
}

// rowBlocks is the number of row blocks of m rows of seqLen-row sequences (see mulInto).
func rowBlocks(m, seqLen int) int { return m / seqLen * ((seqLen + gemmRowBlock - 1) / gemmRowBlock) }

// rowBlockRange returns the rows [lo, hi) of row block i (see mulInto).
func rowBlockRange(i, seqLen int) (lo, hi int) {
	perSeq := (seqLen + gemmRowBlock - 1) / gemmRowBlock
	lo = i/perSeq*seqLen + i%perSeq*gemmRowBlock
	return lo, min(lo+gemmRowBlock, (i/perSeq+1)*seqLen)
}

// rowBlock computes rows [lo, hi) (at most gemmRowBlock) of c = a·op(b) in one BLAS call of
// gemmRowBlock rows: a is row-major with k columns, op(b) is k×n (row stride ldb), c has row
// stride ldc. With padRowBlocks a partial block goes through a zero-padded scratch.
func rowBlock(transB bool, lo, hi, n, k int, a, b []float32, ldb int, c []float32, ldc int) {
	rows := hi - lo
	if rows == gemmRowBlock || !padRowBlocks {
		gemm(false, transB, rows, n, k, 1, a[lo*k:], k, b, ldb, 0, c[lo*ldc:], ldc)
		return
	}
	need := gemmRowBlock * (k + n)
	var buf []float32
	if p, ok := rowBlockScratch.Get().(*[]float32); ok && cap(*p) >= need {
		buf = (*p)[:need]
	} else {
		buf = make([]float32, need)
	}
	pa, pc := buf[:gemmRowBlock*k], buf[gemmRowBlock*k:]
	copy(pa, a[lo*k:hi*k])
	clear(pa[rows*k:])
	gemm(false, transB, gemmRowBlock, n, k, 1, pa, k, b, ldb, 0, pc, n)
	for r := range rows {
		copy(c[(lo+r)*ldc:(lo+r)*ldc+n], pc[r*n:(r+1)*n])
	}
	rowBlockScratch.Put(&buf)
}

// overlaps reports whether the storage of x and y intersects.
func overlaps(x, y *Matrix) bool {
	if len(x.Data) == 0 || len(y.Data) == 0 {
		return false
	}
	x0 := uintptr(unsafe.Pointer(&x.Data[0]))
	y0 := uintptr(unsafe.Pointer(&y.Data[0]))
	x1 := x0 + uintptr(len(x.Data))*4
	y1 := y0 + uintptr(len(y.Data))*4
	return x0 < y1 && y0 < x1
}

// MeasureSgemm times reps square n×n products (after one warm-up run) in single BLAS calls
// using the library's own threading with Threads() threads, and returns the achieved GFLOP/s (2n³ flops per
// product). reps < 1 counts as 1. It panics if n < 1.
func MeasureSgemm(n, reps int) (gflops float64) {
	mustShape("MeasureSgemm", n >= 1, "size %d", n)
	if reps < 1 {
		reps = 1
	}
	rng := rand.New(rand.NewSource(1))
	a, b, c := New(n, n), New(n, n), New(n, n)
	for i := range a.Data {
		a.Data[i] = rng.Float32()*2 - 1
		b.Data[i] = rng.Float32()*2 - 1
	}
	// The machine's sgemm: one BLAS call with the library's own threading.
	nativeBLASThreads(Threads())
	defer setBLASThreads(Threads())
	product := func() { gemm(false, true, n, n, n, 1, a.Data, n, b.Data, n, 0, c.Data, n) }
	product()
	start := time.Now()
	for range reps {
		product()
	}
	el := time.Since(start)
	return 2 * float64(n) * float64(n) * float64(n) * float64(reps) / el.Seconds() / 1e9
}
