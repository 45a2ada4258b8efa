# Sourced by experiments/fid_vs_length.sh and ddpm_lengths.sh (needs L, the labeldiff command): sample a
# generative run and score the samples against a dataset's train images. Each step is skipped when its
# output exists, so an interrupted script resumes.
#   score_samples SAMPLES DATA [evaluate-samples options]   FID, KID, precision/recall → SAMPLES/report.json
#   sample_and_score RUN SAMPLES DATA [options]             128 DDIM samples of RUN, then score_samples
score_samples() {
  local samples=$1 data=$2; shift 2
  [ -f "$samples/report.json" ] || $L evaluate-samples --samples "$samples" --data "$data" --split train "$@" \
      --device cpu > "$samples.fid.log" 2>&1
}
sample_and_score() {
  local run=$1 samples=$2; shift 2
  mkdir -p "$(dirname "$samples")"
  [ -f "$samples/grid.png" ] || $L sample --model "$run" --n 128 --out "$samples" --device cpu \
      > "$samples.sample.log" 2>&1
  score_samples "$samples" "$@"
}
