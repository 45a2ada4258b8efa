#!/usr/bin/env bash
# "FID vs pretraining length vs Dice" on MoNuSeg: the EMA weights of the 1000-step hybrid run of
# experiments/synthetic_studies.sh at steps 250, 500, 750, 1000 (copied from its checkpoints while it ran,
# into studies/runs/synthetic/ema_monuseg_hybrid/), each as a run folder (its config.json + those weights):
# 128 DDIM-50 samples scored against 4 crops of each of the 30 train images at the run's scale (FID, KID,
# precision/recall), and the same weights used as a segmenter on the 14 test images (the hybrid's own
# mask channels at t = 0: Dice with no fine-tuning). Writes OUT/summary.tsv.
set -e
cd "$(dirname "$0")/.."
L=../.venv/bin/labeldiff
source experiments/samples.sh
D=../../shared/datasets/monuseg
R=studies/runs/synthetic
OUT=${1:-$R/fid_vs_length}
mkdir -p $OUT
printf "step\tfid\tkid\tkid_se\tprecision\trecall\tdice\n" > $OUT/summary.tsv
for w in $R/ema_monuseg_hybrid/step_*.safetensors; do
  s=$(basename $w .safetensors); s=$((10#${s#step_}))
  run=$OUT/step$s
  mkdir -p $run && cp $R/monuseg_hybrid/config.json $run/ && cp $w $run/model.safetensors
  sample_and_score $run $run/samples $D --crops 4 --scale 0.25
  [ -f $run/eval/metrics.json ] || $L evaluate --model $run --data $D --split test --out $run/eval --device cpu > $run/eval.log 2>&1
  ../.venv/bin/python - "$run" "$s" >> $OUT/summary.tsv <<'PY'
import json, sys
run, step = sys.argv[1], sys.argv[2]
r = json.load(open(f"{run}/samples/report.json"))
m = json.load(open(f"{run}/eval/metrics.json"))
print(step, *(f"{r[k]:.4f}" for k in ("fid", "kid", "kid_se", "precision", "recall")), f"{m['dice']['mean']:.4f}", sep="\t")
PY
done
cat $OUT/summary.tsv
../.venv/bin/python - "$OUT" <<'PY'
import csv, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out = sys.argv[1]
rows = list(csv.DictReader(open(f"{out}/summary.tsv"), delimiter="\t"))
step = [int(r["step"]) for r in rows]
fig, ax = plt.subplots(1, 3, figsize=(11, 3.2))
for a, key, label in zip(ax, ("fid", "kid", "dice"), ("FID (128 samples vs 120 real crops)", "KID", "Dice of the hybrid itself (14 test images)")):
    a.plot(step, [float(r[key]) for r in rows], "o-")
    a.set_xlabel("hybrid pretraining step"); a.set_title(label, fontsize=9); a.grid(alpha=0.3)
fig.suptitle("MoNuSeg hybrid run: sample quality and segmentation against pretraining length", fontsize=10)
fig.tight_layout()
fig.savefig(f"{out}/fid_vs_length.png", dpi=110)
print(f"wrote {out}/fid_vs_length.png")
PY
