#!/usr/bin/env bash
# Table 1 with standard errors and the composition levers, in ONE run of under 10 minutes on a GPU
# machine. Nothing is carried beside the tree: the VQVAE is models/default/vqvae, and the
# CLIP-pretrained text encoders are trained here first (`vqdiff train clip --device cuda`).
#
#   1. data: `placed` (the default model's training set: train split, place-rich captions), and for
#      the levers `all60k` (split all: held-out pairs named too, for a text encoder) and `unpaired`
#      (held-out pairs in images, never named in a caption);
#   2. text encoders, side by side: clip_train on `placed` (the recipe of the default's clip1, on
#      120k images instead of its 60k), and, when RUNS has clipall, clip_all on `all60k`;
#   3. Table 1 (TABLE1=1): a base with no null condition (`--null-mode none`, batch $BASE_BATCH, as
#      many images as the default saw when the budget allows: 9072 x 256), then FT_SEEDS x {null text,
#      learnable null} fine-tunes of EQUAL steps ($FT_STEPS, batch $FT_BATCH; training seed k), then
#      benchmarks/table1_eval.py: no guidance (the base, g = 1), zero-shot (the base, g = 2, 3, 5) on
#      prompt seeds $FT_SEEDS, and each fine-tune k at g = 1, 2, 3, 5 on prompt seed k;
#   4. the composition runs of $RUNS, beside the base (each with --time-budget-s $BASE_BUDGET):
#        unpbase  the default's recipe from its first step (clip_train, learnable null, the base's batch,
#                 rate and budget) on `placed` and `unpaired` together (one index over both folders):
#                 the pairs in images from the first step, never in a caption; $UNPBASE_FLAGS adds
#                 flags (e.g. --summary-drop 0.5); converted with the default's generation defaults
#                 and brought back as the candidate model (unpbase.tgz)
#        unp      models/default trained on `unpaired` (lr 1.5e-4, cosine to 2e-5): the data lever
#        unp_hi   the same at lr 3e-4
#        clipall  the base's recipe with clip_all for clip_train: a text encoder pretrained on every
#                 pair, then trained on with the transformer on `placed` (the pairs stay out of the
#                 generator's captions); compared with the base at g = 1 on held-out and train prompts
#      and `vqdiff eval` of each (held-out and train prompts; unpbase; unp*, and their weight mixes with
#      models/default at $MIX_ALPHAS: the default sampler, prompt seeds 1 and 0 (mixes: 0); clipall: with the
#      base, g = 1, 16 forwards, table1_eval);
#   5. to $OUT (at most 8 files come back): env.txt, timeline.txt, table1.jsonl, table1.md,
#      evals.txt, logs.tgz, and the first of unpbase, unp, unp_hi run (fp16, no VQVAE: NAME.tgz).
# From the repository root, on the GPU machine:
#     OUT=/tmp/gpu_train bash benchmarks/gpu_train.sh
# A CPU rehearsal (25 minutes on 2 cores, about 30 processes at once in the evaluation stage; the
# deadline cuts some evaluations there; commit 2a59a41 plus the mixes' seed rule, 2026-12-02):
#     DEVICE=cpu PYTHON=.venv/bin/python N=800 N_ALL=400 N_UNP=800 WORKERS=2 CLIP_STEPS=20 CLIP_BATCH=32 \
#       CLIP_BUDGET=120 BASE_BATCH=16 BASE_BUDGET=90 FT_STEPS=4 FT_BATCH=16 FT_BUDGET=400 EVAL_N=3 EVAL_BATCH=64 \
#       MIX_ALPHAS=0.5 TOTAL=1500 OUT=/tmp/gpu_train_cpu bash benchmarks/gpu_train.sh
# Run again with the default RUNS (unpbase clipall) on 2026-12-07, commit 11e9e85: 1476 s, exit 0, seven files
# (the fine-tunes' Table 1 rows cut by the deadline, as before). The unpbase path alone (4 minutes):
# the same with RUNS=unpbase TABLE1=0 TOTAL=900.
# Commits 7184a13 and 44176ea ran this script's earlier form (runs joint, clipfrozen, clipinit, more,
# more_s1, more_lo, carried VQVAE and text encoder); docs/RESULTS.md has their results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu_train}
WORK=${WORK:-/tmp/gpu_train}
DEVICE=${DEVICE:-cuda}
N=${N:-120000}             # images of `placed`
N_ALL=${N_ALL:-60000}      # images of `all60k` (clip_all's data; clip1 saw 60k)
N_UNP=${N_UNP:-60000}      # images of `unpaired`
WORKERS=${WORKERS:-14}
RUNS=${RUNS-unpbase clipall}   # may be empty: Table 1 alone
UNPBASE_FLAGS=${UNPBASE_FLAGS-}
TABLE1=${TABLE1:-1}
CLIP_STEPS=${CLIP_STEPS:-1500}
CLIP_BATCH=${CLIP_BATCH:-256}
CLIP_BUDGET=${CLIP_BUDGET:-90}   # loading 120k images is in it
BASE_BATCH=${BASE_BATCH:-1024}
BASE_LR=${BASE_LR:-8e-4}
BASE_BUDGET=${BASE_BUDGET:-240}
FT_STEPS=${FT_STEPS:-500}  # every fine-tune the same steps (a budget of FT_BUDGET is only a hard stop)
FT_BATCH=${FT_BATCH:-256}
FT_BUDGET=${FT_BUDGET:-110}
FT_SEEDS=${FT_SEEDS:-0 1 2}
MIX_ALPHAS=${MIX_ALPHAS-0.5 0.75}
EVAL_N=${EVAL_N:-100}
EVAL_BATCH=${EVAL_BATCH:-512}
TOTAL=${TOTAL:-575}        # the whole script's deadline in seconds; evaluations are cut to fit it
PY=${PYTHON:-python3}
VQ="$PY -m vqdiff.cli"
VQVAE=models/default/vqvae
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$OUT"
T0=$SECONDS
stamp() { echo "[$((SECONDS - T0)) s] $*" | tee -a "$OUT/timeline.txt"; }
left() { echo $((T0 + TOTAL - SECONDS - ${1:-0})); }  # seconds left before the deadline, minus a reserve
has() { [[ " $RUNS " == *" $1 "* ]]; }
for j in $RUNS; do
  case $j in unpbase|unp|unp_hi|clipall) ;; *) echo "gpu_train: unknown run $j (unpbase, unp, unp_hi, clipall)"; exit 2 ;; esac
