"""Study results as pure functions on rows, and the files they become.

A row is one finished cell: ``{"cell", "method", "pretrain_steps", "arch", "strategy", "protocol", "k",
"seed", "select", "stems", "dice", "iou", "dice_0" … "dice_{K-1}", "seconds"}``. ``dice`` / ``iou`` are the
cell's test-set scores (per image, mean over images, then over foreground classes; see
:func:`labeldiff.evaluate.metrics.summarize`); ``stems`` is the ``;``-joined sorted labeled subset.
Over seeds: mean ± sample standard deviation (ddof = 1), n = number of seeds with a finite score.
"""
from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

BASELINE = "scratch"
LEAD = ["cell", "method", "pretrain_steps", "arch", "strategy", "protocol", "k", "seed", "select", "stems", "dice",
        "iou"]


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


AXES = ("protocol", "select")  # row columns shown only when a study has several values


def axis(r: dict, name: str) -> str:
    """A row's protocol or select (results written before protocols existed have the default one)."""
    return str(r.get(name) or ("default" if name == "protocol" else "random"))


def varying(rows: list[dict]) -> tuple[str, ...]:
    """The :data:`AXES` with more than one value in ``rows``: extra columns of the tables."""
    return tuple(a for a in AXES if len({axis(r, a) for r in rows}) > 1)


def groups(rows: list[dict], extras: tuple[str, ...]) -> list[tuple]:
    """Table rows in order of first appearance: (method, strategy, *extras)."""
    out: dict[tuple, None] = {}
    for r in rows:
        out[group_of(r, extras)] = None
    return list(out)


def group_of(r: dict, extras: tuple[str, ...]) -> tuple:
    return (r["method"], r["strategy"], *(axis(r, a) for a in extras))


def label_sizes(rows: list[dict]) -> list[int]:
    return sorted({int(r["k"]) for r in rows})


def summarize(rows: list[dict], metric: str = "dice") -> dict[tuple, dict[int, tuple[float, float, int]]]:
    """``{(method, strategy, protocol, select): {k: (mean, std, n)}}`` over seeds."""
    values: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        values[group_of(r, AXES)][int(r["k"])].append(float(r[metric]))
    return {g: {k: mean_std(v) for k, v in by_k.items()} for g, by_k in values.items()}


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
    for metric in (m for m in ("dice", "iou") if m in metrics):
        name = "Dice" if metric == "dice" else "IoU"
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
            stats = [format_stat(*mean_std([_float(r.get(c)) for r in members]), digits=digits) for c in cols]
            lines.append("| " + " | ".join(list(g) + stats) + " |")
        out.append("\n".join(lines) + "\n")
    out.append("Class 0 is the background. A class absent from both prediction and ground truth of every test "
               "image has no score (–).\n")
    return "\n".join(out)


def _class_label(c: int, names: list[str] | None) -> str:
    return f"{c} {names[c]}" if names and c < len(names) else f"class {c}"


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


def paired_ci(diffs: list[float], level: float = 0.95) -> tuple[float, float, float, int, float]:
    """``(mean, low, high, n, sd)``: mean ± t_{(1+level)/2, n−1}·sd/√n, sd the sample std of the
    finite differences; low, high and sd NaN for n < 2."""
    d = np.array([x for x in diffs if math.isfinite(x)], dtype=float)
    n = len(d)
    if n == 0:
        return math.nan, math.nan, math.nan, 0, math.nan
    if n < 2:
        return float(d[0]), math.nan, math.nan, 1, math.nan
    sd = float(d.std(ddof=1))
    half = t_quantile(level, n - 1) * sd / math.sqrt(n)
    return float(d.mean()), float(d.mean()) - half, float(d.mean()) + half, n, sd


