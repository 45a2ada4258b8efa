"""Family-wise error control over the primary comparisons that studies fixed in advance.

One study's verdict judges its primary comparison at α = 0.05. A project (or a user) that runs many studies
makes many such judgements, and some will pass by chance: with 13 independent primaries and no effect
anywhere, the chance that at least one passes is 1 − 0.95¹³ ≈ 49 %. A **registry** lists the primaries of one
or more **families** (for example every "pretrained − scratch" primary, and every "selection − random" one),
each with the study it belongs to, the comparison, and when it was fixed. :func:`judge_family` gives each
primary

- its paired t-test p-value over seeds (two-sided; the test behind the study's 95 % t-interval), and, with
  fewer than :data:`FEW_PAIRS` pairs, an exact sign-flip permutation p-value as a check, since the t-test leans
  on normality that a handful of pairs cannot show; the p-value the verdict uses is the larger of the two;
- its **Holm**-adjusted p-value over its family: sort the m p-values, multiply the i-th smallest by
  m − i + 1, make them non-decreasing, cap at 1. A primary **survives** when its adjusted p-value is below
  the family's α. Holm controls the chance of any false "survives" in the family at α, whatever the
  dependence between the primaries, and rejects everything Bonferroni does (and sometimes more);
- its goal: a pretraining primary meets the goal when its mean is at least ``goal`` and it survives; a
  selection primary (``vs:`` another selection) when it survives with a positive mean. ``vs_method:`` compares
  with another network of the study (the same strategy, protocol, k, seed and selection) instead of scratch.

The registry is YAML::

    alpha: 0.05                # per family, unless a family sets its own
    families:
      pretraining:
        question: does DDPM pretraining beat the same network from scratch?
        goal: 0.05             # the gain a primary must also reach (mean); 0 for "any gain"
        primaries:
          - study: demo_confirm                    # results: results/demo_confirm/results.csv by default
            fixed: 2026-12-05                      # when the comparison was fixed, before any cell ran
            compare: {method: ddpm, strategy: full, protocol: none, select: random, k: 2}   # − scratch
      selection:
        goal: 0
        primaries:
          - study: cvc_typical10k
            compare: {method: ddpm@10000, strategy: full, protocol: strong, k: 4, select: typical, vs: random}

``results`` paths are relative to the registry file. ``labeldiff family REGISTRY`` prints the families'
tables and ``--out`` writes them as a page.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from labeldiff.errors import ConfigError, DataError
from labeldiff.study.stats import axis, paired_ci, same_images, scratch_pairs

FEW_PAIRS = 10  # below this many pairs the sign-flip test checks the t-test
EXACT_UP_TO = 16  # sign flips enumerated exactly up to this many pairs (2¹⁶ patterns); drawn above
COMPARE_KEYS = ("method", "strategy", "protocol", "select", "k", "vs", "vs_method", "pretraining")


@dataclass
class Primary:
    study: str
    results: Path
    compare: dict
    fixed: str = ""


@dataclass
class Family:
    name: str
    primaries: list[Primary]
    alpha: float = 0.05
    goal: float = 0.05
    question: str = ""
    judged: list[dict] = field(default_factory=list)


def load_registry(path: Path) -> list[Family]:
    """The families of the registry file ``path`` (see the module docstring); a ConfigError names what is
    missing or unknown."""
    import yaml

    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the registry ({e})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("families"), dict) or not spec["families"]:
        raise ConfigError(f"{path}: a registry has `families:`, each with `primaries:` (see `labeldiff family --help`)")
    alpha = float(spec.get("alpha", 0.05))
    families = []
    for name, fam in spec["families"].items():
        entries = (fam or {}).get("primaries") or []
        if not entries:
            raise ConfigError(f"{path}: family {name!r} has no primaries")
        primaries = []
        for i, p in enumerate(entries):
            where = f"{path}: family {name!r}, primary {i + 1}"
            if not isinstance(p, dict) or "study" not in p or not isinstance(p.get("compare"), dict):
                raise ConfigError(f"{where}: give `study:` and `compare: {{method, strategy, protocol, select, k}}`")
            unknown = sorted(set(p["compare"]) - set(COMPARE_KEYS))
            if unknown or not {"method", "k"} <= set(p["compare"]):
                raise ConfigError(f"{where}: compare needs method and k, and takes only {', '.join(COMPARE_KEYS)}"
                                  + (f" (not {', '.join(unknown)})" if unknown else ""))
            results = path.parent / p.get("results", f"results/{p['study']}/results.csv")
            primaries.append(Primary(str(p["study"]), results, dict(p["compare"]), str(p.get("fixed", ""))))
        families.append(Family(str(name), primaries, float(fam.get("alpha", alpha)), float(fam.get("goal", 0.05)),
                               str(fam.get("question", ""))))
    return families


def primary_differences(rows: list[dict], compare: dict, metric: str = "dice") -> list[float]:
    """The paired differences over seeds of one primary: the cell ``compare`` names − scratch of the same
    protocol, selection, k, seed and labeled images; or, with ``vs``, − the same method's cells under
    selection ``vs`` (same seed). In seed order."""
    return [a - b for a, b in primary_pairs(rows, compare, metric)]


def primary_pairs(rows: list[dict], compare: dict, metric: str = "dice") -> list[tuple[float, float]]:
    """``(arm, baseline)`` scores of each pair of :func:`primary_differences`, in seed order."""
    want = {k: str(v) for k, v in compare.items() if k not in ("vs", "vs_method")}

    def value(r: dict, key: str) -> str:
        return axis(r, key) if key in ("protocol", "select") else str(r[key])

    def match(r: dict, **fixed) -> bool:
        return all(value(r, key) == v for key, v in {**want, **fixed}.items())

    if "vs" in compare or "vs_method" in compare:  # another selection, or another network, same seed
        other = {"select": str(compare["vs"])} if "vs" in compare else {"method": str(compare["vs_method"])}
        arm = {int(r["seed"]): r for r in rows if match(r)}
        base = {int(r["seed"]): r for r in rows if match(r, **other)}
        pairs = [(arm[s], base[s]) for s in sorted(arm) if s in base]
    else:  # the study's own pairing with scratch (same network, protocol, k, seed, selection and images)
        pairs = sorted(((a, b) for a, b in scratch_pairs(rows) if match(a) and same_images(a, b)),
                       key=lambda ab: int(ab[0]["seed"]))
    return [(float(a[metric]), float(b[metric])) for a, b in pairs]


def t_test_p(diffs: list[float]) -> float:
    """Two-sided p-value of the paired t-test that the mean difference is 0 (NaN below 2 pairs; 0 or 1
    when every difference is the same)."""
    from scipy.stats import t

    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n < 2:
        return math.nan
    sd = d.std(ddof=1)
    if sd == 0:
        return 1.0 if d.mean() == 0 else 0.0
    return float(2 * t.sf(abs(d.mean()) / (sd / math.sqrt(n)), n - 1))


def sign_flip_p(diffs: list[float], draws: int = 100_000, seed: int = 0) -> float:
    """Two-sided p-value of the sign-flip permutation test: under "no difference" each pair's sign is a
    coin toss, so the observed |mean| is compared with the |mean| of every pattern of flipped signs
    (all 2ⁿ up to :data:`EXACT_UP_TO` pairs, else ``draws`` random ones, the observed one counted)."""
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n == 0:
        return math.nan
    observed = abs(d.mean()) - 1e-12 * (1 + abs(d).max())  # ties with the observed count as extreme
    if n <= EXACT_UP_TO:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        return float((np.abs(signs @ d / n) >= observed).mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(draws, n))
    return float(((np.abs(signs @ d / n) >= observed).sum() + 1) / (draws + 1))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest of m is multiplied by
    m − i + 1, made non-decreasing along that order, capped at 1. A NaN p-value stays NaN and does not
    count in m."""
    finite = [i for i, p in enumerate(p_values) if math.isfinite(p)]
    m = len(finite)
    out = [math.nan] * len(p_values)
    running = 0.0
    for rank, i in enumerate(sorted(finite, key=lambda j: p_values[j])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


def judge_family(family: Family, metric: str = "dice") -> list[dict]:
    """Each primary of ``family`` with ``n``, ``mean``, ``low``, ``high`` (95 % t-interval), ``p_t``,
    ``p_sign`` (None from :data:`FEW_PAIRS` pairs up), ``p`` (the one used), ``p_holm``, ``survives`` and
    ``goal_met``; also stored in ``family.judged``."""
    from labeldiff.study.report import read_csv

    out = []
    for p in family.primaries:
        if not p.results.is_file():  # fixed, not run (yet): it counts in the family, and cannot survive
            out.append({"study": p.study, "compare": p.compare, "fixed": p.fixed, "n": 0, "mean": math.nan,
                        "low": math.nan, "high": math.nan, "p_t": math.nan, "p_sign": None, "p": 1.0, "ahead": 0,
                        "arm": math.nan, "baseline": math.nan, "pending": str(p.results)})
            continue
        rows = read_csv(p.results)
        if p.compare.get("pretraining") == "random":  # pretrain_seeds: runs × seeds, both random
            out.append(_crossed_primary(p, rows, metric, family))
            continue
        pairs = primary_pairs(rows, p.compare, metric)
        diffs = [a - b for a, b in pairs]
        if not diffs:
            raise DataError(f"family {family.name!r}: no paired cells in {p.results} for {p.compare}; check the "
                            f"method, strategy, protocol, select and k against its results.csv")
        mean, low, high, n, _ = paired_ci(diffs)
        p_t = t_test_p(diffs)
        p_sign = sign_flip_p(diffs) if n < FEW_PAIRS else None
        out.append({"study": p.study, "compare": p.compare, "fixed": p.fixed, "n": n, "mean": mean, "low": low,
                    "high": high, "p_t": p_t, "p_sign": p_sign, "p": max(p_t, p_sign) if p_sign is not None else p_t,
                    "ahead": sum(x > 0 for x in diffs), "arm": float(np.mean([a for a, _ in pairs])),
                    "baseline": float(np.mean([b for _, b in pairs]))})
    for row, adjusted in zip(out, holm([r["p"] for r in out])):
        row["p_holm"] = adjusted
        row["survives"] = math.isfinite(adjusted) and adjusted < family.alpha
        row["goal_met"] = bool(row["survives"] and row["mean"] >= max(family.goal, 0) and row["mean"] > 0)
    family.judged = out
    return out


def _crossed_primary(p: Primary, rows: list[dict], metric: str, family: Family) -> dict:
    """A primary over several pretraining runs (``compare: {…, pretraining: random}``): the gain over runs ×
    seeds with both random and its p-value (:func:`labeldiff.study.stats.crossed_interval`)."""
    from labeldiff.study.stats import base_method, pretraining_variance

    want = {k: str(v) for k, v in p.compare.items() if k in ("method", "strategy", "protocol", "select", "k")}
    found = [v for v in pretraining_variance(rows, metric) if all(str(v[k]) == x for k, x in want.items())]
    if len(found) != 1:
        raise DataError(f"family {family.name!r}: {p.results} has {len(found)} settings with several pretraining runs "
                        f"matching {p.compare}; name method, strategy, protocol, select and k of exactly one")
    v = found[0]

    def named(a: dict) -> bool:  # a cell of one of the primary's pretraining runs, on a seed every run has
        name, run = base_method(a["method"])
        return run is not None and int(a["seed"]) in v["seeds_used"] and all(
            (name if k == "method" else str(axis(a, k) if k in ("protocol", "select") else a[k])) == x
            for k, x in want.items())

    pairs = [(a, b) for a, b in scratch_pairs(rows) if same_images(a, b) and named(a)]
    scratch = {id(b): float(b[metric]) for _, b in pairs}  # each scratch cell once: every run shares it
    return {"study": p.study, "compare": p.compare, "fixed": p.fixed, "n": len(pairs), "mean": v["mean"],
            "low": v["low"], "high": v["high"], "p_t": v["p"], "p_sign": None, "p": v["p"],
            "ahead": sum(float(a[metric]) > float(b[metric]) for a, b in pairs),
            "arm": float(np.mean([float(a[metric]) for a, _ in pairs])), "baseline": float(np.mean(list(scratch.values()))),
            "runs": v["runs"]}


def describe(compare: dict) -> str:
    """``ddpm@10000 / full / strong / random, k = 4 − scratch`` or ``… typical − random``."""
    parts = [str(compare[k]) for k in ("method", "strategy", "protocol") if k in compare]
    if "vs" in compare:
        return f"{' / '.join(parts)}, k = {compare['k']}: {compare.get('select')} − {compare['vs']}"
    if "vs_method" in compare:
        return f"{' / '.join(parts)}, k = {compare['k']} − {compare['vs_method']}"
    sel = f" / {compare['select']}" if "select" in compare else ""
    runs = " (pretraining runs and seeds random)" if compare.get("pretraining") == "random" else ""
    return f"{' / '.join(parts)}{sel}, k = {compare['k']} − scratch{runs}"


def format_p(p: float | None) -> str:
    """A p-value as a table shows it: 2 significant digits below 0.001, else 3 decimals; – when none."""
    if p is None or not math.isfinite(p):
        return "–"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def family_markdown(families: list[Family], title: str = "Family-wise verdicts") -> str:
    """The families' tables, each primary's verdict first, then how it was computed."""
    lines = [f"# {title}\n"]
    for fam in families:
        rows = fam.judged
        survived = [r["study"] for r in rows if r["survives"]]
        goal = f"the goal (mean ≥ +{fam.goal:.2f} and surviving)" if fam.goal > 0 else "the goal (surviving, mean > 0)"
        lines += [f"## {fam.name}: {len(survived)} of {len(rows)} primaries survive Holm at α = {fam.alpha:g}\n"]
        if fam.question:
            lines.append(f"{fam.question}\n")
        lines += [f"Surviving: {', '.join(survived) or 'none'}. Meeting {goal}: "
                  f"{', '.join(r['study'] for r in rows if r['goal_met']) or 'none'}.\n",
                  "| study | comparison | fixed | pairs | ahead | Δ | 95 % CI | p (t) | p (sign-flip) | "
                  f"Holm p (of {len(rows)}) | survives | goal |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["p_holm"], r["study"])):
            if r.get("pending"):
                lines.append(f"| {r['study']} | {describe(r['compare'])} | {r['fixed'] or '–'} | not run: no "
                             f"{Path(r['pending']).name} yet; it counts in the family as p = 1 | | | | | | "
                             f"{format_p(r['p_holm'])} | no | not met |")
                continue
            ci = f"[{r['low']:+.3f}, {r['high']:+.3f}]" if r["n"] >= 2 else "n/a"
            lines.append(f"| {r['study']} | {describe(r['compare'])} | {r['fixed'] or '–'} | {r['n']} | {r['ahead']} | "
                         f"{r['mean']:+.3f} | {ci} | {format_p(r['p_t'])} | {format_p(r['p_sign'])} | {format_p(r['p_holm'])} | "
                         f"{'yes' if r['survives'] else 'no'} | {'met' if r['goal_met'] else 'not met'} |")
        lines.append("")
    lines.append(
        f"Each primary: the paired differences over its seeds (same labeled images), their mean and 95 % "
        f"t-interval, and the two-sided paired t-test p-value. With fewer than {FEW_PAIRS} pairs an exact sign-flip "
        f"permutation test checks the t-test, and the larger of the two p-values is the one used. Holm's "
        f"step-down adjustment over the family: the i-th smallest of m p-values × (m − i + 1), made "
        f"non-decreasing; a primary survives when its adjusted p-value is below α. Holm holds the chance of any "
        f"false survivor in the family at α whatever the dependence between primaries (several here share a "
        f"pretraining run or a dataset). The intervals resample fine-tuning seeds and label draws only: each "
        f"study has one pretraining run, whose own variance they do not include.")
    return "\n".join(lines) + "\n"


def judge_registry(path: Path, metric: str = "dice", own: tuple[str, Path] | None = None) -> list[Family]:
    """Every family of the registry ``path``, judged. ``own``: ``(study, results.csv)`` — a study judging
    itself reads its primary from its own results, wherever the registry says they are copied."""
    families = load_registry(path)
    for fam in families:
        for p in fam.primaries:
            if own is not None and p.study == own[0]:
                p.results = Path(own[1])
        judge_family(fam, metric)
    return families


def correction_note(families: list[Family], study: str, page: str | None = None) -> str:
    """What Holm's correction over its family says of ``study``'s primary, in a sentence (``""`` when the
    registry has none); ``page``: a link to every primary."""
    found = next(((f, r) for f in families for r in f.judged if r["study"] == study), None)
    if found is None:
        return ""
    fam, r = found
    m = len(fam.judged)
    if r.get("pending"):
        return f"**After correction for the other primaries:** its primary has no results yet.\n"
    verdict = "survives" if r["survives"] else "does not survive"
    link = f"; [every primary]({page})" if page else ""
    return (f"**After correction for the other primaries:** its primary ({describe(r['compare'])}, "
            f"{r['mean']:+.3f} over {r['n']} pairs) **{verdict}** Holm's correction over the {m} "
            f"primar{'y' if m == 1 else 'ies'} of the {fam.name} family (adjusted p = {format_p(r['p_holm'])}{link}).\n")