done

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')"
  git log -1 --format='commit %H %cd' 2>/dev/null
} | tee "$OUT/env.txt"
rm -rf "$WORK" && mkdir -p "$WORK"

stamp "data, and the trainers' CUDA tests"
( $PY -m pytest -q -p no:cacheprovider tests/integration/test_train_transformer.py tests/integration/test_train_clip.py \
    -k cuda >"$WORK/cuda_test.out" 2>&1; echo "exit $?" >>"$WORK/cuda_test.out" ) &
TESTS=$!
data() {  # folder, n, split, workers
  $VQ data shapes "$WORK/$1" --n "$2" --split "$3" --workers "$4" --place-rate 1.0 --place-rate-many 0.6 --quiet \
    >"$WORK/data_$1.out" 2>&1 || { echo "gpu_train: data $1 failed"; cat "$WORK/data_$1.out"; exit 1; }
}
w_unp=0 w_all=0
{ has unpbase || has unp || has unp_hi; } && w_unp=$((WORKERS / 3 > 0 ? WORKERS / 3 : 1))
has clipall && w_all=$((WORKERS / 6 + 1))
w_placed=$((WORKERS - w_unp - w_all > 0 ? WORKERS - w_unp - w_all : 1))
data placed "$N" train "$w_placed" &
D_PLACED=$!
D_OTHER=()
((w_all > 0)) && { data all60k "$N_ALL" all "$w_all" & D_OTHER+=($!); }
((w_unp > 0)) && { data unpaired "$N_UNP" unpaired "$w_unp" & D_OTHER+=($!); }
wait $D_PLACED || exit 1
stamp "placed written"

clip() {  # name, data
  $VQ train clip --data "$WORK/$2" --out "$WORK/$1" --device "$DEVICE" --precision bf16 --steps "$CLIP_STEPS" \
    --batch-size "$CLIP_BATCH" --lr 5e-4 --warmup 100 --time-budget-s "$CLIP_BUDGET" --ckpt-every 100000 \
    --log-every 100 --quiet >"$WORK/$1.out" 2>&1
}
clip clip_train placed &
C_TRAIN=$!
for p in "${D_OTHER[@]}"; do wait "$p" || exit 1; done
has clipall && { clip clip_all all60k || echo "gpu_train: clip_all failed"; tail -3 "$WORK/clip_all.out"; }
wait $C_TRAIN || { echo "gpu_train: clip_train failed"; tail -5 "$WORK/clip_train.out"; exit 1; }
wait $TESTS
cat "$WORK/cuda_test.out"
stamp "text encoders trained: $(tail -qn1 "$WORK"/clip_*/train.log | tr '\n' ' ')"

