"""Study results as pure functions on rows, and the files they become.

A row is one finished cell: ``{"cell", "method", "pretrain_steps", "arch", "strategy", "k", "seed",
"select", "stems", "dice", "iou", "dice_0" … "dice_{K-1}", "seconds"}``. ``dice`` / ``iou`` are the
cell's test-set scores (per image, mean over images, then over foreground classes; see
:func:`labeldiff.evaluate.metrics.summarize`); ``stems`` is the ``;``-joined sorted labeled subset.
Over seeds: mean ± sample standard deviation (ddof = 1), n = number of seeds with a finite score.
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

BASELINE = "scratch"
LEAD = ["cell", "method", "pretrain_steps", "arch", "strategy", "k", "seed", "select", "stems", "dice", "iou"]


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """``(mean, sample std, n)`` of the finite values; std is NaN for n < 2, mean NaN for n = 0."""
    v = np.array([x for x in values if x is not None and math.isfinite(float(x))], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def format_stat(mean: float, std: float, n: int, digits: int = 3) -> str:
    """``"0.812 ± 0.020 (3)"``; with one value ``"0.812 (1)"``; nothing finite: ``"–"``."""
    if n == 0:
        return "–"
    if n < 2:
        return f"{mean:.{digits}f} (1)"
    return f"{mean:.{digits}f} ± {std:.{digits}f} ({n})"


def groups(rows: list[dict], with_select: bool) -> list[tuple]:
    """Table rows in order of first appearance: (method, strategy[, select])."""
    out: dict[tuple, None] = {}
    for r in rows:
        out[group_of(r, with_select)] = None
    return list(out)


def group_of(r: dict, with_select: bool) -> tuple:
    return (r["method"], r["strategy"], r["select"]) if with_select else (r["method"], r["strategy"])


def label_sizes(rows: list[dict]) -> list[int]:
    return sorted({int(r["k"]) for r in rows})


def summarize(rows: list[dict], metric: str = "dice") -> dict[tuple, dict[int, tuple[float, float, int]]]:
    """``{(method, strategy, select): {k: (mean, std, n)}}`` over seeds."""
    values: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        values[group_of(r, True)][int(r["k"])].append(float(r[metric]))
    return {g: {k: mean_std(v) for k, v in by_k.items()} for g, by_k in values.items()}


def results_table(rows: list[dict], metric: str = "dice", digits: int = 3) -> str:
    """Markdown: rows method × strategy (× select when several), columns k, best mean per column bold."""
    with_select = len({r["select"] for r in rows}) > 1
    ks = label_sizes(rows)
    values: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        values[group_of(r, with_select)][int(r["k"])].append(float(r[metric]))
    stats = {g: {k: mean_std(values[g][k]) for k in ks} for g in groups(rows, with_select)}
    best = {}
    for k in ks:
        means = [round(s[k][0], digits) for s in stats.values() if s[k][2] > 0]
        best[k] = max(means) if means else None
    head = ["method", "strategy"] + (["select"] if with_select else []) + [f"k = {k}" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, s in stats.items():
        cells = []
        for k in ks:
            text = format_stat(*s[k], digits=digits)
            bold = s[k][2] > 0 and best[k] is not None and round(s[k][0], digits) == best[k]
            cells.append(f"**{text}**" if bold else text)
        lines.append("| " + " | ".join(list(g) + cells) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(rows: list[dict], metrics: list[str], title: str = "") -> str:
    parts = [f"# {title}\n" if title else ""]
    for metric in (m for m in ("dice", "iou") if m in metrics):
        name = "Dice" if metric == "dice" else "IoU"
        parts.append(f"## {name} (foreground mean) on the test split\n\n{results_table(rows, metric)}")
    parts.append("Entries: mean ± sample std over seeds (number of seeds); bold: best mean in the column. "
                 "Scores are per test image, averaged over images, then over foreground classes.\n")
    return "\n".join(p for p in parts if p)


def class_columns(rows: list[dict]) -> list[str]:
    cols = {c for r in rows for c in r if c.startswith("dice_") and c[5:].isdigit()}
    return sorted(cols, key=lambda c: int(c[5:]))


def per_class_markdown(rows: list[dict], digits: int = 3) -> str:
    """One table per k: rows method × strategy (× select), columns per-class Dice (mean ± std (n))."""
    with_select = len({r["select"] for r in rows}) > 1
    cols = class_columns(rows)
    out = ["# Per-class Dice on the test split\n"]
    for k in label_sizes(rows):
        sub = [r for r in rows if int(r["k"]) == k]
        head = ["method", "strategy"] + (["select"] if with_select else []) + [f"class {c[5:]}" for c in cols]
        lines = [f"## k = {k}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for g in groups(sub, with_select):
            members = [r for r in sub if group_of(r, with_select) == g]
            stats = [format_stat(*mean_std([_float(r.get(c)) for r in members]), digits=digits) for c in cols]
            lines.append("| " + " | ".join(list(g) + stats) + " |")
        out.append("\n".join(lines) + "\n")
    out.append("Class 0 is the background. A class absent from both prediction and ground truth of every test "
               "image has no score (–).\n")
    return "\n".join(out)


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def t_cdf_two_sided(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3–4, exact)."""
    theta = math.atan(t / math.sqrt(df))
    c, s = math.cos(theta), math.sin(theta)
    if df % 2 == 1:
        total, term = 0.0, c
        for j in range(1, (df - 1) // 2 + 1):  # cos + 2/3 cos³ + 2·4/(3·5) cos⁵ + … up to cos^{df-2}
            total += term
            term *= c * c * (2 * j) / (2 * j + 1)
        return 2 / math.pi * (theta + s * total) if df > 1 else 2 * theta / math.pi
    total, term = 0.0, 1.0
    for j in range(1, df // 2 + 1):  # 1 + 1/2 cos² + 1·3/(2·4) cos⁴ + … up to cos^{df-2}
        total += term
        term *= c * c * (2 * j - 1) / (2 * j)
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The two-sided ``p`` critical value of Student's t (e.g. p = 0.95, df = 2 → 4.303), by bisection."""
    lo, hi = 0.0, 1.0
    while t_cdf_two_sided(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf_two_sided(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_ci(diffs: list[float], level: float = 0.95) -> tuple[float, float, float, int]:
    """``(mean, low, high, n)``: mean ± t_{(1+level)/2, n−1}·sd/√n; low/high NaN for n < 2."""
    d = np.array([x for x in diffs if math.isfinite(x)], dtype=float)
    n = len(d)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    if n < 2:
        return float(d[0]), math.nan, math.nan, 1
    half = t_quantile(level, n - 1) * float(d.std(ddof=1)) / math.sqrt(n)
    return float(d.mean()), float(d.mean()) - half, float(d.mean()) + half, n


def paired_differences(rows: list[dict], metric: str = "dice") -> list[dict]:
    """Every method × strategy × select vs scratch of the same network at the same k, seed and subset.

    Returns one dict per (method, strategy, select, k): ``mean``, ``low``, ``high`` (95 % CI of the
    mean paired difference, method − scratch), ``n`` pairs, and ``unpaired``: cells whose scratch
    counterpart trained on a different subset (``diverse`` picks per network) and are left out.
    """
    base = {(r["arch"], int(r["k"]), int(r["seed"]), r["select"]): r for r in rows if r["strategy"] == BASELINE}
    diffs: dict[tuple, list[float]] = defaultdict(list)
    unpaired: dict[tuple, int] = defaultdict(int)
    order: dict[tuple, None] = {}
    for r in rows:
        if r["strategy"] == BASELINE:
            continue
        key = (r["method"], r["strategy"], r["select"], int(r["k"]))
        b = base.get((r["arch"], int(r["k"]), int(r["seed"]), r["select"]))
        if b is None:
            continue
        order[key] = None
        if b["stems"] == r["stems"]:
            diffs[key].append(float(r[metric]) - float(b[metric]))
        else:
            unpaired[key] += 1
    out = []
    for key in order:
        mean, low, high, n = paired_ci(diffs[key])
        out.append(dict(zip(("method", "strategy", "select", "k"), key), mean=mean, low=low, high=high, n=n,
                        unpaired=unpaired[key]))
    return out


def paired_markdown(rows: list[dict], metric: str = "dice", digits: int = 3) -> str:
    pairs = paired_differences(rows, metric)
    lines = [f"# Paired {metric} difference vs scratch (method − scratch)\n",
             "Pairs: the same network architecture, k, seed and labeled subset. 95 % confidence interval of "
             "the mean difference from the t-distribution over the paired differences (n − 1 degrees of "
             "freedom); n/a with fewer than 2 pairs.\n",
             "| method | strategy | select | k | mean Δ | 95 % CI | pairs | unpaired |", "|---|---|---|---|---|---|---|---|"]
    for p in pairs:
        mean = "–" if p["n"] == 0 else f"{p['mean']:+.{digits}f}"
        ci = f"[{p['low']:+.{digits}f}, {p['high']:+.{digits}f}]" if p["n"] >= 2 else "n/a"
        lines.append(f"| {p['method']} | {p['strategy']} | {p['select']} | {p['k']} | {mean} | {ci} | {p['n']} "
                     f"| {p['unpaired']} |")
    if not pairs:
        lines.append("\n(no pairs: the study has no scratch cells, or none at the same k and seed)")
    if any(p["unpaired"] for p in pairs):
        lines.append("\nunpaired: cells whose subset differs from scratch's (diverse selection picks with each "
                     "network's own features), left out of the mean.")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    cols = LEAD + class_columns(rows) + ["seconds"]
    extra = sorted({c for r in rows for c in r} - set(cols))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + extra)
        w.writeheader()
        for r in rows:
            w.writerow({c: _csv_value(r.get(c)) for c in cols + extra})


def _csv_value(v):
    return round(v, 6) if isinstance(v, float) and math.isfinite(v) else ("" if v is None else v)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_dice_vs_labels(rows: list[dict], path: Path, metric: str = "dice", title: str = "") -> None:
    """One line per method × strategy (× select) with std error bars; x = k on a log scale."""
    plt = _pyplot()
    with_select = len({r["select"] for r in rows}) > 1
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in groups(rows, with_select):
        by_k: dict[int, list[float]] = defaultdict(list)
        for r in rows:
            if group_of(r, with_select) == g:
                by_k[int(r["k"])].append(float(r[metric]))
        ks = sorted(by_k)
        ms = [mean_std(by_k[k]) for k in ks]
        ax.errorbar(ks, [m[0] for m in ms], yerr=[0 if m[2] < 2 else m[1] for m in ms], marker="o", capsize=4,
                    label=" / ".join(g))
    ks = label_sizes(rows)
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("labeled images k (log scale)")
    ax.set_ylabel(f"{'Dice' if metric == 'dice' else 'IoU'} (foreground mean, test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    _save(fig, path, dpi=100)


def plot_overlays(images: list[dict], predictions: dict[str, list[np.ndarray]], path: Path, title: str = "") -> None:
    """Rows: ``images`` (dicts with ``name``, ``image [C,H,W]``, ``target [H,W]``); columns: image |
    ground truth | one prediction per entry of ``predictions`` (label → one mask per image)."""
    plt = _pyplot()
    from labeldiff.evaluate.report import overlay, to_rgb

    cols = 2 + len(predictions)
    fig, axes = plt.subplots(len(images), cols, figsize=(2.6 * cols, 2.6 * len(images) + 0.4), squeeze=False)
    for i, im in enumerate(images):
        panels = [(im["name"][:20], to_rgb(im["image"])), ("ground truth", overlay(im["image"], im["target"]))]
        panels += [(label, overlay(im["image"], preds[i])) for label, preds in predictions.items()]
        for ax, (name, pic) in zip(axes[i], panels):
            ax.imshow(pic)
            ax.set_title(name, fontsize=7)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path, dpi=90)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int) -> None:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
