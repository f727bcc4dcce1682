package tensor

import (
	"fmt"
	"math/rand"
	"sync"
	"testing"
)

func TestAttentionMatchesNaive(t *testing.T) {
	withThreads(t, func(t *testing.T) {
		rng := rand.New(rand.NewSource(10))
		cases := []struct{ batch, seqLen, heads, kvHeads, hd int }{
			{1, 1, 1, 1, 1}, {2, 1, 4, 2, 3}, {1, 2, 2, 1, 5}, {3, 7, 4, 4, 8},
			{2, 13, 4, 2, 7}, {1, 33, 8, 2, 16}, {2, 65, 4, 1, 9}, {1, 130, 6, 3, 32},
			{1, 200, 4, 2, 64}, {3, 150, 2, 2, 11},
		}
		for range 8 {
			kv := 1 + rng.Intn(3)
			g := []int{1, 2, 4}[rng.Intn(3)]
			cases = append(cases, struct{ batch, seqLen, heads, kvHeads, hd int }{
				1 + rng.Intn(3), 1 + rng.Intn(90), kv * g, kv, 1 + rng.Intn(20)})
		}
		for _, c := range cases {
			n := c.batch * c.seqLen
			q := randMatrix(rng, n, c.heads*c.hd)
			k := randMatrix(rng, n, c.kvHeads*c.hd)
			v := randMatrix(rng, n, c.kvHeads*c.hd)
			for i := range q.Data {
				q.Data[i] *= 4 // peakier softmax
			}
			q0, k0, v0 := q.Clone(), k.Clone(), v.Clone()
			got, want := randMatrix(rng, n, c.heads*c.hd), New(n, c.heads*c.hd)
			Attention(got, q, k, v, c.seqLen, c.heads, c.kvHeads)
			naiveAttention(want, q, k, v, c.seqLen, c.heads, c.kvHeads, 0)
			checkClose(t, fmt.Sprintf("Attention %+v", c), got.Data, want.Data)
			checkUnchanged(t, "q", q, q0)
			checkUnchanged(t, "k", k, k0)
			checkUnchanged(t, "v", v, v0)
		}
	})
}

func TestAttentionBlockSizes(t *testing.T) {
	// The causal blocking must not change results, whatever the block size.
	defer func(b int) { attnRowsPerBlock = b }(attnRowsPerBlock)
	rng := rand.New(rand.NewSource(11))
	q, k, v := randMatrix(rng, 2*37, 4*6), randMatrix(rng, 2*37, 2*6), randMatrix(rng, 2*37, 2*6)
	want := New(2*37, 4*6)
	naiveAttention(want, q, k, v, 37, 4, 2, 0)
	for _, rows := range []int{1, 2, 5, 64, 1000} {
		attnRowsPerBlock = rows
		got := New(2*37, 4*6)
		Attention(got, q, k, v, 37, 4, 2)
		checkClose(t, fmt.Sprintf("rows %d", rows), got.Data, want.Data)
	}
}

// TestAttentionWindowMatchesNaive checks the sliding window against the naive twin over
// windows shorter than, equal to and longer than the sequence, under several block sizes
// (a block's first keys then fall outside some of its queries' windows).
func TestAttentionWindowMatchesNaive(t *testing.T) {
	defer func(b int) { attnRowsPerBlock = b }(attnRowsPerBlock)
	withThreads(t, func(t *testing.T) {
		rng := rand.New(rand.NewSource(13))
		cases := []struct{ batch, seqLen, heads, kvHeads, hd, window int }{
			{1, 1, 1, 1, 1, 1}, {2, 5, 2, 1, 3, 1}, {1, 9, 4, 2, 4, 3}, {2, 37, 4, 2, 6, 8},
			{1, 70, 4, 4, 5, 48}, {1, 20, 2, 1, 4, 20}, {3, 17, 4, 2, 3, 100},
		}
		for range 6 {
			kv := 1 + rng.Intn(3)
			g := []int{1, 2, 4}[rng.Intn(3)]
			T := 1 + rng.Intn(80)
			cases = append(cases, struct{ batch, seqLen, heads, kvHeads, hd, window int }{
				1 + rng.Intn(3), T, kv * g, kv, 1 + rng.Intn(12), 1 + rng.Intn(T+3)})
		}
		for _, rows := range []int{1, 5, 64} {
			attnRowsPerBlock = rows
			for _, c := range cases {
				n := c.batch * c.seqLen
				q := randMatrix(rng, n, c.heads*c.hd)
				k := randMatrix(rng, n, c.kvHeads*c.hd)
				v := randMatrix(rng, n, c.kvHeads*c.hd)
				q0, k0, v0 := q.Clone(), k.Clone(), v.Clone()
				got, want := randMatrix(rng, n, c.heads*c.hd), New(n, c.heads*c.hd)
				AttentionWindow(got, q, k, v, c.seqLen, c.heads, c.kvHeads, c.window)
				naiveAttention(want, q, k, v, c.seqLen, c.heads, c.kvHeads, c.window)
				checkClose(t, fmt.Sprintf("AttentionWindow %+v rows %d", c, rows), got.Data, want.Data)
				checkUnchanged(t, "q", q, q0)
				checkUnchanged(t, "k", k, k0)
				checkUnchanged(t, "v", v, v0)
				if c.window >= c.seqLen { // a window covering the sequence is plain causal attention
					full := New(n, c.heads*c.hd)
					Attention(full, q, k, v, c.seqLen, c.heads, c.kvHeads)
					checkClose(t, fmt.Sprintf("window ≥ seqLen %+v", c), got.Data, full.Data)
				}
			}
		}
	})
	// The window changes results once the sequence is longer than it.
	rng := rand.New(rand.NewSource(14))
	q, k, v := randMatrix(rng, 10, 4), randMatrix(rng, 10, 4), randMatrix(rng, 10, 4)
	a, b := New(10, 4), New(10, 4)
	Attention(a, q, k, v, 10, 1, 1)
	AttentionWindow(b, q, k, v, 10, 1, 1, 3)
	if fmt.Sprint(a.Row(9)) == fmt.Sprint(b.Row(9)) || fmt.Sprint(a.Row(2)) != fmt.Sprint(b.Row(2)) {
		t.Fatal("window 3 should change position 9 and leave position 2 alone")
	}
}