def pairs_for_power(sd: float, effect: float, power: float = 0.8, level: float = 0.95, most: int = 1000) -> int | None:
    """Seeds (pairs) a paired study needs to detect a true mean difference ``effect`` with probability
    ``power`` at the two-sided ``level``, when paired differences spread by ``sd``: the smallest n with
    (t_{(1+level)/2, n−1} + t_{power, n−1})·sd/√n ≤ effect (the usual t approximation; 10 pairs for
    effect = sd, 34 for effect = sd / 2). None when more than ``most`` would be needed."""
    def enough(n: int) -> bool:  # the left side falls as n grows, so bisect on n
        return (t_quantile(level, n - 1) + t_quantile(2 * power - 1, n - 1)) * sd / math.sqrt(n) <= effect

    if not sd > 0:
        return 2
    if not enough(most):
        return None
    lo, hi = 1, most  # enough(hi) holds; lo is below every n that might
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def paired_differences(rows: list[dict], metric: str = "dice", level: float = 0.95) -> list[dict]:
    """Every method × strategy × protocol × select vs scratch of the same network, protocol, k, seed and subset.

    Returns one dict per (method, strategy, protocol, select, k): ``mean``, ``low``, ``high`` (``level``
    CI of the mean paired difference, method − scratch), ``n`` pairs, ``diffs`` (the differences, in
    seed order of the rows) and ``unpaired``: cells whose scratch counterpart trained on a different
    subset, left out.
    """
    def where(r: dict) -> tuple:
        return r["arch"], axis(r, "protocol"), int(r["k"]), int(r["seed"]), axis(r, "select")

    base = {where(r): r for r in rows if r["strategy"] == BASELINE}
    diffs: dict[tuple, list[float]] = defaultdict(list)
    unpaired: dict[tuple, int] = defaultdict(int)
    order: dict[tuple, None] = {}
    for r in rows:
        if r["strategy"] == BASELINE:
            continue
        key = (r["method"], r["strategy"], axis(r, "protocol"), axis(r, "select"), int(r["k"]))
        b = base.get(where(r))
        if b is None:
            continue
        order[key] = None
        if b["stems"] == r["stems"] or r["strategy"] == "source":  # source: no labels, any subset pairs
            diffs[key].append(float(r[metric]) - float(b[metric]))
        else:
            unpaired[key] += 1
    out = []
    for key in order:
        mean, low, high, n, sd = paired_ci(diffs[key], level)
        out.append(dict(zip(("method", "strategy", "protocol", "select", "k"), key), mean=mean, low=low, high=high,
                        n=n, sd=sd, unpaired=unpaired[key], diffs=diffs[key]))
    return out


PAIR_AXES = ("method", "strategy", "protocol", "select", "k")  # what a cell is, besides its seed


def axis_differences(rows: list[dict], name: str, base: str, metric: str = "dice",
                     same_subset: bool = False, level: float = 0.95) -> list[dict]:
    """``value − base`` along one axis, every other axis held: the same method, strategy, protocol,
    select and k (minus the one that varies) and the same seed, and with ``same_subset`` the same
    labeled images too. ``select`` with base ``random`` gives diverse − random and typical − random
    (ways of choosing the k images, each with its own variance as they are seeded); ``protocol`` with the study's
    first protocol gives each fine-tuning protocol's effect (e.g. with and without synthetic pairs).

    Returns one dict per (value, other axes): the axes, ``mean``, ``low``, ``high`` (``level`` CI of the
    mean paired difference) and ``n`` pairs."""
    def value(r: dict, a: str):
        return int(r["k"]) if a == "k" else axis(r, a) if a in ("protocol", "select") else r[a]

    others = [a for a in PAIR_AXES if a != name]
    ref = {(*(value(r, a) for a in others), int(r["seed"])): r for r in rows if value(r, name) == base}
    diffs: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        where = tuple(value(r, a) for a in others)
        b = ref.get((*where, int(r["seed"])))
        if value(r, name) != base and b is not None and (not same_subset or b["stems"] == r["stems"]):
            diffs[(value(r, name), *where)].append(float(r[metric]) - float(b[metric]))
    out = []
    for key, d in diffs.items():
        mean, low, high, n, sd = paired_ci(d, level)
        out.append(dict(zip((name, *others), key), mean=mean, low=low, high=high, n=n, sd=sd))
    return out


