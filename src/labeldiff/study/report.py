"""A study's report files as pure functions on its result rows (one per finished cell, described in
:mod:`labeldiff.study.stats`): ``results.csv`` (written whole, read back) and the markdown tables (results,
per class, paired differences, two studies compared). The numbers come from :mod:`labeldiff.study.stats`,
the verdict is :mod:`labeldiff.study.verdict`, the figures :mod:`labeldiff.study.plots`. Entries are mean ±
sample std over seeds (number of seeds); paired differences are mean Δ with the 95 % CI.
"""
from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from pathlib import Path

from labeldiff.study.stats import (PAIR_AXES, axis, axis_differences, group_of, groups, label_sizes,
                                   length_differences, mean_std, paired_differences, study_differences, to_float,
                                   varying)

LEAD = ["cell", "method", "pretrain_steps", "arch", "strategy", "protocol", "k", "seed", "select", "stems", "dice",
        "iou"]


def format_stat(mean: float, std: float, n: int, digits: int = 3) -> str:
    """``"0.812 ± 0.020 (3)"``; with one value ``"0.812 (1)"``; nothing finite: ``"–"``."""
    if n == 0:
        return "–"
    if n < 2:
        return f"{mean:.{digits}f} (1)"
    return f"{mean:.{digits}f} ± {std:.{digits}f} ({n})"


LOWER_IS_BETTER = ("hd95_mm", "dice_drop")


