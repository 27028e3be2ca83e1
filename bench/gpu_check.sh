#!/usr/bin/env bash
# One prepared run for a session with a real GPU (H100/H200 class, ~15 minutes of device time):
# the GPU tests, then the GPU bench of every op against torch (and Liger-Kernel if it imports).
#
#   bash bench/gpu_check.sh            # results under $OUT (the device machine's folder), else results-local
#
# Writes: tests.log (pytest), bench.csv (columns as docs/results: op, dtype, rows, vocab,
# contender, ms, gbps, pct_of_peak_bw, vs_torch, rel_diff_vs_torch, machine, date), bench.log,
# env.txt (GPU, driver, versions). Everything is bounded by `timeout 480` (8 minutes) overall;
# the tests get at most 240 s of it, so the bench always runs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="${OUT:-results-local}"
PY="${PYTHON:-python3}"
mkdir -p "$RESULTS"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export NUMBA_ENABLE_CUDASIM=0

run_all() {
  set -euo pipefail
  {
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
    "$PY" -c 'import sys, numpy, numba, torch; print("python", sys.version.split()[0], "numpy", numpy.__version__,
"numba", numba.__version__, "torch", torch.__version__, "cuda", torch.version.cuda)' || true
    "$PY" -c 'import importlib.metadata as m; print("numba-cuda", m.version("numba-cuda"))' || true
  } > "$RESULTS/env.txt" 2>&1
  cat "$RESULTS/env.txt"

  # 1. the GPU tests (real kernels: warp shuffles, real lowering); a failure is recorded, the bench still runs
  # Kernels compile on first use (seconds each): spread the test files over processes when
  # pytest-xdist is there. -k keeps the cuda cases of the conformance suite and every case of the
  # three cuda test files.
  local rc=0 par=()
  if "$PY" -c 'import xdist' 2>/dev/null; then par=(-n 8); fi
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider "${par[@]}" \
    tests/test_cuda.py tests/test_gpu_rowpass.py tests/test_gpu_backward.py tests/test_conformance.py \
    -k "cuda or test_gpu_rowpass or test_gpu_backward" 2>&1 | tee "$RESULTS/tests.log" || rc=$?
  echo "tests exit status: $rc" | tee -a "$RESULTS/tests.log"

  # 2. the bench of every op at [4096, 128256] and [16384, 128256], bf16 and float32
  "$PY" bench/bench_cuda_gpu.py --shapes 4096x128256,16384x128256 --dtypes bfloat16,float32 \
    --csv "$RESULTS/bench.csv" --log "$RESULTS/bench.log"
  return "$rc"
}

export -f run_all
export RESULTS PY
timeout 480 bash -c run_all
