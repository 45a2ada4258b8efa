#!/usr/bin/env bash
# Measurement: every transfer strategy on MoNuSeg, k = 3 labeled train images, 3 seeds, the 14
# official test images at 1000×1000. Backbones: the DDPM run of monuseg_ddpm.sh and the MDM run of
# monuseg_methods.sh (2000 pretraining steps each). Strategies: probe with the default features
# (ddpm: t = 50,150,250; mdm: t = 50; decoder blocks 1, 2), probe with --features auto, linear
# (head only), decoder (encoder frozen); full and scratch are the runs of those scripts (linked).
# Usage: bash experiments/monuseg_transfer.sh [OUT] [BACKBONES...]   (from research/)
set -euo pipefail
DATA=${DATA:-../../shared/datasets/monuseg}
OUT=${1:-experiments/out/monuseg_transfer}
shift || true
BACKBONES=${*:-ddpm mdm}
L=../.venv/bin/labeldiff
COMMON="--size 64 --scale 0.25 --channels 3"
declare -A PRE=([ddpm]=experiments/out/monuseg_ddpm/pretrain [mdm]=experiments/out/monuseg_methods/pretrain_mdm)
declare -A FULL=([ddpm]=experiments/out/monuseg_ddpm/pretrained [mdm]=experiments/out/monuseg_methods/mdm)
mkdir -p "$OUT"
for b in $BACKBONES; do
  for seed in 0 1 2; do
    [ -e "$OUT/${b}_full_seed$seed" ] || ln -s "$(realpath "${FULL[$b]}_seed$seed")" "$OUT/${b}_full_seed$seed"
    [ -e "$OUT/${b}_scratch_seed$seed" ] || \
      ln -s "$(realpath experiments/out/monuseg_ddpm/scratch_seed$seed)" "$OUT/${b}_scratch_seed$seed"
  done
  for s in linear decoder probe probe_auto; do
    for seed in 0 1 2; do
      run="$OUT/${b}_${s}_seed$seed"
      [ -f "$run/eval_test/metrics.json" ] && continue
      case $s in
        probe) flags=(--strategy probe --features default) ;;
        probe_auto) flags=(--strategy probe --features auto) ;;
        *) flags=(--strategy $s --recipe finetune-cpu) ;;
      esac
      /usr/bin/time -f "$b $s seed $seed: %e s wall" $L finetune --data "$DATA" --pretrained "${PRE[$b]}" \
          --labels 3 --seed $seed --out "$run" $COMMON "${flags[@]}" --overwrite
      $L evaluate --model "$run" --split test --out "$run/eval_test"
    done
  done
done
../.venv/bin/python experiments/aggregate.py "$OUT"
