package tensor

import (
	"fmt"
	"math/rand"
	"syscall"
	"testing"
	"time"
)

func cpuNow() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// cpuMeter reports CPU time per op (robust to other load on the machine).
func cpuMeter(b *testing.B) func(perOp float64, unit string) {
	c0 := cpuNow()
	return func(div float64, unit string) {
		ns := float64(cpuNow()-c0) / float64(b.N)
		b.ReportMetric(ns, "cpu-ns/op")
		if div > 0 {
			b.ReportMetric(ns/div, unit)
		}
	}
}

func BenchmarkAttentionTune(b *testing.B) {
	const batch, T, heads, kvHeads, hd = 1, 512, 16, 8, 64
	rng := rand.New(rand.NewSource(1))
	q := randMatrix(rng, batch*T, heads*hd)
	k, v := randMatrix(rng, batch*T, kvHeads*hd), randMatrix(rng, batch*T, kvHeads*hd)
	dst := New(batch*T, heads*hd)
	defer func(r int, s bool) { attnRowsPerBlock, attnSerial = r, s }(attnRowsPerBlock, attnSerial)
	for _, serial := range []bool{false, true} {
		for _, rows := range []int{64, 128, 256, 1024} {
			b.Run(fmt.Sprintf("serial=%v/rows=%d", serial, rows), func(b *testing.B) {
				attnRowsPerBlock, attnSerial = rows, serial
				m := cpuMeter(b)
				for b.Loop() {
					Attention(dst, q, k, v, T, heads, kvHeads)
				}
				m(0, "")
				reportGFLOPS(b, attnFlops(batch, T, heads, hd))
			})
		}
	}
}

func BenchmarkSoftmax512(b *testing.B) {
	rng := rand.New(rand.NewSource(1))
	x := randSlice(rng, 512, 3)
	y := make([]float32, 512)
	m := cpuMeter(b)
	for b.Loop() {
		copy(y, x)
		Softmax(y)
	}
	m(512, "cpu-ns/elem")
}

var sinkF float32

func BenchmarkExp32(b *testing.B) {
	x := float32(-3)
	var s float32
	m := cpuMeter(b)
	for b.Loop() {
		for i := range 512 {
			s += exp32(x + float32(i)*0.01)
		}
	}
	sinkF = s
	m(512, "cpu-ns/elem")
}