def length_differences(rows: list[dict], metric: str = "dice") -> list[dict]:
    """Each pretraining length − the shortest of the same run: ``ddpm@10000 − ddpm@2000`` with the strategy,
    protocol, selection, k, seed and labeled subset held (:func:`axis_differences` along ``method`` within
    one method's lengths; runs are named ``name@steps``). Each dict also has ``base``, the shortest run."""
    lengths: dict[str, set[int]] = defaultdict(set)
    for r in rows:
        name, _, steps = r["method"].partition("@")
        if steps and r["strategy"] != BASELINE:
            lengths[name].add(int(steps))
    out = []
    for name, steps in lengths.items():  # a run with one length has no pair
        base = f"{name}@{min(steps)}"
        same = [r for r in rows if r["method"].partition("@")[0] == name]
        out += [dict(p, base=base) for p in axis_differences(same, "method", base, metric, same_subset=True)]
    return out


def study_differences(a: list[dict], b: list[dict], metric: str = "dice", level: float = 0.95) -> list[dict]:
    """Study ``a`` − study ``b``, cell by cell: the same method name, strategy, protocol, select, k and seed,
    and the same labeled images (two studies that differ in one thing outside the cells, e.g. the pretraining
    pool). One dict per (method, strategy, protocol, select, k) found in both: ``mean``, ``low``, ``high``
    (``level`` CI of the mean paired difference), ``n``, ``sd``, ``a`` and ``b`` (the paired cells' means),
    ``unpaired`` (the seed is in both but the labeled images differ: left out), ``unscored`` (pairs where
    either cell has no finite score, e.g. a class absent from the test images: left out) and ``shared`` (pairs
    that are one cell, the same cell key and score in both studies, e.g. scratch cells copied into both: Δ = 0
    by construction)."""
    def where(r: dict) -> tuple:
        return r["method"], r["strategy"], axis(r, "protocol"), axis(r, "select"), int(r["k"])

    ref = {(*where(r), int(r["seed"])): r for r in b}
    found: dict[tuple, dict] = {}
    for r in a:
        o = ref.get((*where(r), int(r["seed"])))
        if o is None:
            continue
        f = found.setdefault(where(r), {"diffs": [], "a": [], "b": [], "unpaired": 0, "unscored": 0, "shared": 0})
        if o["stems"] != r["stems"]:
            f["unpaired"] += 1
            continue
        va, vb = _float(r[metric]), _float(o[metric])
        if not (math.isfinite(va) and math.isfinite(vb)):
            f["unscored"] += 1
            continue
        f["diffs"].append(va - vb)
        f["a"].append(va)
        f["b"].append(vb)
        f["shared"] += int(r["cell"] == o["cell"] and va == vb)
    out = []
    for key, f in found.items():
        mean, low, high, n, sd = paired_ci(f["diffs"], level)
        out.append(dict(zip(PAIR_AXES, key), mean=mean, low=low, high=high, n=n, sd=sd,
                        a=float(np.mean(f["a"])) if f["a"] else math.nan,
                        b=float(np.mean(f["b"])) if f["b"] else math.nan,
                        unpaired=f["unpaired"], unscored=f["unscored"], shared=f["shared"], diffs=f["diffs"]))
    return out


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
                     f"{_mean(p, digits)} | {_ci(p, digits)} | {_excludes_zero(p)} | {p['n']} | {p['unpaired']} |")
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


def _ci(p: dict, digits: int) -> str:
    return f"[{p['low']:+.{digits}f}, {p['high']:+.{digits}f}]" if p["n"] >= 2 else "n/a"


def _mean(p: dict, digits: int) -> str:
    return "–" if p["n"] == 0 else f"{p['mean']:+.{digits}f}"


def _seeds_for_power(p: dict, effect: float) -> str:
    if p["n"] < 2:
        return "n/a"
    n = pairs_for_power(p["sd"], effect)
    return "> 1000" if n is None else str(n)


def _excludes_zero(p: dict) -> str:
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
        lines.append(f"| {' | '.join(str(p[c]) for c in cols)} | {_mean(p, digits)} | {_ci(p, digits)} | "
                     f"{_excludes_zero(p)} | {p['n']} |")
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
        lines.append(f"| {p['method']} | {p['strategy']} | {p['protocol']} | {p['select']} | {p['k']} | {_mean(p, digits)} | "
                     f"{_ci(p, digits)} | {_excludes_zero(p)} | {p['n']} | {p['unpaired']} |")
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


