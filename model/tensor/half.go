package tensor

import (
	"math"
	"strconv"
	"unsafe"
)

// Half-precision conversions shared by the safetensors loader and the activation cache.
// Narrowing rounds to nearest even; widening is exact. Subnormals, infinities and NaN
// (payload kept, quieted when narrowing) are handled.

// Float16ToFloat32 widens an IEEE 754 binary16 value exactly, subnormals, infinities and NaN
// (payload kept) included.
func Float16ToFloat32(h uint16) float32 {
	sign := uint32(h>>15) << 31
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h) & 0x3ff
	switch {
	case exp == 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | mant<<13)
	case exp == 0:
		// Subnormal (or zero): mant·2⁻²⁴, exact in float32.
		f := float32(mant) * (1.0 / (1 << 24))
		if sign != 0 {
			f = -f
		}
		return f
	}
	return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
}

// BFloat16ToFloat32 widens a bfloat16 value: its bits are the upper 16 bits of a float32.
func BFloat16ToFloat32(b uint16) float32 { return math.Float32frombits(uint32(b) << 16) }

// Float32ToFloat16 narrows f to binary16, rounding to nearest even; overflow gives ±Inf and NaN
// stays a (quiet) NaN.
func Float32ToFloat16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
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
		// Result is subnormal: mant₁₀ = m·2^(exp−126) with the 24-bit significand m.
		if e < -10 {
			return sign // below half the smallest subnormal
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

// Float32ToBFloat16 narrows f to bfloat16, rounding to nearest even; NaN stays a quiet NaN.
func Float32ToBFloat16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 {
		return uint16(b>>16) | 0x40
	}
	b += 0x7fff + (b>>16)&1
	return uint16(b >> 16)
}

// DType is the element type of a Matrix's storage. The names match safetensors' dtypes.
type DType uint8

const (
	F32  DType = iota // float32 in Data
	BF16              // bfloat16 bits in Half
	F16               // IEEE binary16 bits in Half
)

// String returns the safetensors name of the dtype: "F32", "BF16" or "F16".
func (d DType) String() string {
	switch d {
	case F32:
		return "F32"
	case BF16:
		return "BF16"
	case F16:
		return "F16"
	}
	return "DType(" + strconv.Itoa(int(d)) + ")"
}

// ParseDType returns the DType of a safetensors dtype name ("F32", "BF16", "F16").
func ParseDType(s string) (DType, bool) {
	switch s {
	case "F32":
		return F32, true
	case "BF16":
		return BF16, true
	case "F16":
		return F16, true
	}
	return 0, false
}

// littleEndian: the machine stores the low byte first (a bfloat16 pair's bits then sit in
// a uint64 as WidenHalf's fast path expects).
var littleEndian = func() bool { x := uint16(1); return *(*byte)(unsafe.Pointer(&x)) == 1 }()

// WidenHalf sets dst[i] to the float32 value of the half-precision bits src[i] of type dt
// (exact). It panics if dt is not BF16 or F16 or the lengths differ.
func WidenHalf(dst []float32, src []uint16, dt DType) {
	mustShape("WidenHalf", len(dst) == len(src), "%d values into %d", len(src), len(dst))
	switch dt {
	case BF16:
		i := 0
		if littleEndian {
			// Four values a step: the bits of four bfloat16 are the upper halves of four float32.
			for ; i+4 <= len(src); i += 4 {
				v := *(*uint64)(unsafe.Pointer(&src[i]))
				d := (*[2]uint64)(unsafe.Pointer(&dst[i]))
				d[0] = (v&0xffff)<<16 | (v&0xffff0000)<<32
				d[1] = (v>>32&0xffff)<<16 | (v>>48)<<48
			}
		}
		for ; i < len(src); i++ {
			dst[i] = math.Float32frombits(uint32(src[i]) << 16)
		}
	case F16:
		for i, h := range src {
			// Normal numbers (the bulk of weights) by rebiasing the exponent; zeros,
			// subnormals, infinities and NaN through Float16ToFloat32.
			if e := h & 0x7c00; e != 0 && e != 0x7c00 {
				dst[i] = math.Float32frombits(uint32(h&0x8000)<<16 | (uint32(h&0x7fff)<<13 + (127-15)<<23))
			} else {
				dst[i] = Float16ToFloat32(h)
			}
		}
	default:
		panic("tensor: WidenHalf: dtype " + dt.String() + " is not a half-precision type")
	}
}

// NarrowHalf sets dst[i] to src[i] rounded to nearest even in dt (BF16 or F16). It panics
// if dt is not BF16 or F16 or the lengths differ.
func NarrowHalf(dst []uint16, src []float32, dt DType) {
	mustShape("NarrowHalf", len(dst) == len(src), "%d values into %d", len(src), len(dst))
	switch dt {
	case BF16:
		for i, f := range src {
			dst[i] = Float32ToBFloat16(f)
		}
	case F16:
		for i, f := range src {
			dst[i] = Float32ToFloat16(f)
		}
	default:
		panic("tensor: NarrowHalf: dtype " + dt.String() + " is not a half-precision type")
	}
}
