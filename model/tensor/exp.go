package tensor

import "math"

// Cephes expf: x = n·ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r, then
// scaling by 2^n. Relative error below 2e-7 on [-87, 88]; outside that range (where 2^n
// would leave the normal float32 range) and for NaN the code falls back to math.Exp.
const (
	expLo    = -87
	expHi    = 88
	expLog2e = 1.44269504088896341
	expC1    = 0.693359375
	expC2    = -2.12194440e-4
	expMagic = 12582912 // 1.5·2^23: adding it rounds a float32 to an integer
	expP0    = 1.9875691500e-4
	expP1    = 1.3981999507e-3
	expP2    = 8.3334519073e-3
	expP3    = 4.1665795894e-2
	expP4    = 1.6666665459e-1
	expP5    = 5.0000001201e-1
)

// exp32 returns e^x for a float32 x (see the constants above for the method and accuracy).
func exp32(x float32) float32 {
	if !(x >= expLo && x <= expHi) {
		return float32(math.Exp(float64(x)))
	}
	t := x*expLog2e + expMagic
	n := t - expMagic
	r := x - n*expC1 - n*expC2
	p := (((((expP0*r+expP1)*r+expP2)*r+expP3)*r+expP4)*r+expP5)*(r*r) + r + 1
	return p * math.Float32frombits(uint32(int32(math.Float32bits(t))-0x4B400000+127)<<23)
}

// expShift sets dst[i] = e^(src[i]-shift) and returns the sum of the results, accumulated
// in float64. dst may alias src; len(dst) must be >= len(src). It is exp32 inlined into a
// loop with two accumulators, which is what makes softmax cheap.
func expShift(dst, src []float32, shift float32) float64 {
	dst = dst[:len(src)]
	var s0, s1 float64
	i := 0
	for ; i+2 <= len(src); i += 2 {
		x0, x1 := src[i]-shift, src[i+1]-shift
		if !(x0 >= expLo && x0 <= expHi && x1 >= expLo && x1 <= expHi) {
			break
		}
		t0 := x0*expLog2e + expMagic
		t1 := x1*expLog2e + expMagic
		n0, n1 := t0-expMagic, t1-expMagic
		r0 := x0 - n0*expC1 - n0*expC2
		r1 := x1 - n1*expC1 - n1*expC2
		p0 := (((((expP0*r0+expP1)*r0+expP2)*r0+expP3)*r0+expP4)*r0+expP5)*(r0*r0) + r0 + 1
		p1 := (((((expP0*r1+expP1)*r1+expP2)*r1+expP3)*r1+expP4)*r1+expP5)*(r1*r1) + r1 + 1
		e0 := p0 * math.Float32frombits(uint32(int32(math.Float32bits(t0))-0x4B400000+127)<<23)
		e1 := p1 * math.Float32frombits(uint32(int32(math.Float32bits(t1))-0x4B400000+127)<<23)
		dst[i], dst[i+1] = e0, e1
		s0 += float64(e0)
		s1 += float64(e1)
	}
	for ; i < len(src); i++ { // tail, and everything after an out-of-range pair
		e := exp32(src[i] - shift)
		dst[i] = e
		s0 += float64(e)
	}
	return s0 + s1
}
