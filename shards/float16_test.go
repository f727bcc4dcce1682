package shards

import (
	"errors"
	"math"
	"math/big"
	"math/rand/v2"
	"strings"
	"testing"
)

func TestFloat16RoundTripExhaustive(t *testing.T) {
	tab := f16Table()
	for h := range 1 << 16 {
		f := f16ToF32(uint16(h))
		if math.Float32bits(tab[h]) != math.Float32bits(f) {
			t.Fatalf("table[%#04x] = %v, want %v", h, tab[h], f)
		}
		back := f32ToF16(math.Float32bits(f))
		if f != f { // NaN: stays a NaN with the same sign
			if back&0x7c00 != 0x7c00 || back&0x3ff == 0 || back&0x8000 != uint16(h)&0x8000 {
				t.Fatalf("NaN %#04x → %#04x", h, back)
			}
			continue
		}
		if back != uint16(h) {
			t.Fatalf("%#04x → %v → %#04x", h, f, back)
		}
	}
}

func TestBFloat16RoundTripExhaustive(t *testing.T) {
	for h := range 1 << 16 {
		var f [1]float32
		FromBFloat16(f[:], []uint16{uint16(h)})
		if math.Float32bits(f[0]) != uint32(h)<<16 {
			t.Fatalf("%#04x widened to %#08x", h, math.Float32bits(f[0]))
		}
		back := f32ToBF16(math.Float32bits(f[0]))
		if f[0] != f[0] {
			if back&0x7f80 != 0x7f80 || back&0x7f == 0 {
				t.Fatalf("NaN %#04x → %#04x", h, back)
			}
			continue
		}
		if back != uint16(h) {
			t.Fatalf("%#04x → %v → %#04x", h, f[0], back)
		}
	}
}

// nearestNaive returns the bit pattern of the finite 16-bit value nearest x (ties to the
// even pattern), by exact rational comparison against every candidate: the twin of the
// fast converters. widen maps a pattern to its value; patterns run over the positive
// finite range [0, maxPat].
func nearestNaive(x float32, widen func(uint16) float32, maxPat uint16) uint16 {
	ax := new(big.Rat).SetFloat64(math.Abs(float64(x)))
	// Binary search the largest pattern with value ≤ |x| (values increase with patterns).
	lo, hi := 0, int(maxPat)
	for lo < hi {
		mid := (lo + hi + 1) / 2
		if new(big.Rat).SetFloat64(float64(widen(uint16(mid)))).Cmp(ax) <= 0 {
			lo = mid
		} else {
			hi = mid - 1
		}
	}
	best := uint16(lo)
	if lo < int(maxPat) {
		a := new(big.Rat).SetFloat64(float64(widen(uint16(lo))))
		b := new(big.Rat).SetFloat64(float64(widen(uint16(lo + 1))))
		da := new(big.Rat).Sub(ax, a)
		db := new(big.Rat).Sub(b, ax)
		if c := da.Cmp(db); c > 0 || (c == 0 && lo&1 == 1) {
			best = uint16(lo + 1)
		}
	}
	if math.Signbit(float64(x)) {
		best |= 0x8000
	}
	return best
}

func TestFloat16RoundingVsNaive(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 1))
	cases := []float32{0, 1, 1 + 1.0/2048, 1 + 3.0/2048, 65504, 65503.99, -65504, 1.0 / (1 << 24), 1.0 / (1 << 25),
		1.0/(1<<25) + 1e-12, 3.0 / (1 << 25), 6.1035156e-05, 6.1e-05, 5.9604645e-08, 2049, 2051, -0.33333334}
	for range 20000 {
		// Random bits within the float16 range, plus exact halfway points.
		b := r.Uint32() & 0x7fffffff
		f := math.Float32frombits(b)
		if f > 65504 || f != f {
			continue
		}
		if r.IntN(2) == 0 {
			f = -f
		}
		cases = append(cases, f)
		h := f32ToF16(math.Float32bits(f))
		if h&0x7fff < 0x7bff {
			mid := (float64(f16ToF32(h)) + float64(f16ToF32(h+1))) / 2
			cases = append(cases, float32(mid))
		}
	}
	for _, f := range cases {
		want := nearestNaive(f, f16ToF32, 0x7bff)
		var got [1]uint16
		if err := ToFloat16(got[:], []float32{f}); err != nil {
			t.Fatalf("%v: %v", f, err)
		}
		if got[0] != want && !(f == 0 && got[0]&0x7fff == 0) {
			t.Fatalf("ToFloat16(%v) = %#04x (%v), want %#04x (%v)", f, got[0], f16ToF32(got[0]), want, f16ToF32(want))
		}
	}
}

