#!/usr/bin/env bash
# Measurement: every pretext task on MoNuSeg at CPU scale, full fine-tuning with k = 3 labeled
# train images, 3 seeds, evaluated on the 14 official test images at 1000×1000.
# Same protocol as monuseg_ddpm.sh (images scaled 0.25, 64² crops, 2000 pretraining steps of batch 16,
# 300 fine-tuning steps); the DDPM row and the UNet scratch row come from that script.
# - mdm, mae: the diffusion UNet (same network as ddpm); scratch = UNet from random weights.
# - ddep, dep: EfficientNet-Lite0 encoder + UNet decoder; scratch = that network from random weights;
#   imagenet_only = ImageNet encoder + random decoder (the DDeP paper's "supervised" baseline, i.e.
#   `pretrain --method ddep --steps 0`).
# - hybrid: needs masks, so it pretrains on the 30 labeled train images (all of them — not a k = 3
#   setting); it is run for its samples and as a direct segmenter, fine-tuned rows are shown for reference.
# Usage: bash experiments/monuseg_methods.sh [OUT] [METHODS...]   (from research/)
set -euo pipefail
DATA=${DATA:-../../shared/datasets/monuseg}
OUT=${1:-experiments/out/monuseg_methods}
shift || true
METHODS=${*:-ddep dep mdm mae hybrid}
PRE_STEPS=${PRE_STEPS:-2000}
FT_STEPS=${FT_STEPS:-300}
L=../.venv/bin/labeldiff
COMMON="--size 64 --scale 0.25 --channels 3"
# the README's tables: pretraining on all 44 images (--include-test, transductive, as measured then);
# their MAE-style row used the whole-image SSIM loss, the mae default before the masked-patch MSE
declare -A PRE_FLAGS=([mae]="--loss ssim")

finetune_eval() {  # NAME PRETRAINED_RUN [extra finetune flags]
  local name=$1 pre=$2; shift 2
  for seed in 0 1 2; do
    if [ ! -f "$OUT/${name}_seed$seed/eval_test/metrics.json" ]; then
      $L finetune --data "$DATA" --pretrained "$pre" --labels 3 --seed $seed --out "$OUT/${name}_seed$seed" \
          $COMMON --recipe finetune-cpu --steps "$FT_STEPS" --overwrite "$@"
      $L evaluate --model "$OUT/${name}_seed$seed" --split test --out "$OUT/${name}_seed$seed/eval_test"
    fi
  done
}

for m in $METHODS; do
  if [ ! -f "$OUT/pretrain_$m/model.safetensors" ]; then
    /usr/bin/time -f "pretrain $m: %e s wall" $L pretrain --data "$DATA" --out "$OUT/pretrain_$m" \
        --recipe $m-cpu $COMMON --steps "$PRE_STEPS" --include-test ${PRE_FLAGS[$m]:-} --overwrite
  fi
  finetune_eval "$m" "$OUT/pretrain_$m"
  if [ "$m" = ddep ]; then
    [ -f "$OUT/pretrain_imagenet_only/model.safetensors" ] || \
      $L pretrain --data "$DATA" --out "$OUT/pretrain_imagenet_only" --recipe ddep-cpu $COMMON --steps 0 --overwrite
    finetune_eval imagenet_only "$OUT/pretrain_imagenet_only"
    finetune_eval effunet_scratch "$OUT/pretrain_imagenet_only" --from-scratch
  fi
  if [ "$m" = hybrid ]; then
    [ -f "$OUT/pretrain_hybrid/eval_test/metrics.json" ] || $L evaluate --model "$OUT/pretrain_hybrid" --split test
    $L sample --model "$OUT/pretrain_hybrid" --out "$OUT/samples_hybrid" --n 16 --sampler ddim --steps 100
  fi
done
../.venv/bin/python experiments/aggregate.py "$OUT"
