#!/usr/bin/env bash
# The GPU serving measurements on a GPU machine (H100/H200), in two calls of under 8 minutes each
# (a device call may last 10): PARTS=1,2,3 then PARTS=1,4 (part 1 reuses the folder when it exists):
#   1. a random ITHQ-shaped model folder (`vqdiff init --preset ithq`: no download; its weights are
#      random, its shapes and FLOPs are ITHQ's);
#   2. the GPU tests (`-m gpu`: the kernels at ITHQ shapes, the compiled forward on CUDA);
#   3. benchmarks/bench_server.py on CUDA, bf16, 100 posterior forwards with guidance: eager, then
#      `--compile reduce-overhead` (CUDA graphs over row buckets), 16 and 32 concurrent clients, with
#      MFU against the bf16 dense peak (PEAK_TFLOPS, default 989) and the server's peak GPU memory
#      (vqdiff_device_memory_peak_bytes; the target: ITHQ at 16 concurrent images under 8 GB);
#   4. benchmarks/bench_diffusers.py --device cuda --dtype bf16 --quick on the same folder (ours against
#      diffusers' VQDiffusionPipeline, same weights, same run; about 5 minutes at ITHQ size).
# Raw outputs go to $OUT (default docs/results/gpu/): env.txt and one .txt (+ .json) per step.
# Without CUDA every step that needs it is skipped with a message, so the script can be rehearsed on
# a CPU: GPU_SERVE_PRESET=tiny OUT=/tmp/gpu_serve bash benchmarks/gpu_serve.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/docs/results/gpu}
PRESET=${GPU_SERVE_PRESET:-ithq}
PEAK=${PEAK_TFLOPS:-989}
PARTS=",${PARTS:-1,2,3,4},"
part() { case "$PARTS" in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET VQDIFF_KERNELS

{
  date -u +%FT%TZ
  git rev-parse --short HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
cuda=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || cuda=0
status=0
step() { echo "== $*"; }
skip() { echo "gpu_serve: skipped ($1): no CUDA device here" | tee "$OUT/$2.txt"; }

MODEL=${GPU_SERVE_MODEL:-/tmp/vqdiff-$PRESET-random}
if part 1; then
step "1. a random $PRESET-shaped model folder at $MODEL"
if [ -f "$MODEL/model_index.json" ]; then echo "exists"
else timeout 240 "$PY" -m vqdiff.cli init --preset "$PRESET" "$MODEL" --overwrite 2>&1 | tail -3 || status=1; fi
fi

if part 2; then
step "2. GPU tests"
if [ $cuda = 1 ]; then
  timeout 150 "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu tests --durations=5 2>&1 | tee "$OUT/gpu_tests.txt" || status=1
else skip "the GPU tests" gpu_tests; fi
fi

if part 3; then
step "3. bench_server on CUDA: eager, then CUDA graphs over row buckets"
if [ $cuda = 1 ]; then
  for run in off:16 reduce-overhead:16 reduce-overhead:32; do
    mode=${run%:*} clients=${run#*:}
    {
      timeout 150 "$PY" benchmarks/bench_server.py --model "$MODEL" --sampler posterior --clients "$clients" \
        --requests "$((2 * clients))" --sequential 2 --max-rows 64 --dtype bf16 --peak-tflops "$PEAK" \
        --json "$OUT/server_${mode}_${clients}.json" -- --device cuda --compile "$mode" \
        2>&1 | tee "$OUT/server_${mode}_${clients}.txt" || status=1
    }
  done
else
  skip "bench_server on CUDA" server
  echo "   rehearsal on the CPU instead (the same command, eager, a few requests):"
  timeout 200 "$PY" benchmarks/bench_server.py --model "$MODEL" --sampler posterior --clients 2 --requests 4 \
    --sequential 1 --max-rows 8 --dtype fp32 --peak-tflops 1 --json "$OUT/server_rehearsal.json" -- --device cpu \
    2>&1 | tee "$OUT/server_rehearsal.txt" || status=1
fi
fi

if part 4; then
step "4. ours against diffusers' VQDiffusionPipeline on the same weights"
if [ $cuda = 1 ]; then
  timeout 420 "$PY" benchmarks/bench_diffusers.py --device cuda --dtype bf16 --model "$MODEL" --quick \
    --single-trials 2 2>&1 | tee "$OUT/diffusers.txt" || status=1
else skip "bench_diffusers on CUDA" diffusers; fi
fi

echo "gpu_serve: exit $status; results in $OUT"
exit $status
