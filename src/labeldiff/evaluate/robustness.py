"""Dice under test-time corruptions (``labeldiff evaluate --corruptions``; MDM paper App. B, Fig. 8).

Each corruption × severity re-runs the clean evaluation's prediction and scoring
(:func:`~labeldiff.evaluate.predict.predict_and_score`, :func:`~labeldiff.evaluate.metrics.summarize`)
on corrupted copies of the same images, masks unchanged. Each image is corrupted at the size the network
sees it (after the resize to ``network_hw``), as ImageNet-C corrupts its 224² network inputs: a 1000²
MoNuSeg image at ``scale`` 0.25 gets 250²-pixel noise, blur and JPEG blocks, not 4×-finer ones that the
downscale would average away. It reports the same number as the clean evaluation: the foreground-mean Dice (per image, nanmean over images, then mean over classes).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from labeldiff.checkpoint import atomic_write_text
from labeldiff.evaluate.corruptions import LEVELS, SEVERITIES, SOURCES, corrupt
from labeldiff.evaluate.metrics import summarize
from labeldiff.evaluate.predict import predict_and_score

FIELDS = ("corruption", "severity", "parameter", "dice", "drop")


def run_robustness(model, cfg, samples: list, clean: dict, out: Path, corruptions: list[str],
                   severities: list[int] | None = None, seed: int = 0, precision: str = "fp32", tta: bool = False,
                   class_names: list[str] | None = None) -> dict:
    """Score ``samples`` under each of ``corruptions`` at each of ``severities``; ``clean``: the clean
    evaluation's metrics. Writes ``robustness.json``, ``robustness.csv`` (one row per corruption ×
    severity) and ``robustness.png`` into ``out``, prints the table and returns the summary:
    ``{"clean_dice", "mean_dice" (over all rows), "drop" (clean − mean), "seed", "severities", "corruptions"}``.
    """
    severities = list(severities or SEVERITIES)
    k = cfg.num_classes
    rows = []
    for name in corruptions:
        for sev in severities:
            def transform(x, i, name=name, sev=sev):  # x: the i-th image at the network's size
                return corrupt(x, name, sev, seed=seed, index=i)

            stats = [r[-1] for r in predict_and_score(model, cfg.data, samples, k, precision, tta, transform,
                                                      desc=f"{name} {sev}")]
            dice = summarize(np.stack(stats), class_names)["dice"]["mean"]
            rows.append({"corruption": name, "severity": sev, "parameter": LEVELS[name][sev - 1],
                         "dice": round(dice, 6), "drop": round(clean["dice"]["mean"] - dice, 6)})
    mean = float(np.nanmean([r["dice"] for r in rows]))
    summary = {"clean_dice": clean["dice"]["mean"], "mean_dice": mean, "drop": clean["dice"]["mean"] - mean,
               "seed": seed, "severities": severities, "corruptions": list(corruptions)}
    report = {**summary, "reduction": clean.get("reduction"),
              "sources": {n: SOURCES[n] for n in corruptions}, "rows": rows}
    out = Path(out)
    atomic_write_text(out / "robustness.json", json.dumps(report, indent=2))
    with open(out / "robustness.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    plot(rows, summary["clean_dice"], out / "robustness.png")
    print(format_table(rows, summary))
    print(f"wrote {out}/robustness.json, robustness.csv, robustness.png")
    return summary


def format_table(rows: list[dict], summary: dict) -> str:
    """Corruptions down, severities across, Dice in the cells; the clean Dice and the mean below."""
    sevs = summary["severities"]
    lines = [f"{'Dice':<12}" + "".join(f"{'sev ' + str(s):>9}" for s in sevs)]
    for name in summary["corruptions"]:
        cells = {r["severity"]: r["dice"] for r in rows if r["corruption"] == name}
        lines.append(f"{name:<12}" + "".join(f"{cells[s]:>9.4f}" for s in sevs))
    lines.append(f"clean Dice {summary['clean_dice']:.4f}, mean under corruptions {summary['mean_dice']:.4f} "
                 f"(drop {summary['drop']:+.4f}) over {len(rows)} corruption × severity cells")
    return "\n".join(lines)


def plot(rows: list[dict], clean_dice: float, path: Path) -> None:
    """Dice against severity, one line per corruption, the clean Dice dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in dict.fromkeys(r["corruption"] for r in rows):
        pts = [(r["severity"], r["dice"]) for r in rows if r["corruption"] == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.axhline(clean_dice, color="k", linestyle="--", linewidth=1, label="clean")
    ax.set_xticks(sorted({r["severity"] for r in rows}))
    ax.set_xlabel("severity")
    ax.set_ylabel("foreground Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
