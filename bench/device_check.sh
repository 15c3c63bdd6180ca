#!/usr/bin/env bash
# The project's device check, for a machine with a CUDA GPU (about 6 minutes on
# an H200 with 16 cores before the model matrix was added, untimed since; two
# should fit in 15 minutes of device time: BUDGET and MODEL_BUDGET bound it):
#   1. build as a user does (pip install --no-build-isolation -e ., with the
#      image's own compiler settings), with ptxas's register and spill report of
#      every kernel; a fallback build (CXX=g++, or setup.py when pip cannot) lets
#      the rest run but is recorded as a failure of the documented path;
#   2. the CUDA tests (values and gradients against float64, autocast mixes,
#      CUDA graphs, bad input), in parallel where pytest-xdist is installed;
#   3. compute-sanitizer memcheck, racecheck and initcheck over every kernel,
#      with the caching allocator off; a refused device is recorded, never clean;
#   4. the op benchmarks (CUDA-graph timing, eager copy ceiling, against eager
#      and torch.compile) within BUDGET seconds, and the model matrix ({fused,
#      unfused} x {eager, compile, graph}, train and guided sampling steps,
#      SiT-XL/2 at batch 32 first, then XL/2 256 and B/2 256) with kernel
#      profiles within MODEL_BUDGET seconds;
#   5. a JSON summary (device, torch and CUDA versions, date, exit codes).
# Every file goes to RESULTS (default bench/results/), named <date>-<device>-*.
#
#   bash bench/device_check.sh     # RESULTS=dir BUDGET=seconds MODEL_BUDGET=seconds COMPILE=0 (no compiled models)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-bench/results}
BUDGET=${BUDGET:-60}
MODEL_BUDGET=${MODEL_BUDGET:-120}
mkdir -p "$RESULTS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Build for this GPU only (the CI compile check covers the default archs). A
# preset list (some images set 9.0a) is kept.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c \
  "import torch; print('{}.{}'.format(*torch.cuda.get_device_capability()))")}
SLUG=$($PY -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
PREFIX="$RESULTS/$(date -u +%Y-%m-%d)-$SLUG"
declare -A STATUS

step() { printf '\n=== %s (%s)\n' "$1" "$(date +%T)"; }

step "build (archs $TORCH_CUDA_ARCH_LIST, CXX=${CXX:-default})"
rm -rf sit_ext/_C*.so build
BUILD_LOG=$(mktemp)
# The README's command, verbatim but for -v (the ptxas report) and --no-deps (no internet here).
SIT_EXT_NVCC_FLAGS="-Xptxas -v" $PY -m pip install -v --no-deps --no-build-isolation -e . >"$BUILD_LOG" 2>&1
rc=$?
STATUS[build]=$rc
if [ $rc != 0 ]; then
  # The documented path failed: that is the result. A fallback build lets the
  # rest of the check run, and the summary says which one ran.
  tail -n 30 "$BUILD_LOG"
  FALLBACK_CXX=${CXX:+g++}
  echo "pip install -e . failed (CXX=${CXX:-default}); fallback: setup.py build_ext --inplace ${FALLBACK_CXX:+with CXX=g++}"
  CXX=${FALLBACK_CXX:-${CXX:-}} SIT_EXT_NVCC_FLAGS="-Xptxas -v" $PY setup.py build_ext --inplace >>"$BUILD_LOG" 2>&1
  STATUS[build]="FAILED documented path (pip exit $rc); fallback build exit $? ${FALLBACK_CXX:+with CXX=g++}"
fi
cp "$BUILD_LOG" "$PREFIX-build.log"
grep -E "sit_ext:|error|Error" "$BUILD_LOG" | grep -v "ptxas info" | tail -n 15
$PY bench/ptxas_report.py "$BUILD_LOG" >"$PREFIX-ptxas.txt"
STATUS[ptxas]=$?
tail -n 4 "$PREFIX-ptxas.txt"
$PY -m sit_ext info || { echo "build failed"; tail -n 40 "$BUILD_LOG"; exit 1; }
nm -D --defined-only sit_ext/_C*.so 2>/dev/null | grep -qw __cxa_throw && echo "WARNING: a static libstdc++ is inside sit_ext/_C"

step "error paths (C++ exceptions reach Python, CPU and CUDA)"
timeout 60 $PY -m pytest tests -q -p no:cacheprovider -k "bad_input or dtype_rules" 2>&1 | tail -n 3
STATUS[errors]=$?

step "CUDA tests"
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
timeout 120 $PY -m pytest tests -m cuda -q -p no:cacheprovider $XDIST --junitxml="$PREFIX-tests.xml" 2>&1 | tail -n 25
STATUS[tests]=$?

for tool in memcheck racecheck initcheck; do
  step "compute-sanitizer --tool $tool"
  if ! command -v compute-sanitizer >/dev/null 2>&1; then
    echo "compute-sanitizer not found"
    STATUS[$tool]=missing
    continue
  fi
  OUT_LOG=$(mktemp)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 compute-sanitizer --tool "$tool" --error-exitcode 9 \
    $PY bench/sanitize_ops.py >"$OUT_LOG" 2>&1
  rc=$?
  tail -n 6 "$OUT_LOG"
  if grep -q "Device not supported\|Unable to find injection library\|not supported on this" "$OUT_LOG"; then
    STATUS[$tool]="refused"
  elif [ $rc -eq 0 ] && grep -q "ran every op" "$OUT_LOG"; then
    STATUS[$tool]="clean"
  else
    STATUS[$tool]="failed ($rc)"
  fi
done

step "op benchmarks (budget ${BUDGET}s)"
$PY bench/run.py --device cuda --budget "$BUDGET" --out "$PREFIX-ops.json" 2>&1
STATUS[bench]=$?

step "model matrix (budget ${MODEL_BUDGET}s)"
MODEL_FLAGS=""
[ "${COMPILE:-1}" = 0 ] && MODEL_FLAGS="--no-compile"
timeout $((MODEL_BUDGET + 150)) $PY bench/run.py --device cuda --models --budget "$MODEL_BUDGET" --profile $MODEL_FLAGS \
  --out "$PREFIX-models.json" 2>&1 | tail -n 50
STATUS[models]=$?

step "summary"
$PY - "$PREFIX" "${STATUS[build]}" "${STATUS[ptxas]}" "${STATUS[errors]}" "${STATUS[tests]}" "${STATUS[memcheck]}" \
  "${STATUS[racecheck]}" "${STATUS[initcheck]}" "${STATUS[bench]}" "${STATUS[models]}" <<'PY'
import json, os, sys, torch
from sit_ext.bench.report import machine_info
prefix, build, ptxas, errors, tests, memcheck, racecheck, initcheck, bench, models = sys.argv[1:]
summary = {**machine_info(torch.device("cuda")), "cxx": os.environ.get("CXX", ""),
           "build_exit": build, "ptxas_report_exit": ptxas, "error_paths_exit": errors, "tests_exit": tests,
           "memcheck": memcheck, "racecheck": racecheck, "initcheck": initcheck,
           "bench_exit": bench, "models_exit": models,
           "files": [os.path.basename(prefix) + s for s in
                     ("-build.log", "-ptxas.txt", "-tests.xml", "-ops.json", "-models.json", "-summary.json")]}
with open(prefix + "-summary.json", "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps(summary, indent=1))
PY
