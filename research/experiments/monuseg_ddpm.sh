#!/usr/bin/env bash
# Measurement: DDPM pretraining on MoNuSeg (all 44 images, no masks: --include-test, the
# transductive protocol the README tables were measured with), full fine-tuning with
# k = 3 labeled train images vs the identical network from scratch, 3 seeds, evaluated on the 14
# official test images at the original 1000×1000 resolution.
# Input: images scaled by 0.25 (1000² → 250²), random 64² crops; sliding-window inference.
# Usage: bash experiments/monuseg_ddpm.sh [OUT]   (from research/, after `make install`)
set -euo pipefail
DATA=${DATA:-../../shared/datasets/monuseg}
OUT=${1:-experiments/out/monuseg_ddpm}
PRE_STEPS=${PRE_STEPS:-2000}
FT_STEPS=${FT_STEPS:-300}
L=../.venv/bin/labeldiff
COMMON="--size 64 --scale 0.25 --channels 3 --unet-channels 32,64,128 --attention 0,0,0"

$L pretrain --data "$DATA/images" --out "$OUT/pretrain" $COMMON --include-test \
    --steps "$PRE_STEPS" --batch-size 16 --lr 1e-3 --warmup-steps 100 --ema-decay 0.999 --overwrite
for seed in 0 1 2; do
  $L finetune --data "$DATA" --pretrained "$OUT/pretrain" --labels 3 --seed $seed \
      --out "$OUT/pretrained_seed$seed" $COMMON --steps "$FT_STEPS" --overwrite
  $L finetune --data "$DATA" --pretrained "$OUT/pretrain" --from-scratch --labels 3 --seed $seed \
      --out "$OUT/scratch_seed$seed" $COMMON --steps "$FT_STEPS" --overwrite
  for init in pretrained scratch; do
    $L evaluate --model "$OUT/${init}_seed$seed" --split test --out "$OUT/${init}_seed$seed/eval_test"
  done
done
../.venv/bin/python experiments/aggregate.py "$OUT"
