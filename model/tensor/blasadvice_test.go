package tensor

import (
	"strings"
	"testing"
)

func TestBLASAdvice(t *testing.T) {
	for _, tc := range []struct {
		core, coretype string
		avx2, avx512   bool
		want           string // a kernel set named in the advice; "" for none
	}{
		{"Prescott", "", true, true, "OPENBLAS_CORETYPE=SkylakeX"},
		{"Prescott", "", true, false, "OPENBLAS_CORETYPE=Haswell"},
		{"Prescott", "", false, false, ""},       // an old CPU: Prescott is right
		{"Prescott", "Prescott", true, true, ""}, // chosen on purpose
		{"SkylakeX", "", true, true, ""},         // already the fast kernels
		{"Haswell", "", true, true, ""},          // OpenBLAS knows better (e.g. AVX-512 slow on this model)
		{"gonum", "", true, true, ""},            // the pure-Go build
	} {
		got := blasAdvice(tc.core, tc.coretype, tc.avx2, tc.avx512)
		if (tc.want == "") != (got == "") || !strings.Contains(got, tc.want) {
			t.Errorf("blasAdvice(%q, %q, avx2=%v, avx512=%v) = %q, want one naming %q", tc.core, tc.coretype, tc.avx2, tc.avx512, got, tc.want)
		}
	}
	// On this machine it says something only when OpenBLAS fell back to Prescott.
	if a := BLASAdvice(); a != "" && BLASCore() != "Prescott" {
		t.Errorf("advice %q with kernels %s", a, BLASCore())
	}
}
