#!/usr/bin/env bash
# The GPU checks of the sampling-step kernels in ONE short run on a GPU machine, under 8 minutes:
#   1. tests/unit/test_kernels.py (run last) with the compiled kernels on the GPU: every parity test on CUDA tensors
#      (hash bits, guided log-probs/purity/truncation, selection, draw, the step, the tiny-model sampler)
#      and the ITHQ-sized ones marked `gpu`;
#   2. benchmarks/bench_kernels.py at ITHQ shapes (B = 1, 8, 32; fp32 and bf16);
#   3. benchmarks/gpu_sweep.py: the measured copy bandwidth, guided_purity's launch configurations, the
#      step's parts, and the ITHQ transformer forward beside the step.
# Results go to $OUT (7 files): env.txt, bench.txt, bench.json, sweep.txt, sweep.json, kernels_tests.txt,
# kernels_tests.xml.
#
# Needs no network: python3 with torch (CUDA), triton, pytest and transformers (the tests' conftest
# imports the project's tokenizer); a GPU machine's image usually has all of them. Run from the repository root:
#     OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET VQDIFF_KERNELS

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', \
torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here: the tests below run the kernels under the Triton interpreter only"
  status=2
fi
# The benchmark first (the targets in docs/BENCHMARKS.md), then the sweep around it, then the tests: each has its own
# timeout and a failure stops none of the others. Under 8 minutes in all (about 540 s with the logs).
echo "== benchmarks/bench_kernels.py"
timeout 170 "$PY" benchmarks/bench_kernels.py --budget-s 140 --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" || status=1

echo "== benchmarks/gpu_sweep.py"
timeout 150 "$PY" benchmarks/gpu_sweep.py --budget-s 110 ${SWEEP_ARGS:-} --out "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.txt" || status=1

echo "== tests/unit/test_kernels.py (compiled kernels on the GPU)"
timeout 180 "$PY" -m pytest -q -rs -p no:cacheprovider tests/unit/test_kernels.py --durations=5 \
  --junitxml="$OUT/kernels_tests.xml" 2>&1 | tee "$OUT/kernels_tests.txt" || status=1

echo "gpu_check: exit $status; results in $OUT"
exit $status