def _seed_range(seeds: list[int]) -> str:
    s = sorted(seeds)
    return f"{s[0]}–{s[-1]}" if s == list(range(s[0], s[-1] + 1)) and len(s) > 2 else ", ".join(map(str, s))


def verdict_markdown(rows: list[dict], title: str, metric: str = "dice", digits: int = 3, goal: float = 0.05,
                     looks: list[list[int]] | None = None) -> str:
    """Per k: the best pretrained method × strategy × protocol (highest mean, random selection where
    there is a choice), its paired Δ to scratch with the 95 % CI and whether the CI excludes 0; then
    each selection − random (diverse, typical) for that setting and for scratch, and the seeds a study of that setting needs for
    80 % power at +``goal`` (:func:`pairs_for_power`).

    ``looks``: the seeds of each look when a study was extended with more seeds after an earlier
    verdict (:attr:`labeldiff.study.spec.Study.looks`). With more than one, the goal is judged on the
    CI at level 1 − 0.05 / looks (Bonferroni over the looks), each selection − random shows that CI
    too, and each look's seeds are also reported alone."""
    looks = [list(look) for look in looks or [] if look]
    level = 1 - 0.05 / max(1, len(looks))
    pairs = paired_differences(rows, metric)
    adjusted = {_pair_key(p): p for p in paired_differences(rows, metric, level)}
    sel: dict[tuple, list[dict]] = defaultdict(list)
    for p in axis_differences(rows, "select", "random", metric):
        sel[(p["method"], p["strategy"], p["protocol"], p["k"])].append(p)
    stats = summarize(rows, metric)
    several = len(looks) > 1
    sel_adjusted = {(p["select"], p["method"], p["strategy"], p["protocol"], p["k"]): p  # one look: the 95 % CI above
                    for p in axis_differences(rows, "select", "random", metric, level=level)} if several else {}
    lv = f"{100 * level:g} %"
    lines = [f"# Verdict: {title}\n",
             f"Per label budget k, the pretrained setting with the highest mean test {metric} (random selection "
             f"where both were run), its mean paired difference to scratch (same network, protocol, k, seed and "
             f"subset) with the 95 % CI, and whether that CI excludes 0. The goal is a gain of ≥ "
             f"+{goal:.2f} with the CI above 0. Choosing the best of several settings on the same seeds "
             f"flatters it; a confirmation study on fresh seeds removes that bias.\n"]
    if several:
        lines.append(f"This study is look {len(looks)} of {len(looks)} at the same comparison: it extends an earlier "
                     f"study with more seeds. Looking again after a verdict raises the chance of a false gain, so "
                     f"the goal is judged on the {lv} CI (α = 0.05 split over {len(looks)} looks, Bonferroni), "
                     f"each selection − random is given with its {lv} CI as well, and each look's seeds are "
                     f"reported alone below.\n")
    adj_head, adj_rule = (f" {lv} CI ({len(looks)} looks) |", "---|") if several else ("", "")
    lines += [f"| k | best pretrained setting | {metric} | scratch | Δ vs scratch | 95 % CI | excludes 0 |{adj_head} "
              f"goal (≥ +{goal:.2f}, CI > 0) | selection − random (this setting) | selection − random (scratch) | "
              f"seeds for 80 % power at +{goal:.2f} |",
              "|---|---|---|---|---|---|---|" + adj_rule + "---|---|---|---|"]
    bests = []
    for k in label_sizes(rows):
        cands = [p for p in pairs if p["k"] == k and p["n"] > 0]
        random_only = [p for p in cands if p["select"] == "random"]
        cands = random_only or cands
        if not cands:
            continue
        def score(p: dict) -> float:
            return stats[(p["method"], p["strategy"], p["protocol"], p["select"])][k][0]
        best = max(cands, key=score)
        bests.append(best)
        judged = adjusted[_pair_key(best)]
        scratch = next((v[k] for g, v in stats.items() if g[1] == BASELINE and g[2] == best["protocol"]
                        and g[3] == best["select"] and k in v), None)
        met = judged["n"] >= 2 and judged["low"] > 0 and judged["mean"] >= goal
        short = "met" if met else (f"not met (Δ {best['mean']:+.{digits}f})" if best["n"] >= 2 else "n/a")
        s_best = sel.get((best["method"], best["strategy"], best["protocol"], k), [])
        s_scr = next((ps for (m, st, pr, kk), ps in sel.items() if st == BASELINE and pr == best["protocol"] and kk == k),
                     [])
        def fmt_sel(ps: list[dict]) -> str:
            def adjusted_ci(p: dict) -> str:
                if not several:
                    return ""
                a = sel_adjusted[(p["select"], p["method"], p["strategy"], p["protocol"], p["k"])]
                return f", {lv}: {_ci(a, digits)} ({_excludes_zero(a)})"
            shown = [f"{p['select']}: {_mean(p, digits)} {_ci(p, digits)} ({_excludes_zero(p)}{adjusted_ci(p)})"
                     for p in ps if p["n"]]
            return "; ".join(shown) or "–"
        adj = f" {_ci(judged, digits)} ({_excludes_zero(judged)}) |" if several else ""
        lines.append(f"| {k} | {_setting(best)} | {score(best):.{digits}f} | "
                     f"{'–' if scratch is None else f'{scratch[0]:.{digits}f}'} | {best['mean']:+.{digits}f} | "
                     f"{_ci(best, digits)} | {_excludes_zero(best)} |{adj} {short} | {fmt_sel(s_best)} | "
                     f"{fmt_sel(s_scr)} | {_seeds_for_power(best, goal)} |")
    lines.append(f"\nSeeds for 80 % power: how many seeds (pairs) a study of this setting needs to find a true gain of "
                 f"+{goal:.2f} with its 95 % CI above 0 four times in five, at the spread of the paired differences "
                 f"measured here (an estimate itself: with 5 pairs the true spread may be half or twice it). A "
                 f"study with at least that many seeds whose CI still contains 0 speaks against a gain of that "
                 f"size; one with fewer cannot tell.")
    if several:
        lines += ["\n## Each look alone\n", "| look | seeds | k | setting | Δ vs scratch | 95 % CI | excludes 0 | pairs |",
                  "|---|---|---|---|---|---|---|---|"]
        for i, look in enumerate(looks, 1):
            alone = {_pair_key(p): p for p in paired_differences([r for r in rows if int(r["seed"]) in set(look)], metric)}
            for best in bests:
                p = alone.get(_pair_key(best))
                if p is not None:
                    lines.append(f"| {i} | {_seed_range(look)} | {best['k']} | {_setting(best)} | {_mean(p, digits)} | "
                                 f"{_ci(p, digits)} | {_excludes_zero(p)} | {p['n']} |")
        settings = {(b["method"], b["strategy"], b["protocol"], b["k"]) for b in bests}
        alone_sel = []
        for i, look in enumerate(looks, 1):
            for p in axis_differences([r for r in rows if int(r["seed"]) in set(look)], "select", "random", metric):
                if p["n"] and ((p["method"], p["strategy"], p["protocol"], p["k"]) in settings
                               or p["strategy"] == BASELINE):
                    alone_sel.append(f"| {i} | {_seed_range(look)} | {p['k']} | {p['method']} / {p['strategy']} / "
                                     f"{p['protocol']} | {p['select']} − random | {_mean(p, digits)} | "
                                     f"{_ci(p, digits)} | {_excludes_zero(p)} | {p['n']} |")
        if alone_sel:
            lines += ["\n### Each selection − random, each look alone\n",
                      "| look | seeds | k | setting | selection | Δ | 95 % CI | excludes 0 | pairs |",
                      "|---|---|---|---|---|---|---|---|---|", *alone_sel]
    return "\n".join(lines) + "\n"


