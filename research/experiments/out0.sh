#!/usr/bin/env bash
# Measurement: does the fine-tuned head read the pretrained final GroupNorm + SiLU (out.0)
# or the un-normalised decoder features? MoNuSeg, DDPM pretrained on the 30 train images (the test
# split left out), full fine-tuning with k = 3, 3 seeds, out.0 kept vs dropped, scratch alongside.
# Usage: bash experiments/out0.sh [OUT]   (from research/, after `make install`); SEEDS="0 1" runs
# only those seeds (two such processes share the work); runs with an eval_test/metrics.json are kept.
set -euo pipefail
DATA=${DATA:-../../shared/datasets/monuseg}
OUT=${1:-experiments/out/out0}
L=../.venv/bin/labeldiff
[ -f "$OUT/pretrain/model.safetensors" ] || $L pretrain --data "$DATA" --out "$OUT/pretrain" --size 64 --scale 0.25 \
    --channels 3 --unet-channels 32,64,128 --attention 0,0,0 --steps 2000 --batch-size 16 --lr 1e-3 \
    --warmup-steps 100 --ema-decay 0.999 --overwrite
for seed in ${SEEDS:-0 1 2}; do
  for run in keep0 keep1 scratch; do
    dir="$OUT/${run}_seed$seed"
    [ -f "$dir/eval_test/metrics.json" ] && continue
    case $run in
      keep*) init=(--keep-out-norm "${run#keep}") ;;
      scratch) init=(--from-scratch) ;;
    esac
    $L finetune --data "$DATA" --pretrained "$OUT/pretrain" --labels 3 --seed "$seed" "${init[@]}" --out "$dir" --overwrite
    $L evaluate --model "$dir" --split test --out "$dir/eval_test"
  done
done
../.venv/bin/python experiments/aggregate.py "$OUT"
