package tensor

import (
	"fmt"
	"os"

	"golang.org/x/sys/cpu"
)

// BLASAdvice returns one line of advice when OpenBLAS runs its generic Prescott (SSE3)
// kernels on a CPU that can run faster ones and OPENBLAS_CORETYPE is unset, which is what
// a DYNAMIC_ARCH OpenBLAS does on a CPU model newer than its build (Debian's 0.3.21 on Intel
// Emerald Rapids, for one: the tests of package model ran 2× faster there with SkylakeX);
// "" otherwise, and always in the pure-Go build. It only advises: OpenBLAS reads the
// variable when the process starts.
func BLASAdvice() string {
	return blasAdvice(BLASCore(), os.Getenv("OPENBLAS_CORETYPE"),
		cpu.X86.HasAVX2 && cpu.X86.HasFMA,
		cpu.X86.HasAVX512F && cpu.X86.HasAVX512BW && cpu.X86.HasAVX512DQ && cpu.X86.HasAVX512VL && cpu.X86.HasAVX512CD)
}

// blasAdvice is BLASAdvice's decision, given the kernel set OpenBLAS took, the
// OPENBLAS_CORETYPE setting and the CPU's features.
func blasAdvice(core, coretype string, avx2, avx512 bool) string {
	if core != "Prescott" || coretype != "" {
		return ""
	}
	var better string
	switch {
	case avx512:
		better = "SkylakeX"
	case avx2:
		better = "Haswell"
	default:
		return ""
	}
	return fmt.Sprintf("OpenBLAS chose its generic Prescott kernels on a CPU with %s (a CPU model newer than this OpenBLAS): "+
		"export OPENBLAS_CORETYPE=%s before starting linearpatch for faster matmuls", map[bool]string{true: "AVX-512", false: "AVX2"}[avx512], better)
}
