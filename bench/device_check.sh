#!/usr/bin/env bash
# The project's device check, for a machine with a CUDA GPU (about 8 minutes on
# an H100 with 16 cores): build in place, run the CUDA tests, run
# compute-sanitizer over every kernel, run the GPU benchmarks, and write a JSON
# summary (device, torch and CUDA versions, date, results) under bench/results/.
#
#   bash bench/device_check.sh            # RESULTS=dir to write elsewhere
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-bench/results}
mkdir -p "$RESULTS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Build for this GPU only (the CI compile check covers the default archs).
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c \
  "import torch; print('{}.{}'.format(*torch.cuda.get_device_capability()))")}
SLUG=$($PY -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
STAMP=$(date -u +%Y-%m-%d)
PREFIX="$RESULTS/$STAMP-$SLUG"
declare -A STATUS

step() { printf '\n=== %s (%s)\n' "$1" "$(date +%T)"; }

step "build (archs $TORCH_CUDA_ARCH_LIST)"
rm -rf sit_ext/_C*.so
$PY setup.py build_ext --inplace 2>&1 | grep -vE "^\[|warning: ignoring|pragma|^ +[0-9]+ \||^ +\|" | tail -n 20
$PY -m sit_ext info || { echo "build failed"; exit 1; }

step "CUDA tests"
$PY -m pytest tests -m cuda -q -p no:cacheprovider --junitxml="$PREFIX-tests.xml" 2>&1 | tail -n 30
STATUS[tests]=$?

for tool in memcheck racecheck initcheck; do
  step "compute-sanitizer --tool $tool"
  if command -v compute-sanitizer >/dev/null 2>&1; then
    compute-sanitizer --tool "$tool" --error-exitcode 9 $PY bench/sanitize_ops.py 2>&1 | tail -n 15
    STATUS[$tool]=$?
  else
    echo "compute-sanitizer not found: skipped"
    STATUS[$tool]=skipped
  fi
done

step "benchmarks"
# Batch 32 at every size and dtype keeps the check near 8 minutes; FULL=1 adds 8, 128 and 256 and
# the torch.compile variants of the model benchmark.
if [ "${FULL:-0}" = 1 ]; then BATCHES="8 32 128 256"; MODEL_FLAGS=""; else BATCHES="32"; MODEL_FLAGS="--no-compile"; fi
$PY bench/run.py --device cuda --batch $BATCHES --out "$PREFIX-ops.json"
STATUS[bench]=$?
$PY bench/run.py --device cuda --models $MODEL_FLAGS --out "$PREFIX-models.json"
STATUS[models]=$?

step "summary"
$PY - "$PREFIX" "${STATUS[tests]}" "${STATUS[memcheck]}" "${STATUS[racecheck]}" "${STATUS[initcheck]}" \
  "${STATUS[bench]}" "${STATUS[models]}" <<'PY'
import json, sys, torch, sit_ext
from sit_ext.benchmark import machine_info
prefix, tests, memcheck, racecheck, initcheck, bench, models = sys.argv[1:]
summary = {**machine_info(torch.device("cuda")),
           "tests_exit": tests, "memcheck_exit": memcheck, "racecheck_exit": racecheck,
           "initcheck_exit": initcheck, "bench_exit": bench, "models_exit": models,
           "benchmarks": [prefix + "-ops.json", prefix + "-models.json"], "tests_junit": prefix + "-tests.xml"}
with open(prefix + "-summary.json", "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps(summary, indent=1))
PY
