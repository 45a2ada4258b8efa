"""Study statistics as pure functions on result rows: the groups a table shows, mean ± std over seeds, and
paired differences (method − scratch, along one axis, study − study) with their t confidence intervals.

A row is one finished cell: ``{"cell", "method", "pretrain_steps", "arch", "strategy", "protocol", "k",
"seed", "select", "stems", "dice", "iou", "dice_0" … "dice_{K-1}", "seconds"}``. ``dice`` / ``iou`` are the
cell's test-set scores (per image, mean over images, then over foreground classes; see
:func:`labeldiff.evaluate.metrics.summarize`); ``stems`` is the ``;``-joined sorted labeled subset.
Over seeds: mean ± sample standard deviation (ddof = 1), n = number of seeds with a finite score. A paired
difference compares two cells of the same seed (and labeled subset); its CI is mean ± t·sd/√n over the
n pairs (Student's t with n − 1 degrees of freedom, ``scipy.stats``).
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

BASELINE = "scratch"


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """``(mean, sample std, n)`` of the finite values; std is NaN for n < 2, mean NaN for n = 0."""
    v = np.array([x for x in values if x is not None and math.isfinite(float(x))], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def to_float(v) -> float:
    """A CSV cell as a number (NaN when empty or not a number)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


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


def t_quantile(p: float, df: int) -> float:
    """The two-sided ``p`` critical value of Student's t with ``df`` degrees of freedom, the t with
    P(|T| ≤ t) = p, i.e. its (1 + p) / 2 quantile (``scipy.stats.t``; p = 0.95, df = 2 → 4.303)."""
    from scipy.stats import t

    return float(t.ppf((1 + p) / 2, df))


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


def scratch_pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """Every pretrained cell with the scratch cell of the same network, protocol, k, seed and selection, in the
    rows' order; whether they trained on the same images is :func:`same_images`."""
    def where(r: dict) -> tuple:
        return r["arch"], axis(r, "protocol"), int(r["k"]), int(r["seed"]), axis(r, "select")

    base = {where(r): r for r in rows if r["strategy"] == BASELINE}
    return [(r, base[where(r)]) for r in rows if r["strategy"] != BASELINE and where(r) in base]


def same_images(cell: dict, scratch: dict) -> bool:
    """A pair is a pair when both trained on the same labeled images (a ``source`` cell has none: any pairs)."""
    return cell["stems"] == scratch["stems"] or cell["strategy"] == "source"


def paired_differences(rows: list[dict], metric: str = "dice", level: float = 0.95) -> list[dict]:
    """Every method × strategy × protocol × select vs scratch of the same network, protocol, k, seed and subset.

    Returns one dict per (method, strategy, protocol, select, k): ``mean``, ``low``, ``high`` (``level``
    CI of the mean paired difference, method − scratch), ``n`` pairs, ``diffs`` (the differences, in
    seed order of the rows) and ``unpaired``: cells whose scratch counterpart trained on a different
    subset, left out.
    """
    diffs: dict[tuple, list[float]] = defaultdict(list)
    unpaired: dict[tuple, int] = defaultdict(int)
    order: dict[tuple, None] = {}
    for r, b in scratch_pairs(rows):
        key = (r["method"], r["strategy"], axis(r, "protocol"), axis(r, "select"), int(r["k"]))
        order[key] = None
        if same_images(r, b):
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
        va, vb = to_float(r[metric]), to_float(o[metric])
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


def base_method(method: str) -> tuple[str, int | None]:
    """``("ddpm@2000", 1)`` for the row label ``ddpm@2000~p1`` of a ``pretrain_seeds`` run; ``(method, None)``
    otherwise."""
    name, mark, seed = method.rpartition("~p")
    return (name, int(seed)) if mark and seed.isdigit() else (method, None)