def results_table(rows: list[dict], metric: str = "dice", digits: int = 3) -> str:
    """Markdown: rows method × strategy (× protocol, × select when several), columns k, best mean bold."""
    extras = varying(rows)
    ks = label_sizes(rows)
    values: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get(metric) not in (None, ""):  # an HD95 is undefined where a class is predicted nowhere
            values[group_of(r, extras)][int(r["k"])].append(float(r[metric]))
    stats = {g: {k: mean_std(values[g][k]) for k in ks} for g in groups(rows, extras)}
    best = {}
    pick = min if metric in LOWER_IS_BETTER else max
    for k in ks:
        means = [round(s[k][0], digits) for s in stats.values() if s[k][2] > 0]
        best[k] = pick(means) if means else None
    head = ["method", "strategy"] + list(extras) + [f"k = {k}" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, s in stats.items():
        cells = []
        for k in ks:
            text = format_stat(*s[k], digits=digits)
            bold = s[k][2] > 0 and best[k] is not None and round(s[k][0], digits) == best[k]
            cells.append(f"**{text}**" if bold else text)
        lines.append("| " + " | ".join(list(g) + cells) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(rows: list[dict], metrics: list[str], title: str = "", class_names: list[str] | None = None) -> str:
    parts = [f"# {title}\n" if title else ""]
    if class_names and len(class_names) > 1:
        parts.append("Foreground classes: " + ", ".join(f"{c} {n}" for c, n in enumerate(class_names) if c) + ".\n")
    for metric in (m for m in ("dice", "iou", "aji") if m in metrics):
        name = {"dice": "Dice", "iou": "IoU", "aji": "AJI (Aggregated Jaccard Index of connected components)"}[metric]
        parts.append(f"## {name} (foreground mean) on the test split\n\n{results_table(rows, metric)}")
    parts.append("Entries: mean ± sample std over seeds (number of seeds); bold: best mean in the column. "
                 "Scores are per test image, averaged over images, then over foreground classes.\n")
    if "volume" in metrics and any(r.get("dice_3d") not in (None, "") for r in rows):
        for metric, name in (("dice_3d", "3D Dice"), ("hd95_mm", "HD95 (mm, lower is better)"),
                             ("nsd", "Normalised surface Dice at 2 mm")):
            parts.append(f"## {name} on the test slab of each case, in 3D\n\n{results_table(rows, metric, digits=1 if metric == 'hd95_mm' else 3)}")
        parts.append("3D: the test slices of each case as one slab on the volume's own grid (MONAI's metrics), "
                     "mean over foreground classes (HD95 and NSD over the classes where they are defined), "
                     "then mean ± std over seeds.\n")
    if any(r.get("dice_corrupted") not in (None, "") for r in rows):
        for metric, name in (("dice_corrupted", "Dice under corruptions (mean over corruption × severity)"),
                             ("dice_drop", "Dice drop under corruptions (clean − corrupted, lower is better)")):
            parts.append(f"## {name}\n\n{results_table(rows, metric)}")
        parts.append("Corruptions: `labeldiff evaluate --corruptions` on the test split (the study's `robustness:`), "
                     "the same Dice reduction as the clean score; per cell in eval/robustness/robustness.csv.\n")
    return "\n".join(p for p in parts if p)


def class_columns(rows: list[dict]) -> list[str]:
    cols = {c for r in rows for c in r if c.startswith("dice_") and c[5:].isdigit()}
    return sorted(cols, key=lambda c: int(c[5:]))


def per_class_markdown(rows: list[dict], digits: int = 3, class_names: list[str] | None = None) -> str:
    """One table per k: rows method × strategy (× select), columns per-class Dice (mean ± std (n)),
    headed by the dataset's class names where it has them (``dataset.json`` / ``classes.json``)."""
    extras = varying(rows)
    cols = class_columns(rows)
    out = ["# Per-class Dice on the test split\n"]
    for k in label_sizes(rows):
        sub = [r for r in rows if int(r["k"]) == k]
        head = ["method", "strategy"] + list(extras) + [_class_label(int(c[5:]), class_names) for c in cols]
        lines = [f"## k = {k}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for g in groups(sub, extras):
            members = [r for r in sub if group_of(r, extras) == g]
            stats = [format_stat(*mean_std([to_float(r.get(c)) for r in members]), digits=digits) for c in cols]
            lines.append("| " + " | ".join(list(g) + stats) + " |")
        out.append("\n".join(lines) + "\n")
    out.append("Class 0 is the background. A class absent from both prediction and ground truth of every test "
               "image has no score (–).\n")
    return "\n".join(out)


def _class_label(c: int, names: list[str] | None) -> str:
    return f"{c} {names[c]}" if names and c < len(names) else f"class {c}"


def format_ci(p: dict, digits: int) -> str:
    """``"[-0.012, +0.034]"``: the CI of a paired difference; n/a with fewer than 2 pairs."""
    return f"[{p['low']:+.{digits}f}, {p['high']:+.{digits}f}]" if p["n"] >= 2 else "n/a"


def format_delta(p: dict, digits: int) -> str:
    """``"+0.011"``: the mean of a paired difference; – without pairs."""
    return "–" if p["n"] == 0 else f"{p['mean']:+.{digits}f}"


def format_excludes_zero(p: dict) -> str:
    """Whether a paired difference's CI excludes 0: ``yes (+)``, ``yes (−)``, ``no`` or ``n/a``."""
    if p["n"] < 2:
        return "n/a"
    return "yes (+)" if p["low"] > 0 else "yes (−)" if p["high"] < 0 else "no"


def _axis_table(diffs: list[dict], name: str, digits: int, title: str) -> list[str]:
    """The markdown lines of :func:`axis_differences` along ``name`` (none when there are no pairs)."""
    if not diffs:
        return []
    cols = (name, *(a for a in PAIR_AXES if a != name))
    lines = [f"\n## {title}\n", f"| {' | '.join(cols)} | mean Δ | 95 % CI | excludes 0 | pairs |",
             "|" + "---|" * (len(cols) + 4)]
    for p in diffs:
        lines.append(f"| {' | '.join(str(p[c]) for c in cols)} | {format_delta(p, digits)} | {format_ci(p, digits)} | "
                     f"{format_excludes_zero(p)} | {p['n']} |")
    return lines


def paired_markdown(rows: list[dict], metric: str = "dice", digits: int = 3) -> str:
    pairs = paired_differences(rows, metric)
    lines = [f"# Paired {metric} difference vs scratch (method − scratch)\n",
             "Pairs: the same network architecture, fine-tuning protocol, k, seed and labeled subset. 95 % "
             "confidence interval of the mean difference from the t-distribution over the paired differences "
             "(n − 1 degrees of freedom); n/a with fewer than 2 pairs.\n",
             "| method | strategy | protocol | select | k | mean Δ | 95 % CI | excludes 0 | pairs | unpaired |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in pairs:
        lines.append(f"| {p['method']} | {p['strategy']} | {p['protocol']} | {p['select']} | {p['k']} | {format_delta(p, digits)} | "
                     f"{format_ci(p, digits)} | {format_excludes_zero(p)} | {p['n']} | {p['unpaired']} |")
    if not pairs:
        lines.append("\n(no pairs: the study has no pretrained cells, or no scratch cell at their k and seed)")
    if any(p["unpaired"] for p in pairs):
        lines.append("\nunpaired: cells whose subset differs from scratch's, left out of the mean.")
    lines += _axis_table(axis_differences(rows, "select", "random", metric), "select", digits,
                         f"each selection − random ({metric}), paired by seed")
    lines += _axis_table(length_differences(rows, metric), "method", digits,
                         f"each pretraining length − the shortest of its run ({metric}), paired by seed and subset")
    protocols = list(dict.fromkeys(axis(r, "protocol") for r in rows))
    if len(protocols) > 1:
        lines += _axis_table(axis_differences(rows, "protocol", protocols[0], metric, same_subset=True), "protocol",
                             digits, f"each protocol − {protocols[0]} (the study's first protocol, {metric}), "
                                     f"paired by seed and subset")
    return "\n".join(lines) + "\n"


def compare_markdown(a: list[dict], b: list[dict], names: tuple[str, str], metric: str = "dice",
                     digits: int = 3) -> str:
    """The table of :func:`study_differences`, ``names`` the two studies as the reader knows them."""
    na, nb = names
    diffs = study_differences(a, b, metric)
    lines = [f"# {na} − {nb} ({metric}), paired by cell\n",
             f"Pairs: the same method name, strategy, protocol, selection, k and seed in both studies, and the same "
             f"labeled images. 95 % confidence interval of the mean paired difference from the t-distribution "
             f"(n − 1 degrees of freedom); n/a with fewer than 2 pairs.\n",
             f"| method | strategy | protocol | select | k | {na} | {nb} | mean Δ | 95 % CI | excludes 0 | pairs | "
             f"unpaired |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    shared = []
    for p in diffs:
        if p["n"] and p["shared"] == p["n"]:
            shared.append(p)
            continue
        a_b = " | ".join("–" if p["n"] == 0 else f"{p[s]:.{digits}f}" for s in ("a", "b"))
        lines.append(f"| {' | '.join(str(p[c]) for c in PAIR_AXES)} | {a_b} | "
                     f"{format_delta(p, digits)} | {format_ci(p, digits)} | {format_excludes_zero(p)} | {p['n']} | {p['unpaired']} |")
    if not diffs:
        lines.append(f"\n(no pairs: no cell of {na} has the method, strategy, protocol, selection, k and seed of a "
                     f"cell of {nb})")
    if shared:
        lines.append("\nThe same cells in both studies (Δ = 0 by construction, left out of the table): " +
                     "; ".join(f"{p['method']} / {p['strategy']} / k = {p['k']} ({p['n']} cells)" for p in shared))
    if any(p["shared"] and p["shared"] < p["n"] for p in diffs):
        lines.append("\nSome rows pair a shared cell with itself among their pairs (Δ = 0 for those seeds).")
    if any(p["unpaired"] for p in diffs):
        lines.append("\nunpaired: the seed is in both studies but the labeled images differ; left out of the mean.")
    unscored = sum(p["unscored"] for p in diffs)
    if unscored:
        lines.append(f"\n{unscored} pair(s) left out because a cell has no finite {metric} (e.g. a class absent from "
                     f"the test images).")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    cols = LEAD + class_columns(rows) + ["seconds"]
    extra = sorted({c for r in rows for c in r} - set(cols))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written whole, then renamed: a killed study never leaves half a file (per process: --workers shards)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + extra)
        w.writeheader()
        for r in rows:
            w.writerow({c: _csv_value(r.get(c)) for c in cols + extra})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _csv_value(v):
    return round(v, 6) if isinstance(v, float) and math.isfinite(v) else ("" if v is None else v)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
