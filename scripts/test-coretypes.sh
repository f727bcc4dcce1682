#!/usr/bin/env bash
# Runs the packages whose results go through BLAS under each OpenBLAS kernel set that this
# CPU can run (OPENBLAS_CORETYPE=Prescott, Haswell, SkylakeX where supported), so that no
# test depends on one kernel's rounding. Run by hand (`make test-coretypes`); `make test`
# and CI leave OPENBLAS_CORETYPE as the machine sets it.
#
#   scripts/test-coretypes.sh [go test flags...]   (default: -count=1 -short)
set -uo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
PKGS=(./model/... ./patch/ ./student/ ./teacher/ ./shards/ ./cache/)
FLAGS=("$@")
[ ${#FLAGS[@]} -eq 0 ] && FLAGS=(-count=1 -short)

flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { for f in "$@"; do [[ " $flags " == *" $f "* ]] || return 1; done; }

cores=()
has pni && cores+=(Prescott) # pni: SSE3 in /proc/cpuinfo
has avx2 fma && cores+=(Haswell)
has avx512f avx512bw avx512dq avx512vl avx512cd && cores+=(SkylakeX)
if [ ${#cores[@]} -eq 0 ]; then
	echo "test-coretypes: this CPU runs none of Prescott, Haswell, SkylakeX (no /proc/cpuinfo flags?)" >&2
	exit 2
fi
echo "test-coretypes: machine default OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-<unset>}; testing ${cores[*]}"

status=0
summary=()
for core in "${cores[@]}"; do
	echo "== OPENBLAS_CORETYPE=$core =="
	# TestBLASCore fails if OpenBLAS did not take the requested kernels.
	if OPENBLAS_CORETYPE=$core "$GO" test "${FLAGS[@]}" "${PKGS[@]}"; then
		summary+=("$core: pass")
	else
		summary+=("$core: FAIL")
		status=1
	fi
done
echo "== test-coretypes summary =="
printf '  %s\n' "${summary[@]}"
exit $status
