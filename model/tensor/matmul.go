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
// It panics on a shape mismatch or aliasing.
func MulT(dst, a, b *Matrix) {
	mustShape("MulT", a.Cols == b.Cols && dst.Rows == a.Rows && dst.Cols == b.Rows,
		"dst %d×%d = a %d×%d · (b %d×%d)ᵀ", dst.Rows, dst.Cols, a.Rows, a.Cols, b.Rows, b.Cols)
	mustShape("MulT", !overlaps(dst, a) && !overlaps(dst, b), "dst aliases an input")
	mulInto(false, true, dst, a, b)
}

// Mul sets dst = a·b, where a is m×k, b is k×n and dst is m×n. dst is overwritten and
// must not share storage with a or b. It panics on a shape mismatch or aliasing.
func Mul(dst, a, b *Matrix) {
	mustShape("Mul", a.Cols == b.Rows && dst.Rows == a.Rows && dst.Cols == b.Cols,
		"dst %d×%d = a %d×%d · b %d×%d", dst.Rows, dst.Cols, a.Rows, a.Cols, b.Rows, b.Cols)
	mustShape("Mul", !overlaps(dst, a) && !overlaps(dst, b), "dst aliases an input")
	mulInto(false, false, dst, a, b)
}

// gemmRowBlock is the row count of the independent products a large product is split into.
const gemmRowBlock = 64

// mulInto runs the checked product dst = a·op(b) through the BLAS backend.
func mulInto(transA, transB bool, dst, a, b *Matrix) {
	m, n, k := dst.Rows, dst.Cols, a.Cols
	if m == 0 || n == 0 {
		return
	}
	if k == 0 {
		clear(dst.Data)
		return
	}
	if goSplitsGemm && !transA && m*n*k >= 1<<18 {
		// Split the rows of a and dst across goroutines, each a single-threaded BLAS call:
		// no BLAS thread pool spinning, and parallelism that composes with the Go kernels.
		// Blocks of gemmRowBlock rows whatever the thread count, so every row's result is
		// bit-identical however many threads run (teachers rely on this).
		blocks := (m + gemmRowBlock - 1) / gemmRowBlock
		parallelItems(blocks, func(int) {}, func(_, i int) {
			lo, hi := i*gemmRowBlock, min((i+1)*gemmRowBlock, m)
			gemm(false, transB, hi-lo, n, k, 1, a.Data[lo*a.Cols:], a.Cols, b.Data, b.Cols, 0, dst.Data[lo*dst.Cols:], dst.Cols)
		})
		return
	}
	gemm(transA, transB, m, n, k, 1, a.Data, a.Cols, b.Data, b.Cols, 0, dst.Data, dst.Cols)
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