func TestAttentionShapePanics(t *testing.T) {
	mustPanic(t, "window -1", func() { AttentionWindow(New(8, 8), New(8, 8), New(8, 4), New(8, 4), 4, 2, 1, -1) })
	q, kv := New(8, 8), New(8, 4)
	dst := New(8, 8)
	mustPanic(t, "Attention", func() { Attention(dst, q, kv, kv, 3, 2, 1) })        // rows not a multiple
	mustPanic(t, "Attention", func() { Attention(dst, q, kv, kv, 4, 3, 1) })        // 8 cols, 3 heads
	mustPanic(t, "Attention", func() { Attention(dst, q, kv, kv, 4, 2, 3) })        // heads % kvHeads
	mustPanic(t, "Attention", func() { Attention(dst, q, kv, New(8, 8), 4, 2, 1) }) // v width
	mustPanic(t, "Attention", func() { Attention(New(8, 4), q, kv, kv, 4, 2, 1) })  // dst shape
	mustPanic(t, "Attention", func() { Attention(dst, q, New(4, 4), kv, 4, 2, 1) }) // k rows
	mustPanic(t, "Attention", func() { Attention(dst, q, kv, kv, 0, 2, 1) })
	mustPanic(t, "alias", func() { Attention(q, q, kv, kv, 4, 2, 1) })
}

func TestAttentionConcurrent(t *testing.T) {
	// Concurrent calls overlap their single-threaded-BLAS sections; all must be correct and
	// the BLAS thread count must come back afterwards.
	prev := Threads()
	defer SetThreads(prev)
	SetThreads(2)
	before := blasThreads()
	rng := rand.New(rand.NewSource(12))
	q, k, v := randMatrix(rng, 3*40, 4*8), randMatrix(rng, 3*40, 2*8), randMatrix(rng, 3*40, 2*8)
	want := New(3*40, 4*8)
	naiveAttention(want, q, k, v, 40, 4, 2, 0)
	var wg sync.WaitGroup
	bad := make([]bool, 6)
	for g := range bad {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 10 {
				got := New(3*40, 4*8)
				Attention(got, q, k, v, 40, 4, 2)
				for i := range got.Data {
					if !near(got.Data[i], want.Data[i], 0) {
						bad[g] = true
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	for g, b := range bad {
		if b {
			t.Fatalf("goroutine %d got a wrong result", g)
		}
	}
	if got := blasThreads(); got != before {
		t.Fatalf("BLAS threads %d after concurrent Attention, want %d", got, before)
	}
}

func TestSingleBLASSections(t *testing.T) {
	prev := Threads()
	defer SetThreads(prev)
	SetThreads(3)
	want := blasThreads() // 3 with OpenBLAS, 1 with gonum (no setting of its own)
	end1 := singleBLAS()
	end2 := singleBLAS()
	if blasThreads() != 1 {
		t.Fatalf("BLAS threads %d inside a section", blasThreads())
	}
	end1()
	if blasThreads() != 1 {
		t.Fatalf("BLAS threads %d while a section remains", blasThreads())
	}
	SetThreads(2) // deferred to the end of the last section
	if blasThreads() != 1 || Threads() != 2 {
		t.Fatalf("BLAS threads %d, Threads %d after SetThreads inside a section", blasThreads(), Threads())
	}
	end2()
	if want == 3 {
		want = 2
	}
	if blasThreads() != want {
		t.Fatalf("BLAS threads %d after the sections, want %d", blasThreads(), want)
	}
}
