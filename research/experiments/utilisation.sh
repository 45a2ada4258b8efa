#!/usr/bin/env bash
# How much of the CPU a training step uses: `labeldiff bench loop` on the demo's network (ddpm-quick: UNet
# (16, 32, 64)) and the CPU recipe's (ddpm-cpu: UNet (32, 64, 128)), batch 16 at 64² on the demo's brain slices,
# in fp32 (what an AVX2-only CPU computes) and bf16, with the profiler's top operators, and the demo's step in
# channels-last. Run on an otherwise idle machine; the output goes to research/results/utilisation/.
#   bash research/experiments/utilisation.sh DATA   (DATA: the brain-demo volume folder a demo study prepares)
set -euo pipefail
DATA=${1:?give the brain-demo folder, e.g. research/studies/runs/demo_recheck/data/brain-demo}
OUT=research/results/utilisation
mkdir -p "$OUT"
L=.venv/bin/labeldiff
{ lscpu | grep -E "Model name|^CPU\(s\)"; echo "flags: $(grep -o -w -E 'avx2|avx512f|avx512_bf16|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"; } > "$OUT/cpu.txt"
bench() {  # name, then bench loop options
  local name=$1; shift
  $L bench loop --data "$DATA" --channels 1 --mode resize --size 64 --batch-size 16 --workers 0 --steps 20 "$@" \
    2>/dev/null | grep -v "^next:" > "$OUT/$name.md"
}
bench demo-fp32 --recipe ddpm-quick --precision fp32 --profile
bench demo-fp32-channels-last --recipe ddpm-quick --precision fp32 --set train.channels_last=true --profile
bench recipe-fp32 --recipe ddpm-cpu --precision fp32 --profile
