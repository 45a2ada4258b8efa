#!/usr/bin/env bash
# One-seed smoke test of finetune --synthetic on MoNuSeg (README, "Synthetic (image, mask) pairs"); not a measurement.
set -e
cd "$(dirname "$0")/.."
L=.venv/bin/labeldiff
D=../shared/datasets/monuseg
S=${1:-/tmp/synthetic_smoke}
t0=$(date +%s)
$L pretrain --data $D --out $S/hybrid --recipe recipes/hybrid-cpu.yaml --steps 300 --unet-channels 16,32,64 --ema-decay 0.99 --overwrite 2>&1 | tr '\r' '\n' | grep -v "step/s" | tail -3
echo "pretrain $(( $(date +%s) - t0 )) s"
for syn in none 64; do
  extra=""; [ $syn != none ] && extra="--synthetic $S/hybrid:64"
  t1=$(date +%s)
  $L finetune --data $D --out $S/ft_$syn --pretrained $S/hybrid --strategy full --labels 1 --seed 0 --recipe recipes/finetune-cpu.yaml --steps 150 $extra --overwrite 2>&1 | tr '\r' '\n' | grep -v "step/s\|it/s" | grep -i "finetune\|synthetic\|loaded" | head -5
  $L evaluate --model $S/ft_$syn --data $D --split test --out $S/ft_$syn/eval 2>&1 | tr '\r' '\n' | grep -v "it/s\|img/s" | tail -3
  echo "$syn $(( $(date +%s) - t1 )) s"
done
