package shards

import (
	"encoding/binary"
	"fmt"
	"math"
	"sync"
)

// Largest finite values of the 16-bit dtypes, and their float32 bit patterns.
const (
	MaxFloat16  = 65504                 // largest finite float16
	MaxBFloat16 = 3.3895313892515355e38 // largest finite bfloat16 (0x7f7f)

	maxF16Bits  = 0x477fe000 // float32 bits of 65504
	maxBF16Bits = 0x7f7f0000 // float32 bits of MaxBFloat16
	infBits     = 0x7f800000
)

// ToFloat16 narrows src into dst as IEEE 754 binary16 bit patterns, rounding to nearest
// even (subnormals included). It fails, rather than saturating, when a value does not fit:
// an error wrapping ErrOverflow when some |x| > 65504 (naming the largest |x| and advising
// --act-dtype bfloat16 or float32), or ErrInvalid for a NaN or ±Inf. dst is unspecified
// after an error. It panics when len(dst) != len(src).
func ToFloat16(dst []uint16, src []float32) error {
	if len(dst) != len(src) {
		panic(fmt.Sprintf("shards: ToFloat16 of %d values into %d", len(src), len(dst)))
	}
	for i, v := range src {
		b := math.Float32bits(v)
		if b&0x7fffffff > maxF16Bits {
			return rangeError(Float16, src)
		}
		dst[i] = f32ToF16(b)
	}
	return nil
}

// FromFloat16 widens the binary16 bit patterns of src into dst exactly (subnormals,
// infinities and NaN included). It panics when len(dst) != len(src).
func FromFloat16(dst []float32, src []uint16) {
	if len(dst) != len(src) {
		panic(fmt.Sprintf("shards: FromFloat16 of %d values into %d", len(src), len(dst)))
	}
	tab := f16Table()
	for i, h := range src {
		dst[i] = tab[h]
	}
}

// ToBFloat16 narrows src into dst as bfloat16 bit patterns (the upper half of a float32),
// rounding to nearest even. It returns an error wrapping ErrOverflow when some |x| exceeds
// MaxBFloat16, or ErrInvalid for a NaN or ±Inf; dst is unspecified after an error. It
// panics when len(dst) != len(src).
func ToBFloat16(dst []uint16, src []float32) error {
	if len(dst) != len(src) {
		panic(fmt.Sprintf("shards: ToBFloat16 of %d values into %d", len(src), len(dst)))
	}
	for i, v := range src {
		b := math.Float32bits(v)
		if b&0x7fffffff > maxBF16Bits {
			return rangeError(BFloat16, src)
		}
		dst[i] = f32ToBF16(b)
	}
	return nil
}

// FromBFloat16 widens the bfloat16 bit patterns of src into dst exactly. It panics when
// len(dst) != len(src).
func FromBFloat16(dst []float32, src []uint16) {
	if len(dst) != len(src) {
		panic(fmt.Sprintf("shards: FromBFloat16 of %d values into %d", len(src), len(dst)))
	}
	for i, h := range src {
		dst[i] = math.Float32frombits(uint32(h) << 16)
	}
}

// rangeError explains why src does not fit dt: a non-finite value (ErrInvalid) or the
// largest |x| above dt's range (ErrOverflow).
func rangeError(dt DType, src []float32) error {
	var maxAbs float64
	at := -1
	for i, v := range src {
		f := math.Abs(float64(v))
		if math.IsNaN(f) || math.IsInf(f, 0) {
			return fmt.Errorf("%w: non-finite activation %v at element %d", ErrInvalid, v, i)
		}
		if f > maxAbs {
			maxAbs, at = f, i
		}
	}
	switch dt {
	case Float16:
		return fmt.Errorf("%w: max |x| = %.6g (element %d) exceeds float16's largest finite value %d; rerun with --act-dtype bfloat16 or float32",
			ErrOverflow, maxAbs, at, MaxFloat16)
	case BFloat16:
		return fmt.Errorf("%w: max |x| = %.6g (element %d) exceeds bfloat16's largest finite value %.6g; rerun with --act-dtype float32",
			ErrOverflow, maxAbs, at, MaxBFloat16)
	}
	return fmt.Errorf("%w: max |x| = %.6g (element %d) in %s", ErrOverflow, maxAbs, at, dt)
}

