#!/usr/bin/env bash
# Table 1 of the paper on the shapes benchmark, settled: no guidance, zero-shot guidance, guidance
# with a null text, and the learnable null, with a standard error in every cell. As in the paper,
# the fine-tunes start from ONE base model that never saw a null condition.
#
#   data        `placed`: the default model's training set (train split, place-rich captions), N images
#   clip_train  a CLIP-pretrained text encoder on it (`vqdiff train clip`, the default's recipe)
#   base        `vqdiff train transformer --null-mode none` from clip_train: captions never dropped,
#               as long as the default model trained (BASE_STEPS x BASE_BATCH = 9072 x 256)
#   ft_M_sK     `vqdiff train null-cond --null-mode M --seed K` from the base, M = empty (null text)
#               or learnable; every fine-tune the same FT_STEPS x FT_BATCH, one per training seed K
#   cells/      benchmarks/table1_eval.py: replicate K is fine-tune seed K on prompt seed K; the base
#               gives "no guidance" (g = 1) and "zero-shot" (the empty prompt as the uncond branch,
#               g = 2, 3, 5) on the same prompt seeds, so every difference is paired by K
#   ALSO_STEPS  the base at g = 1 and each setting at g = ALSO_G again at these forwards (64: one token a
#               forward, the default sampler's), rows of their own kind: the test of whether guidance's
#               cost at 16 forwards comes from drawing 4 tokens at once
#   table1.md   the table (mean ± SE over the replicates) and the paper's orderings tested
#
# Every stage resumes: a stopped run goes on where it stopped when the same command is run again
# (the trainers resume from their checkpoints; an evaluation cell is redone whole). Replicate 0 is
# finished (its fine-tunes and its cells) before replicate 1 starts, so a partial run already reads.
# From the repository root:
#     WORK=/path/to/table1 bash benchmarks/table1.sh
# On 2 cores (AMD EPYC, bf16 autocast): data 1 min, clip_train 20 min (0.8 s a step), tokenizing the
# images 10 min, the base ~10 h (4.0-4.2 s a step), each fine-tune ~35 min, each evaluation cell a few
# minutes at 16 forwards, four times that at 64: about 16 hours in all, so where a machine cannot
# keep it running that long it is simply run again after each stop.
# A tiny rehearsal (10 minutes on 2 cores shared with another training run):
#     WORK=/tmp/t1_tiny N=600 CLIP_STEPS=10 CLIP_BATCH=32 BASE_STEPS=10 BASE_BATCH=16 FT_STEPS=4 FT_BATCH=16 \
#       FT_SEEDS="0 1" EVAL_N=2 EVAL_SAMPLES=1 ALSO_STEPS=4 bash benchmarks/table1.sh
# (benchmarks/gpu_train.sh runs the same protocol with time budgets in one GPU call.)
# A run carried between machines (a stop that does not keep the machine loses WORK): with CARRY set,
#     WORK=... CARRY=benchmarks/table1_state bash benchmarks/table1.sh carry
# packs what the run cannot make again (~16 MB: the base's weights in fp16, the logs, the cells;
# benchmarks/table1_carry.py says what) into CARRY, to be committed, and on a machine whose WORK is
# empty the run lays CARRY out first and goes on from it (the transformer trainer resumes from
# weights alone: AdamW's moments start afresh under a 100-step re-warm of the learning rate).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-$PWD/out/table1}
DEVICE=${DEVICE:-cpu}
PRECISION=${PRECISION:-bf16}
N=${N:-120000}
CLIP_STEPS=${CLIP_STEPS:-1500}
CLIP_BATCH=${CLIP_BATCH:-256}
BASE_STEPS=${BASE_STEPS:-9072}
BASE_BATCH=${BASE_BATCH:-256}
BASE_LR=${BASE_LR:-8e-4}
FT_STEPS=${FT_STEPS:-500}
FT_BATCH=${FT_BATCH:-256}
FT_SEEDS=${FT_SEEDS:-0 1 2}
EVAL_N=${EVAL_N:-100}
EVAL_SAMPLES=${EVAL_SAMPLES:-2}
EVAL_BATCH=${EVAL_BATCH:-64}
ALSO_STEPS=${ALSO_STEPS-64}
ALSO_G=${ALSO_G:-2}
CKPT=${CKPT:-25}          # steps between checkpoints: what a stop can lose
CARRY=${CARRY:-}          # a folder the run is packed into (`carry`) and laid out from (an empty WORK)
PY=${PYTHON:-.venv/bin/python}
VQ="$PY -m vqdiff.cli"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [[ ${1:-} == carry ]]; then
  [[ -n $CARRY ]] || { echo "table1.sh carry: set CARRY, the folder to pack the run into" >&2; exit 2; }
  exec $PY benchmarks/table1_carry.py pack "$WORK" "$CARRY"
