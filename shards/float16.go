package shards

import (
	"encoding/binary"
	"fmt"
	"linearpatch/model/tensor"
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

// f32ToF16 narrows the float32 with bits b to binary16 (tensor.Float32ToFloat16).
func f32ToF16(b uint32) uint16 { return tensor.Float32ToFloat16(math.Float32frombits(b)) }

// f16ToF32 widens a binary16 bit pattern exactly (tensor.Float16ToFloat32).
func f16ToF32(h uint16) float32 { return tensor.Float16ToFloat32(h) }

// f16Table returns the float32 value of every binary16 bit pattern.
var f16Table = sync.OnceValue(func() *[1 << 16]float32 {
	var t [1 << 16]float32
	for h := range t {
		t[h] = f16ToF32(uint16(h))
	}
	return &t
})

// f32ToBF16 narrows the float32 with bits b to bfloat16 (tensor.Float32ToBFloat16).
func f32ToBF16(b uint32) uint16 { return tensor.Float32ToBFloat16(math.Float32frombits(b)) }