// putActs writes src into dst (len(src)·dt.Size() bytes, little-endian) as dt. Errors as
// ToFloat16 / ToBFloat16; for Float32 only non-finite values are rejected.
func putActs(dt DType, dst []byte, src []float32) error {
	switch dt {
	case Float16:
		for i, v := range src {
			b := math.Float32bits(v)
			if b&0x7fffffff > maxF16Bits {
				return rangeError(dt, src)
			}
			binary.LittleEndian.PutUint16(dst[2*i:], f32ToF16(b))
		}
	case BFloat16:
		for i, v := range src {
			b := math.Float32bits(v)
			if b&0x7fffffff > maxBF16Bits {
				return rangeError(dt, src)
			}
			binary.LittleEndian.PutUint16(dst[2*i:], f32ToBF16(b))
		}
	default:
		for i, v := range src {
			b := math.Float32bits(v)
			if b&0x7fffffff >= infBits {
				return rangeError(dt, src)
			}
			binary.LittleEndian.PutUint32(dst[4*i:], b)
		}
	}
	return nil
}

// getActs decodes the len(dst) little-endian values of dt in src into dst. It returns
// false when a value is not finite (never written by putActs).
func getActs(dt DType, dst []float32, src []byte) bool {
	switch dt {
	case Float16:
		tab := f16Table()
		src = src[:2*len(dst)]
		for i := range dst {
			h := binary.LittleEndian.Uint16(src[2*i:])
			if h&0x7c00 == 0x7c00 {
				return false
			}
			dst[i] = tab[h]
		}
	case BFloat16:
		src = src[:2*len(dst)]
		for i := range dst {
			h := binary.LittleEndian.Uint16(src[2*i:])
			if h&0x7f80 == 0x7f80 {
				return false
			}
			dst[i] = math.Float32frombits(uint32(h) << 16)
		}
	default:
		src = src[:4*len(dst)]
		for i := range dst {
			b := binary.LittleEndian.Uint32(src[4*i:])
			if b&infBits == infBits {
				return false
			}
			dst[i] = math.Float32frombits(b)
		}
	}
	return true
}

// f32ToF16 narrows the float32 with bits b to binary16, rounding to nearest even;
// overflow gives ±Inf and NaN stays a quiet NaN.
func f32ToF16(b uint32) uint16 {
	sign := uint16(b>>16) & 0x8000
	if a := b & 0x7fffffff; a >= 0x38800000 && a < 0x477ff000 {
		// Fast path: the result is a normal float16 (2⁻¹⁴ ≤ |x| < 65520, which rounds to at
		// most 65504). Rebias the exponent, round the 13 dropped bits to nearest even; a
		// carry into the exponent is correct.
		a -= (127 - 15) << 23
		a += 0xfff + (a>>13)&1
		return sign | uint16(a>>13)
	}
	exp := int(b>>23) & 0xff
	mant := b & 0x7fffff
	if exp == 0xff {
		if mant == 0 {
			return sign | 0x7c00
		}
		return sign | 0x7e00 | uint16(mant>>13)
	}
	e := exp - 127 + 15
	if e >= 0x1f {
		return sign | 0x7c00
	}
	if e <= 0 {
		// Subnormal result: the value is m·2^(exp−150) with the 24-bit significand m, and
		// a subnormal's unit is 2⁻²⁴, so the result is m >> (126−exp) = m >> (14−e), rounded.
		if e < -10 {
			return sign // below half the smallest subnormal: rounds to ±0
		}
		m := mant | 0x800000
		shift := uint(14 - e)
		r := m >> shift
		rem := m & (1<<shift - 1)
		half := uint32(1) << (shift - 1)
		if rem > half || (rem == half && r&1 == 1) {
			r++ // may carry into the smallest normal, whose encoding is the next integer
		}
		return sign | uint16(r)
	}
	r := uint32(e)<<10 | mant>>13
	rem := mant & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && r&1 == 1) {
		r++ // a carry into the exponent is correct, up to +Inf
	}
	return sign | uint16(r)
}

// f16ToF32 widens a binary16 bit pattern exactly.
func f16ToF32(h uint16) float32 {
	sign := uint32(h>>15) << 31
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h) & 0x3ff
	switch {
	case exp == 0x1f:
		return math.Float32frombits(sign | infBits | mant<<13)
	case exp == 0:
		f := float32(mant) * (1.0 / (1 << 24)) // subnormal or zero, exact
		if sign != 0 {
			f = -f
		}
		return f
	}
	return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
}

// f16Table returns the float32 value of every binary16 bit pattern.
var f16Table = sync.OnceValue(func() *[1 << 16]float32 {
	var t [1 << 16]float32
	for h := range t {
		t[h] = f16ToF32(uint16(h))
	}
	return &t
})

// f32ToBF16 narrows the float32 with bits b to bfloat16, rounding to nearest even; NaN
// stays a quiet NaN.
func f32ToBF16(b uint32) uint16 {
	if b&0x7fffffff > infBits {
		return uint16(b>>16) | 0x40
	}
	b += 0x7fff + (b>>16)&1
	return uint16(b >> 16)
}