def _pair_key(p: dict) -> tuple:
    return p["method"], p["strategy"], p["protocol"], p["select"], p["k"]


def _setting(p: dict) -> str:
    name = f"{p['method']} / {p['strategy']} / {p['protocol']}"
    if p["select"] != "random":  # a study that ran no random cells (a replication of a diverse setting)
        name += f" / {p['select']}"
    return name


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


def plot_dice_vs_labels(rows: list[dict], path: Path, metric: str = "dice", title: str = "") -> None:
    """One line per method × strategy (× select) with std error bars; x = k on a log scale."""
    plt = _pyplot()
    extras = varying(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab20" if len(groups(rows, extras)) > 10 else "tab10").colors
    for i, g in enumerate(groups(rows, extras)):
        by_k: dict[int, list[float]] = defaultdict(list)
        for r in rows:
            if group_of(r, extras) == g:
                by_k[int(r["k"])].append(float(r[metric]))
        ks = sorted(by_k)
        ms = [mean_std(by_k[k]) for k in ks]
        ax.errorbar(ks, [m[0] for m in ms], yerr=[0 if m[2] < 2 else m[1] for m in ms], marker="o", capsize=4,
                    label=" / ".join(g), color=colors[i % len(colors)], linestyle="--" if g[1] == BASELINE else "-")
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


def plot_paired(rows: list[dict], path: Path, metric: str = "dice", title: str = "", goal: float = 0.05) -> list[dict]:
    """A forest plot of :func:`paired_differences`: one row per pretrained setting × k, each seed's
    difference to scratch as a dot, the mean as a bar with its 95 % CI, lines at 0 and at +``goal``.
    Returns the pairs it drew (none: no file)."""
    pairs = [p for p in paired_differences(rows, metric) if p["n"] > 0]
    if not pairs:
        return pairs
    plt = _pyplot()
    shown = [a for a in ("method", "strategy", "protocol", "select") if len({p[a] for p in pairs}) > 1] or ["method"]
    fig, ax = plt.subplots(figsize=(7.5, 2.4 + 0.45 * len(pairs)))
    rng = np.random.default_rng(0)  # vertical jitter of the dots only
    for i, p in enumerate(pairs):
        y = len(pairs) - 1 - i
        ax.scatter(p["diffs"], y + rng.uniform(-0.15, 0.15, len(p["diffs"])), s=12, color="0.55", zorder=2)
        if p["n"] >= 2:
            ax.errorbar([p["mean"]], [y], xerr=[[p["mean"] - p["low"]], [p["high"] - p["mean"]]], fmt="o",
                        color="tab:red" if p["low"] > 0 else "tab:blue" if p["high"] < 0 else "black",
                        capsize=4, zorder=3)
        else:
            ax.plot([p["mean"]], [y], "o", color="black", zorder=3)
    ax.axvline(0, color="0.3", linewidth=1)
    ax.axvline(goal, color="tab:green", linestyle="--", linewidth=1, label=f"goal +{goal:.2f}")
    ax.set_yticks(range(len(pairs)))
    ax.set_yticklabels([" / ".join(str(p[a]) for a in shown) + f"  k={p['k']}  (n={p['n']})" for p in reversed(pairs)],
                       fontsize=8)
    ax.set_xlabel(f"pretrained − scratch, paired {metric} (dots: seeds; bar: mean and 95 % CI)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_ylim(-0.6, len(pairs) - 0.4)
    dots = [d for p in pairs for d in p["diffs"]] + [0.0, goal]
    lo, hi = min(dots), max(dots)
    lo, hi = lo - 0.15 * (hi - lo), hi + 0.15 * (hi - lo)
    ax.set_xlim(lo, hi)  # the dots decide the scale: a CI from 2 seeds can span ±1
    if any(p["n"] >= 2 and (p["low"] < lo or p["high"] > hi) for p in pairs):
        ax.set_xlabel(ax.get_xlabel() + "\nCIs wider than the dots run off the edges")
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path, dpi=100)
    return pairs


def plot_overlays(images: list[dict], predictions: dict[str, list[np.ndarray]], path: Path, title: str = "",
                  class_names: list[str] | None = None) -> None:
    """Rows: ``images`` (dicts with ``name``, ``image [C,H,W]``, ``target [H,W]``); columns: image |
    ground truth | one prediction per entry of ``predictions`` (label → one mask per image); a legend
    names the classes shown."""
    plt = _pyplot()
    from labeldiff.evaluate.report import class_legend, overlay, to_rgb

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
    masks = [im["target"] for im in images] + [m for preds in predictions.values() for m in preds]
    legend = class_legend(fig, masks, class_names)
    _save(fig, path, dpi=90, rect=(0, 0.4 / (2.6 * len(images) + 0.4), 1, 1) if legend else None)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int, rect: tuple | None = None) -> None:
    fig.tight_layout(rect=rect)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