fi
mkdir -p "$WORK"
stamp() { echo "[$(date -u +%FT%TZ)] $*" | tee -a "$WORK/timeline.txt"; }
done_or() {  # stage name, command...: runs the command unless the stage is marked done, then marks it
  [[ -f $WORK/.done_$1 ]] && return 0
  stamp "$1: start"
  "${@:2}"
  touch "$WORK/.done_$1"
  stamp "$1: done"
}

data() {
  rm -rf "$WORK/placed"
  $VQ data shapes "$WORK/placed" --n "$N" --split train --place-rate 1.0 --place-rate-many 0.6 --workers 2 --quiet
}
clip() {
  $VQ train clip --data "$WORK/placed" --out "$WORK/clip_train" --device "$DEVICE" --precision "$PRECISION" \
    --steps "$CLIP_STEPS" --batch-size "$CLIP_BATCH" --lr 5e-4 --warmup 100 --ckpt-every "$CKPT" --log-every 50 --quiet
}
base() {
  $VQ train transformer --data "$WORK/placed" --vqvae models/default/vqvae --text-encoder "$WORK/clip_train" \
    --out "$WORK/base" --device "$DEVICE" --precision "$PRECISION" --null-mode none --steps "$BASE_STEPS" \
    --batch-size "$BASE_BATCH" --lr "$BASE_LR" --warmup 500 --min-lr 2e-5 --ckpt-every "$CKPT" --log-every 50 --quiet
}
finetune() {  # mode (empty | learnable), seed
  local out=$WORK/ft_$1_s$2
  mkdir -p "$out"
  [[ -f $out/tokens.pt || ! -f $WORK/base/tokens.pt ]] ||  # same images, same VQVAE: its key holds
    { cp "$WORK/base/tokens.pt" "$out/tokens.tmp" && mv "$out/tokens.tmp" "$out/tokens.pt"; }
  $VQ train null-cond --data "$WORK/placed" --model "$WORK/base/model" --out "$out" --device "$DEVICE" \
    --precision "$PRECISION" --null-mode "$1" --seed "$2" --steps "$FT_STEPS" --batch-size "$FT_BATCH" \
    --ckpt-every "$CKPT" --log-every 50 --quiet
}
cell() {  # file name, table1_eval flags: one JSON file per cell, written whole or not at all
  local f=$WORK/cells/$1.jsonl
  [[ -f $f ]] && return 0
  mkdir -p "$WORK/cells"
  rm -f "$f.part"
  $PY benchmarks/table1_eval.py eval --device "$DEVICE" --n "$EVAL_N" --samples "$EVAL_SAMPLES" \
    --batch "$EVAL_BATCH" --out "$f.part" "${@:2}" >/dev/null
  mv "$f.part" "$f"
  stamp "cell $1: $(tr '\n' ' ' <"$f" | cut -c1-400)"
}

replicate_cells() {  # replicate k, forwards, zero-shot's g values, the fine-tunes' g values
  local k=$1 f=$2 t
  t=$([[ $f == 16 ]] || echo "_f$f")  # 16: table1_eval.py's STEPS, the table's own rows
  cell "base_g1${t}_s$k" --model "$WORK/base/model" --setting "no guidance" --uncond empty --g 1 --prompt-seeds "$k" \
    --steps "$f"
  for g in $3; do
    cell "base_g${g}${t}_s$k" --model "$WORK/base/model" --setting "zero-shot" --uncond empty --g "$g" \
      --prompt-seeds "$k" --steps "$f"
  done
  for g in $4; do
    cell "empty_g${g}${t}_s$k" --model "$WORK/ft_empty_s$k/model" --setting "null text" --uncond empty --g "$g" \
      --prompt-seeds "$k" --replicate "$k" --steps "$f"
    cell "learnable_g${g}${t}_s$k" --model "$WORK/ft_learnable_s$k/model" --setting "learnable null" --uncond null \
      --g "$g" --prompt-seeds "$k" --replicate "$k" --steps "$f"
  done
}

if [[ -n $CARRY && ! -f $WORK/timeline.txt && -f $CARRY/timeline.txt ]]; then
  $PY benchmarks/table1_carry.py unpack "$CARRY" "$WORK"
  stamp "laid out from $CARRY: $(tr '\n' ' ' <"$CARRY/done.txt")"
fi
done_or data data
done_or clip_train clip
done_or base base
for k in $FT_SEEDS; do
  done_or "ft_empty_s$k" finetune empty "$k"
  done_or "ft_learnable_s$k" finetune learnable "$k"
  replicate_cells "$k" 16 "2 3 5" "1 2 3 5"
  for f in $ALSO_STEPS; do replicate_cells "$k" "$f" "$ALSO_G" "$ALSO_G"; done
  $PY benchmarks/table1_eval.py summary "$WORK"/cells/*.jsonl >"$WORK/table1.md"
  touch "$WORK/.done_replicate_$k"
  stamp "replicate $k: done; $WORK/table1.md"
done
cat "$WORK/table1.md"