base() {  # name, text encoder, data, extra flags
  $VQ train transformer --data "$WORK/$3" --vqvae "$VQVAE" --text-encoder "$WORK/$2" --out "$WORK/$1" \
    --device "$DEVICE" --precision bf16 --steps $((9072 * 256 / BASE_BATCH)) --batch-size "$BASE_BATCH" --lr "$BASE_LR" \
    --warmup 500 --min-lr 2e-5 --time-budget-s "$BASE_BUDGET" --ckpt-every 100000 --log-every 100 --quiet "${@:4}" \
    >"$WORK/$1.out" 2>&1
}
declare -A PID
[[ $TABLE1 == 1 ]] && { base base clip_train placed --null-mode none & PID[base]=$!; }
has clipall && { base clipall clip_all placed --null-mode none & PID[clipall]=$!; }
if has unpbase; then  # one index over placed's images, then unpaired's (read_index resolves ../)
  mkdir -p "$WORK/joint"
  for f in placed unpaired; do sed "s#\"image\": \"#\"image\": \"../$f/#" "$WORK/$f/captions.jsonl"; done >"$WORK/joint/captions.jsonl"
  base unpbase clip_train joint $UNPBASE_FLAGS & PID[unpbase]=$!
fi
for j in unp unp_hi; do
  has $j || continue
  lr=$([[ $j == unp ]] && echo 1.5e-4 || echo 3e-4)
  $VQ train transformer --data "$WORK/unpaired" --init models/default --out "$WORK/$j" --device "$DEVICE" \
    --precision bf16 --steps 100000 --batch-size 256 --lr "$lr" --warmup 200 --min-lr 2e-5 \
    --time-budget-s "$BASE_BUDGET" --ckpt-every 100000 --log-every 100 --quiet >"$WORK/$j.out" 2>&1 &
  PID[$j]=$!
done
for j in "${!PID[@]}"; do
  wait "${PID[$j]}"
  stamp "$j: exit $? ($(tail -n1 "$WORK/$j/train.log" 2>/dev/null))"
done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >>"$OUT/timeline.txt" 2>&1

t1eval() {  # seconds, table1_eval eval flags
  if (($1 < 10)); then echo "(table1_eval ${*:2}: skipped, $1 s left)" >>"$WORK/eval_skipped.txt"; return; fi
  timeout "$1" $PY benchmarks/table1_eval.py eval --device "$DEVICE" --n "$EVAL_N" --batch "$EVAL_BATCH" "${@:2}" \
    >>"$WORK/t1eval.out" 2>&1 || echo "(table1_eval ${*:2}: exit $?)" >>"$WORK/eval_skipped.txt"
}
vqeval() {  # name, model, seconds, vqdiff eval flags
  if (($3 < 10)); then echo "(eval $1: skipped, $3 s left)" >"$WORK/eval_$1.txt"; return; fi
  timeout "$3" $VQ eval --model "$2" --device "$DEVICE" --kind one,two --n "$EVAL_N" --quiet "${@:4}" \
    >"$WORK/eval_$1.txt" 2>&1 || echo "(eval $1: exit $?)" >>"$WORK/eval_$1.txt"
}
# the composition runs' evaluations go on while the fine-tunes train; unp* also as weight mixes
# with models/default ((1 - a) default + a unp: `vqdiff convert --mix`), for a = $MIX_ALPHAS
s=$(left 60)
if has unpbase && [[ -d $WORK/unpbase/model ]]; then  # the candidate as it would ship: the default's generation defaults
  defaults=$($PY -c "import json; print(json.dumps(json.load(open('models/default/vqdiff.json'))['generation_defaults']))")
  $VQ convert "$WORK/unpbase/model" "$WORK/conv/unpbase" --dtype fp16 --defaults "$defaults" >/dev/null &&
    for seed in 1 0; do
      for split in heldout train; do vqeval "unpbase.$split.seed$seed" "$WORK/conv/unpbase" "$s" --split $split --seed $seed & done
    done
fi
for j in unp unp_hi; do
  has $j && [[ -d $WORK/$j/model ]] || continue
  for a in $MIX_ALPHAS; do $VQ convert models/default "$WORK/${j}_mix$a" --mix "$WORK/$j/model" --alpha "$a" >/dev/null; done
  for m in "$j" $(for a in $MIX_ALPHAS; do echo "${j}_mix$a"; done); do
    [[ $m == "$j" ]] && { dir=$WORK/$j/model; seeds="1 0"; } || { dir=$WORK/$m; seeds=0; }
    for seed in $seeds; do
      for split in heldout train; do
        vqeval "$m.$split.seed$seed" "$dir" "$s" --split $split --seed $seed &
      done
    done
  done
