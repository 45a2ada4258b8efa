#!/usr/bin/env bash
# Measurement: labeled source → few-shot target (the hybrid paper's protocol).
# Source kvasir_seg (880 labeled train images), target cvc_clinicdb: a video-disjoint split
# (`labeldiff split`, ≥ 30 % of the frames in test, whole videos), k = 4 labeled target frames,
# full fine-tuning, 3 seeds, evaluated on the test videos at 384×288.
# Whole images resized to 64² (polyps need the whole frame), CPU-scale recipes.
# Rows: hybrid (λ = 1), supervised, scratch; plus each source model applied to the target directly.
# Usage: bash experiments/kvasir_to_cvc.sh [OUT]   (from research/)
set -euo pipefail
SRC=${SRC:-../../shared/datasets/kvasir_seg}
TGT=${TGT:-../../shared/datasets/cvc_clinicdb}
OUT=${1:-experiments/out/kvasir_to_cvc}
PRE_STEPS=${PRE_STEPS:-2000}
FT_STEPS=${FT_STEPS:-300}
L=../.venv/bin/labeldiff
COMMON="--size 64 --mode resize --channels 3"
mkdir -p "$OUT"
[ -f "$OUT/cvc_split.json" ] || $L split --data "$TGT" --test-fraction 0.3 --seed 0 --out "$OUT/cvc_split.json"

for m in hybrid supervised; do
  if [ ! -f "$OUT/pretrain_$m/model.safetensors" ]; then
    /usr/bin/time -f "pretrain $m: %e s wall" $L pretrain --data "$SRC" --out "$OUT/pretrain_$m" \
        --recipe $m-cpu $COMMON --train-split train --steps "$PRE_STEPS" --overwrite
  fi
  [ -f "$OUT/pretrain_$m/eval_val/metrics.json" ] || $L evaluate --model "$OUT/pretrain_$m" --split val --out "$OUT/pretrain_$m/eval_val"
  [ -f "$OUT/direct_$m/metrics.json" ] || \
    $L evaluate --model "$OUT/pretrain_$m" --data "$TGT" --split-file "$OUT/cvc_split.json" --split test --out "$OUT/direct_$m"
done
for seed in 0 1 2; do
  for init in hybrid supervised scratch; do
    run="$OUT/${init}_seed$seed"
    [ -f "$run/eval_test/metrics.json" ] && continue
    case $init in  # scratch: the same UNet (taken from the hybrid run's config), random weights
      scratch) pre=(--pretrained "$OUT/pretrain_hybrid" --from-scratch) ;;
      *) pre=(--pretrained "$OUT/pretrain_$init") ;;
    esac
    $L finetune --data "$TGT" --split-file "$OUT/cvc_split.json" "${pre[@]}" \
        --labels 4 --seed $seed --out "$run" $COMMON --recipe finetune-cpu --steps "$FT_STEPS" --overwrite
    $L evaluate --model "$run" --split test --out "$run/eval_test"
  done
done
../.venv/bin/python experiments/aggregate.py "$OUT"