def crossed_interval(d: np.ndarray, level: float = 0.95) -> dict:
    """The mean of ``d [P runs, S seeds]`` (each pretrained run's paired difference to scratch at each
    fine-tuning seed) and its ``level`` interval with the pretraining run **and** the fine-tuning seed as
    random factors, crossed (every run is fine-tuned with every seed, against the same scratch cell):
    ``d[p, s] = μ + a_p + b_s + e_ps``. Two-way random-effects ANOVA with one observation per cell:
    ``E[MS_runs] = σ²_e + S σ²_a``, ``E[MS_seeds] = σ²_e + P σ²_b``, ``E[MS_e] = σ²_e``, so
    ``Var(mean) = σ²_a/P + σ²_b/S + σ²_e/(PS)`` is estimated by ``(MS_runs + MS_seeds − MS_e) / (PS)``
    (floored at ``MS_e / (PS)``), with Satterthwaite's degrees of freedom. Returns ``mean``, ``low``,
    ``high``, ``df``, ``p`` (the two-sided t-test of mean 0 on those df), ``runs`` (P), ``seeds`` (S), ``per_run`` (each run's mean), and the variance
    components as standard deviations ``sd_runs``, ``sd_seeds``, ``sd_residual`` (method-of-moments,
    negative estimates set to 0)."""
    from scipy.stats import t

    d = np.asarray(d, dtype=float)
    P, S = d.shape
    mean = float(d.mean())
    out = {"mean": mean, "runs": P, "seeds": S, "per_run": [float(x) for x in d.mean(axis=1)],
           "low": math.nan, "high": math.nan, "df": math.nan, "p": math.nan, "sd_runs": math.nan,
           "sd_seeds": math.nan, "sd_residual": math.nan}
    if P < 2 or S < 2:
        return out
    run_means, seed_means = d.mean(axis=1), d.mean(axis=0)
    ms_runs = S * float(((run_means - mean) ** 2).sum()) / (P - 1)
    ms_seeds = P * float(((seed_means - mean) ** 2).sum()) / (S - 1)
    resid = d - run_means[:, None] - seed_means[None, :] + mean
    ms_e = float((resid ** 2).sum()) / ((P - 1) * (S - 1))
    combined = max(ms_runs + ms_seeds - ms_e, ms_e)
    denom = ms_runs ** 2 / (P - 1) + ms_seeds ** 2 / (S - 1) + ms_e ** 2 / ((P - 1) * (S - 1))
    df = combined ** 2 / denom if denom > 0 else math.inf
    se = math.sqrt(combined / (P * S))
    half = float(t.ppf((1 + level) / 2, df)) * se
    p = float(2 * t.sf(abs(mean) / se, df)) if se > 0 else (1.0 if mean == 0 else 0.0)
    out.update(low=mean - half, high=mean + half, df=df, p=p, sd_runs=math.sqrt(max(0.0, (ms_runs - ms_e) / S)),
               sd_seeds=math.sqrt(max(0.0, (ms_seeds - ms_e) / P)), sd_residual=math.sqrt(ms_e))
    return out


def pretraining_variance(rows: list[dict], metric: str = "dice", level: float = 0.95) -> list[dict]:
    """Per setting (base method, strategy, protocol, select, k) with several pretraining runs
    (``pretrain_seeds``): the paired differences to scratch as a runs × seeds table over the fine-tuning
    seeds every run has, and :func:`crossed_interval` of it, with the setting's axes and ``seeds_used``."""
    table: dict[tuple, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for p in paired_differences_by_seed(rows, metric):
        name, run = base_method(p["method"])
        if run is not None:
            table[(name, p["strategy"], p["protocol"], p["select"], p["k"])][run][p["seed"]] = p["diff"]
    out = []
    for key, by_run in table.items():
        if len(by_run) < 2:
            continue
        runs = sorted(by_run)
        seeds = sorted(set.intersection(*(set(by_run[r]) for r in runs)))
        d = np.array([[by_run[r][s] for s in seeds] for r in runs])
        out.append({**dict(zip(("method", "strategy", "protocol", "select", "k"), key)), "pretrain_seeds": runs,
                    "seeds_used": seeds, **crossed_interval(d, level)})
    return out


def paired_differences_by_seed(rows: list[dict], metric: str = "dice") -> list[dict]:
    """Every pretrained cell's difference to the scratch cell of the same network, protocol, k, seed, select
    and labeled images: ``method``, ``strategy``, ``protocol``, ``select``, ``k``, ``seed``, ``diff``."""
    return [{"method": r["method"], "strategy": r["strategy"], "protocol": axis(r, "protocol"),
             "select": axis(r, "select"), "k": int(r["k"]), "seed": int(r["seed"]),
             "diff": float(r[metric]) - float(b[metric])} for r, b in scratch_pairs(rows) if same_images(r, b)]
