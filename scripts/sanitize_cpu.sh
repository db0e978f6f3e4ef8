#!/usr/bin/env bash
# The C++ CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer:
#
#   scripts/sanitize_cpu.sh [pytest arguments]    (default: the op and reliability tests, CPU backend)
#
# Copies the sources to a scratch folder (SANITIZE_DIR, default a new temporary one), builds
# lmfast there with LMFAST_SANITIZE=1 (lmfast/_build_flags.py: -fsanitize=address,undefined,
# UB fatal) and one kernel library for this CPU (LMFAST_CPU_ARCH=native), installs it into
# SANITIZE_DIR/site, and runs the tests against that install with libasan and libubsan
# preloaded into an uninstrumented Python and torch. Leak checking is off: CPython and torch
# keep allocations for the life of the process by design. Any sanitizer report fails the run.
# The memory-growth and backward peak-memory tests are left out: ASan's quarantine holds freed
# memory on purpose (RSS grew 174 MiB over the first's 50,000 calls under it; the second's peak,
# 77 MiB plain, passed 190 MiB). On 2 cores: about 6 minutes to build (one
# job), about 3.5 minutes of tests.
#
# With no arguments it then runs tests/test_cuda_emulation.py with the emulated CUDA kernels
# built under the same sanitizers (LMFAST_CUDA_EMULATION_SANITIZE=1): an out-of-bounds access
# of a CUDA kernel to a tensor, which the emulator alone cannot see, fails there, as
# compute-sanitizer's memcheck would fail it on a GPU (about 1 minute to build, 1.5 of tests;
# ASan's warning that it does not fully support swapcontext is expected). Reports go to
# $WORK/sanitizer.*.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${SANITIZE_DIR:-$(mktemp -d)}"
mkdir -p "$WORK"
PYTHON="${PYTHON:-python3}"
SECONDS=0

echo "== build with ASan + UBSan in $WORK"
rm -rf "$WORK/src" "$WORK/site"
mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -z | xargs -0 -I{} cp --parents {} "$WORK/src/")
(cd "$WORK/src" && LMFAST_SANITIZE=1 LMFAST_CPU_ARCH=native MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$PYTHON" -m pip install -q --no-build-isolation --no-deps --target "$WORK/site" .)
echo "built in ${SECONDS}s"

ASAN="$(gcc -print-file-name=libasan.so)"
UBSAN="$(gcc -print-file-name=libubsan.so)"
EMULATION=0
if [ "$#" -eq 0 ]; then
  EMULATION=1
  set -- "$ROOT/tests/test_norm.py" "$ROOT/tests/test_softmax.py" "$ROOT/tests/test_attention_kernels.py" \
    "$ROOT/tests/test_fuzz.py" "$ROOT/tests/test_reliability.py" -k "not triton and not widening_path and not memory_growth and not memory_is_bounded"
fi
cd "$WORK"  # (not the checkout: its source lmfast would shadow the install)
rm -f "$WORK"/sanitizer.*
# (reports to files: pytest's capture dies with the aborted process)
trap 'cat "$WORK"/sanitizer.* 2>/dev/null || true' EXIT
sanitized() {
  LD_PRELOAD="$ASAN:$UBSAN" \
  ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1:log_path=$WORK/sanitizer" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$WORK/sanitizer" \
  PYTHONPATH="$WORK/site" \
    "$PYTHON" -m pytest -q -p no:cacheprovider -p no:xdist "$@"
}
echo "== tests under the sanitizers: $*"
sanitized "$@"
if [ "$EMULATION" = 1 ]; then
  echo "== the emulated CUDA kernels under the sanitizers"
  LMFAST_CUDA_EMULATION_SANITIZE=1 sanitized "$ROOT/tests/test_cuda_emulation.py"
fi
echo "sanitized tests passed in ${SECONDS}s"
