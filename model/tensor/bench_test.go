package tensor

import (
	"fmt"
	"math/rand"
	"testing"
)

func reportGFLOPS(b *testing.B, flopsPerOp float64) {
	b.ReportMetric(flopsPerOp*float64(b.N)/float64(b.Elapsed().Nanoseconds()), "GFLOP/s")
}

func BenchmarkSgemm(b *testing.B) {
	for _, s := range [][3]int{{1024, 1024, 1024}, {512, 2816, 1024}, {512, 1024, 2816}} {
		m, n, k := s[0], s[1], s[2]
		b.Run(fmt.Sprintf("%dx%dx%d", m, n, k), func(b *testing.B) {
			rng := rand.New(rand.NewSource(1))
			a, w, c := randMatrix(rng, m, k), randMatrix(rng, n, k), New(m, n)
			for b.Loop() {
				MulT(c, a, w)
			}
			reportGFLOPS(b, 2*float64(m)*float64(n)*float64(k))
		})
	}
}

// attnFlops counts the useful (lower-triangle) multiply-adds of causal attention.
func attnFlops(batch, T, heads, hd int) float64 {
	return float64(batch*heads) * 2 * 2 * float64(hd) * float64(T) * float64(T+1) / 2
}

func BenchmarkAttention(b *testing.B) {
	const batch, T, heads, kvHeads, hd = 1, 512, 16, 8, 64
	rng := rand.New(rand.NewSource(1))
	q := randMatrix(rng, batch*T, heads*hd)
	k, v := randMatrix(rng, batch*T, kvHeads*hd), randMatrix(rng, batch*T, kvHeads*hd)
	dst := New(batch*T, heads*hd)
	for b.Loop() {
		Attention(dst, q, k, v, T, heads, kvHeads)
	}
	reportGFLOPS(b, attnFlops(batch, T, heads, hd))
}

func BenchmarkElementwise(b *testing.B) {
	const rows, d, ffn = 512, 1024, 2816
	rng := rand.New(rand.NewSource(1))
	x, w := randMatrix(rng, rows, d), randSlice(rng, d, 1)
	xo := New(rows, d)
	gate, up := randMatrix(rng, rows, ffn), randMatrix(rng, rows, ffn)
	out := New(rows, ffn)
	rope := NewRope(llamaInvFreq(64, 10000), rows) // rotating in place keeps norms
	b.Run("RMSNorm", func(b *testing.B) {
		for b.Loop() {
			RMSNorm(xo, x, w, 1e-5)
		}
	})
	b.Run("SwiGLU", func(b *testing.B) {
		for b.Loop() {
			SwiGLU(out, gate, up)
		}
	})
	b.Run("Rope", func(b *testing.B) {
		for b.Loop() {
			rope.Apply(x, 16, rows)
		}
	})
}