done
if has clipall; then
  for m in base clipall; do
    [[ -d $WORK/$m/model ]] || continue
    for split in heldout train; do
      t1eval "$s" --model "$WORK/$m/model" --setting "g = 1, text encoder of $m" --split $split --g 1 \
        --prompt-seeds 0 --out "$WORK/composition_$m.$split.jsonl" &
    done
  done
fi

if [[ $TABLE1 == 1 && -d $WORK/base/model ]]; then
  # the base's rows do not wait for the fine-tunes; each fine-tune is evaluated as soon as it ends
  for k in $FT_SEEDS; do
    t1eval "$(left 25)" --model "$WORK/base/model" --setting "no guidance" --uncond empty --g 1 --prompt-seeds "$k" \
      --out "$WORK/t1_base_s$k.jsonl" &&
    t1eval "$(left 25)" --model "$WORK/base/model" --setting "zero-shot" --uncond empty --g 2,3,5 --prompt-seeds "$k" \
      --out "$WORK/t1_base_s$k.jsonl" &
    for mode in empty learnable; do
      name=$([[ $mode == empty ]] && echo "null text" || echo "learnable null")
      uncond=$([[ $mode == empty ]] && echo empty || echo null)
      ( $VQ train null-cond --data "$WORK/placed" --model "$WORK/base/model" --out "$WORK/ft_${mode}_s$k" \
          --device "$DEVICE" --precision bf16 --steps "$FT_STEPS" --batch-size "$FT_BATCH" --null-mode $mode --seed "$k" \
          --time-budget-s "$FT_BUDGET" --ckpt-every 100000 --log-every 100 --quiet >"$WORK/ft_${mode}_s$k.out" 2>&1 ||
          echo "gpu_train: fine-tune ${mode} seed $k: exit $?"
        stamp "fine-tune ${mode} seed $k: $(tail -n1 "$WORK/ft_${mode}_s$k/train.log" 2>/dev/null)"
        t1eval "$(left 25)" --model "$WORK/ft_${mode}_s$k/model" --setting "$name" --uncond $uncond --g 1,2,3,5 \
          --prompt-seeds "$k" --replicate "$k" --out "$WORK/t1_ft_${mode}_s$k.jsonl" ) &
    done
  done
fi
wait
stamp "evaluated; packing"

cat "$WORK"/t1_*.jsonl >"$OUT/table1.jsonl" 2>/dev/null
{ [[ -s $OUT/table1.jsonl ]] && $PY benchmarks/table1_eval.py summary "$OUT/table1.jsonl"
  ls "$WORK"/composition_*.jsonl >/dev/null 2>&1 && { echo; echo "## composition: g = 1, 16 forwards";
    $PY benchmarks/table1_eval.py summary "$WORK"/composition_*.jsonl; }
  cat "$WORK/eval_skipped.txt" 2>/dev/null
} >"$OUT/table1.md" 2>&1
for f in "$WORK"/eval_*.txt; do [[ -f $f ]] && { echo "# $(basename "$f")"; cat "$f"; }; done >"$OUT/evals.txt"
for j in unpbase unp unp_hi; do
  has $j && [[ -d $WORK/$j/model ]] || continue
  [[ -d $WORK/conv/$j ]] || $VQ convert "$WORK/$j/model" "$WORK/conv/$j" --dtype fp16 >/dev/null
  [[ -d $WORK/conv/$j ]] &&
    tar czf "$OUT/$j.tgz" -C "$WORK/conv/$j" --exclude=./vqvae .  # ~15 MB: under 16 MiB a file
  break  # one model file: eight files come back at most
done
(cd "$WORK" && find . \( -name placed -o -name all60k -o -name unpaired -o -name joint -o -name conv \) -prune -o \
  \( -name train.log -o -name '*.out' -o -name '*.jsonl' -o -name 'eval_*.txt' \) -print | tar czf "$OUT/logs.tgz" -T -)
stamp "done"
echo "== table 1"; cat "$OUT/table1.md"
echo "== evaluations"; grep -E "^(one|two) |^# |exit|Error" "$OUT/evals.txt"
echo "== plans"; grep -h planned_steps "$WORK"/*/train.log; grep -h stopped "$WORK"/*/train.log
ls -la "$OUT"
