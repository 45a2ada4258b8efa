#!/usr/bin/env bash
# The research notebook's generative page ("Synthetic (image, mask) pairs"): the MoNuSeg hybrid run and its study, the Kvasir → CVC
# study (its hybrid first), then FID vs length. Resumable: rerun after an interruption.
set -e
cd "$(dirname "$0")/.."
L=../.venv/bin/labeldiff
R=studies/runs/synthetic
pre() {  # NAME DATA MODE-FLAGS…: 1000 hybrid steps, small network; resumes a partial run, skips a finished one
  local name=$1 data=$2; shift 2
  [ -f $R/$name/model.safetensors ] && return 0
  local resume=""; [ -d $R/$name ] && resume="--resume"
  $L pretrain --data $data --out $R/$name --recipe hybrid-cpu --steps 1000 --unet-channels 16,32,64 \
      --ema-decay 0.995 --checkpoint-every 250 "$@" $resume
}
# fid_vs_length.sh scores the EMA weights of every checkpoint (250, 500, 750, 1000); the run keeps only
# its last two checkpoints, so copy each one as it appears
mkdir -p $R/ema_monuseg_hybrid
( set +e; while true; do for d in $R/monuseg_hybrid/checkpoints/step_*; do
    if [ -f $d/ema.safetensors ] && [ ! -f $R/ema_monuseg_hybrid/$(basename $d).safetensors ]; then
      cp $d/ema.safetensors $R/ema_monuseg_hybrid/$(basename $d).safetensors; fi; done; sleep 10; done ) &
copier=$!
pre monuseg_hybrid ../../shared/datasets/monuseg --scale 0.25
sleep 12; kill $copier 2>/dev/null || true
$L study studies/synthetic_monuseg.yaml --out studies/runs/synthetic_monuseg --workers 2
$L study studies/synthetic_cvc.yaml --out studies/runs/synthetic_cvc --pretrain-only   # the hybrid on Kvasir-SEG
$L study studies/synthetic_cvc.yaml --out studies/runs/synthetic_cvc --workers 2
bash experiments/fid_vs_length.sh
$L study studies/robustness_cvc.yaml --out studies/runs/robustness_cvc --pretrain-dir studies/runs/synthetic_cvc/pretrain --workers 2