func TestBFloat16RoundingVsNaive(t *testing.T) {
	r := rand.New(rand.NewPCG(2, 2))
	widen := func(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }
	cases := []float32{0, 1, 1 + 1.0/256, 1 + 3.0/256, MaxBFloat16, -MaxBFloat16, 1e-40, 1e-45}
	for range 20000 {
		f := math.Float32frombits(r.Uint32() & 0x7fffffff)
		if f > MaxBFloat16 || f != f {
			continue
		}
		cases = append(cases, f, -f, math.Float32frombits(math.Float32bits(f)&0xffff0000|0x8000))
	}
	for _, f := range cases {
		want := nearestNaive(f, widen, 0x7f7f)
		var got [1]uint16
		if err := ToBFloat16(got[:], []float32{f}); err != nil {
			t.Fatalf("%v: %v", f, err)
		}
		if got[0] != want && !(f == 0 && got[0]&0x7fff == 0) {
			t.Fatalf("ToBFloat16(%v) = %#04x, want %#04x", f, got[0], want)
		}
	}
}

func TestConversionErrors(t *testing.T) {
	dst := make([]uint16, 4)
	tests := []struct {
		name string
		to   func([]uint16, []float32) error
		src  []float32
		want error
		msg  []string
	}{
		{"f16 overflow", ToFloat16, []float32{1, 65505, -70000, 2}, ErrOverflow, []string{"70000", "bfloat16", "float32", "element 2"}},
		{"f16 largest", ToFloat16, []float32{65504, -65504, 0, 1}, nil, nil},
		{"f16 NaN", ToFloat16, []float32{1, float32(math.NaN()), 0, 1}, ErrInvalid, []string{"non-finite"}},
		{"f16 Inf", ToFloat16, []float32{float32(math.Inf(1)), 0, 0, 1}, ErrInvalid, []string{"non-finite"}},
		{"bf16 overflow", ToBFloat16, []float32{math.MaxFloat32, 0, 0, 1}, ErrOverflow, []string{"float32"}},
		{"bf16 large ok", ToBFloat16, []float32{1e38, 65505, -70000, 2}, nil, nil},
		{"bf16 NaN", ToBFloat16, []float32{float32(math.NaN()), 0, 0, 1}, ErrInvalid, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.to(dst, tc.src)
			if !errors.Is(err, tc.want) || (tc.want == nil && err != nil) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
			for _, s := range tc.msg {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not mention %q", err, s)
				}
			}
		})
	}
}

func TestPutGetActs(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 3))
	for _, dt := range []DType{Float16, BFloat16, Float32} {
		x := make([]float32, 257)
		fillActs(r, x, 16)
		b := make([]byte, len(x)*dt.Size())
		if err := putActs(dt, b, x); err != nil {
			t.Fatal(err)
		}
		got := make([]float32, len(x))
		if !getActs(dt, got, b) {
			t.Fatalf("%s: non-finite", dt)
		}
		want := rounded(t, dt, x)
		for i := range want {
			if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
				t.Fatalf("%s [%d]: %v, want %v", dt, i, got[i], want[i])
			}
		}
		x[100] = float32(math.Inf(-1))
		if err := putActs(dt, b, x); !errors.Is(err, ErrInvalid) {
			t.Fatalf("%s: Inf gave %v", dt, err)
		}
	}
}
