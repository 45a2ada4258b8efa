#!/usr/bin/env bash
# What a machine with a CUDA GPU checks and times (the guide "Several processes and GPUs"), in one pass, each part under its own
# time limit so that one stuck part does not cost the rest. Run from the checkout; needs labeldiff importable
# (installed, or PYTHONPATH=src) and its dependencies, and a copy of the benchmark data:
#
#   bash research/experiments/gpu_check.sh OUT DATASETS [PARTS]
#
# PARTS: a comma-separated choice of tests, bench, suite, study [all four]; a lease too short for all of them
# runs them in two calls.
# OUT gets: env.txt (GPU, driver, torch), cuda_tests.log (tests/test_cuda.py), bench.log (loop efficiency at the
# CPU recipe and at the CT paper's recipe, bf16 with and without channels-last; predict efficiency), suite.log
# (the whole test suite on this machine, where `--device auto` means the GPU), brain_confirm.log and
# brain_confirm.tgz (research/studies/brain_confirm.yaml, every cell on the GPU: its reports, not its run folders).
# DATASETS needs monuseg/ (a few images are enough: the benchmarks time steps, not scores); the suite also
# uses colin27_aal/ and ct_abdomen/ where present. The brain study reads the MNI152 template nilearn ships.
set -uo pipefail
usage="usage: gpu_check.sh OUT DATASETS [tests,bench,suite,study]"
out=$(realpath "${1:?$usage}")
data=$(realpath "${2:?$usage}")
parts=",${3:-tests,bench,suite,study},"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 LABELDIFF_DATASETS="$data"
ld="python3 -m labeldiff.cli"  # (a variable, not a function: timeout runs programs)
part() { echo "== $1 ($(date -u +%T))"; }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'bf16', torch.cuda.is_bf16_supported())"
  lscpu | grep -E 'Model name|^CPU\(s\)'
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

if [[ $parts == *,tests,* ]]; then
part "tests/test_cuda.py"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs --durations=5 > "$out/cuda_tests.log" 2>&1
echo "exit $?" >> "$out/cuda_tests.log"
tail -15 "$out/cuda_tests.log"
fi

if [[ $parts == *,bench,* ]]; then
{
  part "loop efficiency, CPU recipe (32, 64, 128) UNet, batch 16 at 64², bf16"
  timeout 90 $ld bench loop --data "$data/monuseg" --recipe ddpm-cpu --device cuda --steps 200 --workers 0,4
  for cl in 0 1; do
    part "loop efficiency, the CT paper's recipe (ddpm), batch 16 at 256², bf16, channels-last $cl"
    timeout 120 $ld bench loop --data "$data/monuseg" --recipe ddpm --device cuda --steps 40 --workers 0,4 \
      --channels-last $cl
  done
  part "predict efficiency, (32, 64, 128) UNet + head, 64² tiles of 1000² MoNuSeg images"
  timeout 60 $ld finetune --data "$data/monuseg" --from-scratch --labels 2 --steps 20 --precision fp32 --device cuda \
    --out /tmp/gpu_check_scratch --overwrite > /dev/null 2>&1
  timeout 90 $ld bench predict --model /tmp/gpu_check_scratch --input "$data/monuseg" --device cuda --repeats 3
} > "$out/bench.log" 2>&1
grep -E '^(==|\||predict efficiency|goal)' "$out/bench.log"
fi

if [[ $parts == *,suite,* ]]; then  # in the background, beside the study
part "the whole suite"
(timeout 270 python3 -m pytest -q -p no:cacheprovider -n 6 > "$out/suite.log" 2>&1; echo "exit $?" >> "$out/suite.log") &
fi
if [[ $parts == *,study,* ]]; then
part "studies/brain_confirm.yaml"
timeout 270 $ld study research/studies/brain_confirm.yaml --out /tmp/brain_confirm --workers 4 > "$out/brain_confirm.log" 2>&1
echo "exit $?" >> "$out/brain_confirm.log"
tar -czf "$out/brain_confirm.tgz" -C /tmp --exclude='cells/*/run' --exclude='pretrain/*/checkpoints' \
  --exclude='pretrain/*/*.safetensors' brain_confirm
tail -25 "$out/brain_confirm.log"
fi
wait
[[ -f $out/suite.log ]] && tail -3 "$out/suite.log"
true
