package shards

import (
	"errors"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
)

func TestTopKVsNaive(t *testing.T) {
	r := rand.New(rand.NewPCG(4, 4))
	for iter := range 3000 {
		V := 1 + r.IntN(300)
		if iter%100 == 0 {
			V = 1 + r.IntN(5000)
		}
		k := 1 + r.IntN(min(V, 64))
		logits := make([]float32, V)
		for i := range logits {
			switch r.IntN(10) {
			case 0:
				logits[i] = float32(r.IntN(3)) // ties
			case 1:
				if iter%7 == 0 {
					logits[i] = float32(math.NaN())
				} else {
					logits[i] = float32(math.Inf(-1))
				}
			default:
				logits[i] = float32(3 * r.NormFloat64())
			}
		}
		orig := slices.Clone(logits)
		idx, prob := make([]int32, k), make([]float32, k)
		nIdx, nProb := make([]int32, k), make([]float32, k)
		TopK(logits, k, idx, prob)
		topKNaive(logits, k, nIdx, nProb)
		for i := range logits {
			if math.Float32bits(logits[i]) != math.Float32bits(orig[i]) {
				t.Fatal("TopK modified its input")
			}
		}
		if !slices.Equal(idx, nIdx) {
			t.Fatalf("V %d k %d: indices %v, naive %v", V, k, idx, nIdx)
		}
		for j := range prob {
			if math.Float32bits(prob[j]) != math.Float32bits(nProb[j]) {
				t.Fatalf("V %d k %d: prob %v, naive %v", V, k, prob, nProb)
			}
		}
	}
}

func TestTopKSoftmax(t *testing.T) {
	logits := []float32{0, 2, 1, 2, -1}
	idx, prob := make([]int32, 3), make([]float32, 3)
	TopK(logits, 3, idx, prob)
	if !slices.Equal(idx, []int32{1, 3, 2}) {
		t.Fatalf("indices %v", idx)
	}
	e := math.Exp(-1)
	want := []float64{1 / (2 + e), 1 / (2 + e), e / (2 + e)}
	for j := range want {
		if math.Abs(float64(prob[j])-want[j]) > 1e-7 {
			t.Fatalf("prob %v, want %v", prob, want)
		}
	}
}

func TestTopKPanics(t *testing.T) {
	for _, tc := range []struct{ v, k, ni, np int }{{5, 0, 0, 0}, {5, 6, 6, 6}, {5, 2, 1, 2}, {5, 2, 2, 3}} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("TopK(V %d, k %d, %d, %d) did not panic", tc.v, tc.k, tc.ni, tc.np)
				}
			}()
			TopK(make([]float32, tc.v), tc.k, make([]int32, tc.ni), make([]float32, tc.np))
		}()
	}
}

func TestTopKQuantizer(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 5))
	for _, vocab := range []int{50, 1000, 32000, 70000, 1 << 24} {
		for _, k := range []int{1, 2, 50} {
			hiW := testMeta(Float16, 1, k, vocab, false).hiWidth()
			lo, hi, q := make([]byte, k), make([]byte, k*hiW), make([]byte, k)
			s := newTopKScratch(k)
			idx, prob := make([]int32, k), make([]float32, k)
			gotIdx, gotProb := make([]int32, k), make([]float32, k)
			var klSum float64
			const n = 200
			for range n {
				// Distinct ids, some at the vocabulary's ends; an LM-like distribution.
				seen := map[int32]bool{}
				for j := range idx {
					for {
						id := int32(r.IntN(vocab))
						switch r.IntN(20) {
						case 0:
							id = 0
						case 1:
							id = int32(vocab - 1)
						}
						if !seen[id] {
							seen[id] = true
							idx[j] = id
							break
						}
					}
				}
				var sum float64
				for j := range prob {
					p := math.Exp(3 * r.NormFloat64())
					if j == 0 && r.IntN(3) == 0 {
						p *= 1e6 // a dominant token
					}
					prob[j] = float32(p)
					sum += p
				}
				for j := range prob {
					prob[j] = float32(float64(prob[j]) / sum)
				}
				inIdx, inProb := slices.Clone(idx), slices.Clone(prob)
				if err := encodeTopK(idx, prob, vocab, hiW, lo, hi, q, s); err != nil {
					t.Fatal(err)
				}
				if !slices.Equal(idx, inIdx) || !slices.Equal(prob, inProb) {
					t.Fatal("encodeTopK modified its input")
				}
				if !decodeTopK(lo, hi, q, vocab, hiW, gotIdx, gotProb) {
					t.Fatalf("vocab %d: decode failed", vocab)
				}
				a, b := slices.Clone(idx), slices.Clone(gotIdx)
				slices.Sort(a)
				slices.Sort(b)
				if !slices.Equal(a, b) {
					t.Fatalf("vocab %d k %d: ids %v decoded as %v", vocab, k, a, b)
				}
				klSum += topKKL(t, idx, prob, gotIdx, gotProb)
			}
			if kl := klSum / n; kl > 1e-3 {
				t.Errorf("vocab %d k %d: mean KL %.3g > 1e-3", vocab, k, kl)
			}
		}
	}
}

func TestEncodeTopKErrors(t *testing.T) {
	s := newTopKScratch(3)
	b := make([]byte, 6)
	for _, tc := range []struct {
		name string
		idx  []int32
		prob []float32
	}{
		{"repeated id", []int32{4, 2, 4}, []float32{.5, .3, .2}},
		{"id beyond vocab", []int32{4, 2, 10}, []float32{.5, .3, .2}},
		{"negative id", []int32{4, -1, 3}, []float32{.5, .3, .2}},
		{"negative prob", []int32{4, 2, 3}, []float32{.5, -.3, .2}},
		{"NaN prob", []int32{4, 2, 3}, []float32{.5, float32(math.NaN()), .2}},
		{"zero sum", []int32{4, 2, 3}, []float32{0, 0, 0}},
	} {
		if err := encodeTopK(tc.idx, tc.prob, 10, 1, b[:3], b[3:], make([]byte, 3), s); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
}

func BenchmarkTopK(b *testing.B) {
	r := rand.New(rand.NewPCG(6, 6))
	logits := make([]float32, 32000)
	lmLogits(r, logits)
	idx, prob := make([]int32, 50), make([]float32, 50)
	b.SetBytes(int64(4 * len(logits)))
	for b.Loop() {
		TopK(logits, 50, idx, prob)
	}
}
