#!/usr/bin/env bash
# The research notebook's generative page ("Unlabeled DDPM runs: FID against length, and against transfer Dice"), on MoNuSeg or the
# brain slices, with the study studies/ddpm_lengths_DATASET.yaml (one unlabeled DDPM run stopped at 500,
# 1000, 2000 steps, each fine-tuned against scratch on the same labeled subsets, 5 seeds; MoNuSeg also
# scores every cell under corruptions). In order: the pretraining runs; 128 samples of each length scored
# against the train images, next to a floor (real test images scored the same way); the cells; then
# OUT/summary.tsv and OUT/fid_vs_transfer.png. Resumable: rerun after an interruption.
#   bash experiments/ddpm_lengths.sh monuseg     # MoNuSeg, k = 4, 64² crops at scale 0.25
#   bash experiments/ddpm_lengths.sh brain       # brain slices (MNI152, prepared by the study), k = 2
set -e
cd "$(dirname "$0")/.."
L=../.venv/bin/labeldiff
source experiments/samples.sh
NAME=${1:?give monuseg or brain}
S=studies/runs/ddpm_lengths_$NAME
OUT=${2:-$S/generative}
case $NAME in
  monuseg) D=../../shared/datasets/monuseg; REAL="--crops 4 --scale 0.25"; FLOOR="crops=10, scale=0.25" ;;
  brain)   D=$S/data/brain-demo; REAL=""; FLOOR="crops=0" ;;   # whole slices, resized like the run's
  *) echo "give monuseg or brain" >&2; exit 2 ;;
esac
$L study studies/ddpm_lengths_$NAME.yaml --out $S --pretrain-only   # the runs first, then their samples
mkdir -p $OUT
for run in $S/pretrain/ddpm@*; do  # scored against the train images (MoNuSeg: 4 crops of each)
  s=$(basename $run); s=${s#ddpm@}; s=${s%%-*}
  sample_and_score $run $OUT/step$s/samples $D $REAL
done
# the floor: up to 128 test images (MoNuSeg: crops of the 14; never in pretraining), written as sample PNGs
if [ ! -f $OUT/real_test/samples/sample_000.png ]; then
  ../.venv/bin/python - "$D" "$OUT/real_test/samples" "$FLOOR" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
from labeldiff.evaluate.samples import read_real, real_samples
data, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
how = {k: float(v) if "." in v else int(v) for k, v in (kv.strip().split("=") for kv in sys.argv[3].split(","))}
x = read_real(real_samples(data, "test"), 3, (64, 64), seed=1, **how)[:128]
for i, img in enumerate(x.numpy()):
    u8 = np.clip(np.round((img.transpose(1, 2, 0) + 1) * 127.5), 0, 255).astype(np.uint8)
    Image.fromarray(u8).save(out / f"sample_{i:03d}.png")
PY
fi
score_samples $OUT/real_test/samples $D $REAL
$L study studies/ddpm_lengths_$NAME.yaml --out $S --workers 2               # the cells
../.venv/bin/python - "$S" "$OUT" "$NAME" <<'PY'
import json, sys
from collections import defaultdict
from pathlib import Path
from labeldiff.study.report import paired_differences, read_csv
study, out, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
rows = read_csv(study / "results.csv")
robust = bool(rows[0].get("dice_drop"))
mean = lambda xs: sum(xs) / len(xs)
# the study's own pairing (network, protocol, k, seed, subset), one entry per length
pairs = {m: {p["method"]: p for p in paired_differences(rows, m)} for m in (["dice", "dice_drop"] if robust else ["dice"])}
scratch = [r for r in rows if r["strategy"] == "scratch"]
cols = ["step", "fid", "kid", "kid_se", "precision", "recall", "full_dice", "scratch_dice", "delta_vs_scratch",
        "ci_low", "ci_high", "n"] + (["drop_full", "drop_scratch", "drop_delta", "drop_ci_low", "drop_ci_high"]
                                     if robust else [])
lines, table = ["\t".join(cols)], []
for method, p in sorted(pairs["dice"].items(), key=lambda kv: int(kv[0].split("@")[1])):
    step = int(method.split("@")[1])
    rep = json.load(open(out / f"step{step}" / "samples" / "report.json"))
    cells = [r for r in rows if r["method"] == method]
    vals = [mean([float(r["dice"]) for r in cells]), mean([float(r["dice"]) for r in scratch]), p["mean"], p["low"],
            p["high"]]
    line = [str(step)] + [f"{rep[k]:.4f}" for k in cols[1:6]] + [f"{v:.4f}" for v in vals] + [str(p["n"])]
    if robust:
        d = pairs["dice_drop"][method]
        line += [f"{v:.4f}" for v in (mean([float(r["dice_drop"]) for r in cells]),
                                      mean([float(r["dice_drop"]) for r in scratch]), d["mean"], d["low"], d["high"])]
    table.append((step, rep, p["mean"], p["low"], p["high"]))
    lines.append("\t".join(line))
floor = json.load(open(out / "real_test" / "samples" / "report.json"))
lines.append("\t".join(["real_test"] + [f"{floor[k]:.4f}" for k in cols[1:6]] + [""] * (len(cols) - 6)))
(out / "summary.tsv").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
k = rows[0]["k"]
steps = [t[0] for t in table]
fig, ax = plt.subplots(1, 3, figsize=(11.5, 3.3))
ax[0].plot(steps, [t[1]["fid"] for t in table], "o-", label="DDPM samples")
ax[0].axhline(floor["fid"], color="grey", ls="--", label="held-out real test images")
ax[0].set_title(f"FID ({table[0][1]['n_samples']} samples vs {floor['n_real']} train images)", fontsize=9)
ax[1].plot(steps, [t[1]["kid"] for t in table], "o-")
ax[1].axhline(floor["kid"], color="grey", ls="--")
ax[1].set_title("KID", fontsize=9)
ax[2].errorbar(steps, [t[2] for t in table], yerr=[[t[2] - t[3] for t in table], [t[4] - t[2] for t in table]],
               fmt="o-", capsize=3)
ax[2].axhline(0, color="grey", lw=0.8)
ax[2].set_title(f"fine-tuned Dice − scratch, k = {k} (95 % CI, {len(scratch)} seeds)", fontsize=9)
for a in ax:
    a.set_xlabel("DDPM pretraining step"); a.grid(alpha=0.3)
ax[0].legend(fontsize=8)
data = {"monuseg": "MoNuSeg", "brain": "brain slices"}[name]
fig.suptitle(f"{data}, unlabeled DDPM: sample quality and transfer against pretraining length", fontsize=10)
fig.tight_layout()
fig.savefig(out / "fid_vs_transfer.png", dpi=110)
print(f"wrote {out / 'fid_vs_transfer.png'}")
PY
