#!/usr/bin/env bash
# Table 1 of the paper on the shapes benchmark: no guidance, zero-shot guidance, guidance with a
# null text, and the learnable null. As in the paper, the last three are fine-tunes of ONE base model.
#
#   base        vqdiff train transformer --null-mode none   (captions never dropped: no guidance)
#   zero-shot   the base model, sampled with --uncond empty (the empty prompt as the uncond branch)
#   null text   vqdiff train null-cond --null-mode empty     (fine-tuned with captions dropped to "")
#   learnable   vqdiff train null-cond --null-mode learnable (fine-tuned with the learnable null)
#
# Every step is resumable: rerun the script to continue after an interruption (each trainer resumes
# from its run folder's checkpoint). Time per step: docs/RESULTS.md, Table 1. Usage, from the repository root:
#     DATA=/path/to/shapes60k VQVAE=models/default/vqvae BASE_STEPS=6000 FT_STEPS=1500 bash benchmarks/table1.sh
# DATA is an image-caption folder (model/train/data.py); the README of models/default says how to write one.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA to an image-caption folder}"
VQVAE=${VQVAE:-models/default/vqvae}
OUT=${OUT:-runs/table1}
BASE_STEPS=${BASE_STEPS:-6000}
FT_STEPS=${FT_STEPS:-1500}
N=${N:-100}
VQ=.venv/bin/vqdiff

$VQ train transformer --data "$DATA" --vqvae "$VQVAE" --out "$OUT/base" --preset shapes --steps "$BASE_STEPS" \
    --lr 5e-4 --warmup 200 --min-lr 2e-5 --null-mode none --quiet
$VQ train null-cond --data "$DATA" --model "$OUT/base/model" --out "$OUT/null-text" --steps "$FT_STEPS" \
    --null-mode empty --quiet
$VQ train null-cond --data "$DATA" --model "$OUT/base/model" --out "$OUT/learnable" --steps "$FT_STEPS" \
    --null-mode learnable --quiet

run() {  # name, model, extra eval flags
    echo "## $1"
    $VQ eval --model "$2" --kind one,two --n "$N" --samples 2 --steps 16 --quiet "${@:3}"
}
{
    run "no guidance" "$OUT/base/model" --guidance-scale 1 --uncond empty
    for g in 2 3 5; do
        run "zero-shot guidance, g=$g" "$OUT/base/model" --guidance-scale "$g" --uncond empty
        run "null text, g=$g" "$OUT/null-text/model" --guidance-scale "$g" --uncond empty
        run "learnable null, g=$g" "$OUT/learnable/model" --guidance-scale "$g" --uncond null
    done
} | tee "$OUT/table1.txt"
