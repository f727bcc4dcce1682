package tensor

import (
	"sync"
	"sync/atomic"
)

// parallelFor runs fn over [0,n) split into contiguous chunks of at least grain items,
// on up to Threads() goroutines, and returns when all chunks are done. Small n runs inline.
func parallelFor(n, grain int, fn func(lo, hi int)) {
	if n <= 0 {
		return
	}
	w := min(Threads(), (n+grain-1)/max(grain, 1))
	if w <= 1 {
		fn(0, n)
		return
	}
	var wg sync.WaitGroup
	per := (n + w - 1) / w
	for lo := per; lo < n; lo += per {
		wg.Add(1)
		go func(lo, hi int) {
			defer wg.Done()
			fn(lo, hi)
		}(lo, min(lo+per, n))
	}
	fn(0, min(per, n))
	wg.Wait()
}

// parallelItems runs fn(worker, i) for every i in [0,n) on w = min(Threads(), n)
// goroutines (the caller's among them) that take items in order from a shared counter, and
// returns when all are done. It first calls setup(w) so that the caller can allocate
// per-worker scratch; worker is in [0, w).
func parallelItems(n int, setup func(workers int), fn func(worker, i int)) {
	if n <= 0 {
		return
	}
	w := min(Threads(), n)
	setup(w)
	if w <= 1 {
		for i := range n {
			fn(0, i)
		}
		return
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	run := func(worker int) {
		for {
			i := int(next.Add(1) - 1)
			if i >= n {
				return
			}
			fn(worker, i)
		}
	}
	for worker := 1; worker < w; worker++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			run(worker)
		}()
	}
	run(0)
	wg.Wait()
}
