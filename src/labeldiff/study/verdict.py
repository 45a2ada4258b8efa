"""``verdict.md``: per label budget, the best pretrained setting against scratch, whether its gain meets the
goal with the CI above 0, how the selection rules compare, and the seeds a study needs for 80 % power;
with the confidence level split over the looks of a study extended with more seeds (Bonferroni)."""
from __future__ import annotations

from collections import defaultdict

from labeldiff.study.report import format_ci, format_delta, format_excludes_zero
from labeldiff.study.family import FEW_PAIRS, sign_flip_p, t_test_p
from labeldiff.study.stats import (BASELINE, axis_differences, label_sizes, paired_differences, pairs_for_power,
                                   pretraining_variance, summarize)


def verdict_markdown(rows: list[dict], title: str, metric: str = "dice", digits: int = 3, goal: float = 0.05,
                     looks: list[list[int]] | None = None, tuned: list[str] | None = None) -> str:
    """Per k: the best pretrained method × strategy × protocol (highest mean, random selection where
    there is a choice), its paired Δ to scratch with the 95 % CI and whether the CI excludes 0; then
    each selection − random (diverse, typical) for that setting and for scratch, and the seeds a study of that setting needs for
    80 % power at +``goal`` (:func:`pairs_for_power`).

    ``looks``: the seeds of each look when a study was extended with more seeds after an earlier
    verdict (:attr:`labeldiff.study.spec.Study.looks`). With more than one, the goal is judged on the
    CI at level 1 − 0.05 / looks (Bonferroni over the looks), each selection − random shows that CI
    too, and each look's seeds are also reported alone.

    ``tuned``: the section on a study's ``tune`` (:func:`labeldiff.study.tuning_cells.write_tuning`), said after
    the opening paragraph: each arm fine-tuned with its own chosen settings."""
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
    lines += tuned or []
    lines += pretraining_runs_section(rows, metric, digits, goal)
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
                return f", {lv}: {format_ci(a, digits)} ({format_excludes_zero(a)})"
            shown = [f"{p['select']}: {format_delta(p, digits)} {format_ci(p, digits)} ({format_excludes_zero(p)}{adjusted_ci(p)})"
                     for p in ps if p["n"]]
            return "; ".join(shown) or "–"
        adj = f" {format_ci(judged, digits)} ({format_excludes_zero(judged)}) |" if several else ""
        lines.append(f"| {k} | {_setting(best)} | {score(best):.{digits}f} | "
                     f"{'–' if scratch is None else f'{scratch[0]:.{digits}f}'} | {best['mean']:+.{digits}f} | "
                     f"{format_ci(best, digits)} | {format_excludes_zero(best)} |{adj} {short} | {fmt_sel(s_best)} | "
                     f"{fmt_sel(s_scr)} | {_seeds_for_power(best, goal)} |")
    lines.append(f"\nSeeds for 80 % power: how many seeds (pairs) a study of this setting needs to find a true gain of "
                 f"+{goal:.2f} with its 95 % CI above 0 four times in five, at the spread of the paired differences "
                 f"measured here (an estimate itself: with 5 pairs the true spread may be half or twice it). A "
                 f"study with at least that many seeds whose CI still contains 0 speaks against a gain of that "
                 f"size; one with fewer cannot tell.")
    few = [b for b in bests if 2 <= b["n"] < FEW_PAIRS]
    if few:
        checks = "; ".join(f"k = {b['k']}, {b['n']} pairs: t-test p = {t_test_p(b['diffs']):.3f}, sign-flip p = "
                           f"{sign_flip_p(b['diffs']):.3f}" for b in few)
        lines.append(f"\nWith fewer than {FEW_PAIRS} pairs the t-interval leans on a normality the pairs cannot show, so "
                     f"an exact sign-flip permutation test (each pair's sign a coin toss under no difference) checks "
                     f"it: {checks}. The verdict above uses the t-interval; where the two disagree on p < 0.05, read "
                     f"it as not shown. (With 5 pairs the sign-flip test cannot go below p = 0.0625.)")
    if several:
        lines += ["\n## Each look alone\n", "| look | seeds | k | setting | Δ vs scratch | 95 % CI | excludes 0 | pairs |",
                  "|---|---|---|---|---|---|---|---|"]
        for i, look in enumerate(looks, 1):
            alone = {_pair_key(p): p for p in paired_differences([r for r in rows if int(r["seed"]) in set(look)], metric)}
            for best in bests:
                p = alone.get(_pair_key(best))
                if p is not None:
                    lines.append(f"| {i} | {_seed_range(look)} | {best['k']} | {_setting(best)} | {format_delta(p, digits)} | "
                                 f"{format_ci(p, digits)} | {format_excludes_zero(p)} | {p['n']} |")
        settings = {(b["method"], b["strategy"], b["protocol"], b["k"]) for b in bests}
        alone_sel = []
        for i, look in enumerate(looks, 1):
            for p in axis_differences([r for r in rows if int(r["seed"]) in set(look)], "select", "random", metric):
                if p["n"] and ((p["method"], p["strategy"], p["protocol"], p["k"]) in settings
                               or p["strategy"] == BASELINE):
                    alone_sel.append(f"| {i} | {_seed_range(look)} | {p['k']} | {p['method']} / {p['strategy']} / "
                                     f"{p['protocol']} | {p['select']} − random | {format_delta(p, digits)} | "
                                     f"{format_ci(p, digits)} | {format_excludes_zero(p)} | {p['n']} |")
        if alone_sel:
            lines += ["\n### Each selection − random, each look alone\n",
                      "| look | seeds | k | setting | selection | Δ | 95 % CI | excludes 0 | pairs |",
                      "|---|---|---|---|---|---|---|---|---|", *alone_sel]
    return "\n".join(lines) + "\n"


def pretraining_runs_section(rows: list[dict], metric: str, digits: int, goal: float) -> list[str]:
    """With ``pretrain_seeds``: per setting, the gain over every pretraining run and fine-tuning seed, its
    interval with both as random factors, each run's own mean, and how much each factor moves the gain.
    Said before the per-run table below, which judges each run as if it were the only one."""
    found = pretraining_variance(rows, metric)
    if not found:
        return []
    lines = ["## The pretraining run as a source of variance\n",
             "Each method was pretrained several times (pretrain_seeds), and every run fine-tuned with every seed "
             "against the same scratch cells. The interval below treats both the pretraining run and the "
             "fine-tuning seed as random (a crossed two-way random-effects model; Satterthwaite's degrees of "
             "freedom): it is the answer for *this recipe*, not for one checkpoint of it. The standard deviations "
             "say how much a new pretraining run and a new fine-tuning seed (and label draw) each move the gain. "
             "With few pretraining runs the interval is wide, and the between-run spread itself is a rough "
             "estimate.\n",
             f"| k | setting | runs | seeds | Δ vs scratch | 95 % CI, runs and seeds random | df | goal (≥ +{goal:.2f}, "
             f"CI > 0) | each run's Δ | sd between runs | sd between seeds | residual sd |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in sorted(found, key=lambda v: (v["k"], v["method"], v["strategy"], v["protocol"], v["select"])):
        ci = f"[{v['low']:+.{digits}f}, {v['high']:+.{digits}f}]" if v["seeds"] >= 2 else "n/a"
        met = v["seeds"] >= 2 and v["low"] > 0 and v["mean"] >= goal
        per_run = ", ".join(f"p{r}: {x:+.{digits}f}" for r, x in zip(v["pretrain_seeds"], v["per_run"]))
        sd = [f"{v[k]:.{digits}f}" if v[k] == v[k] else "n/a" for k in ("sd_runs", "sd_seeds", "sd_residual")]
        lines.append(f"| {v['k']} | {_setting(v)} | {v['runs']} | {len(v['seeds_used'])} | {v['mean']:+.{digits}f} | "
                     f"{ci} | {v['df']:.1f} | {'met' if met else 'not met'} | {per_run} | {' | '.join(sd)} |")
    lines.append("\nThe table after this one treats each pretraining run (ddpm~p0, ddpm~p1, …) as its own method, "
                 "as if it were the only one: its best row is the best of several runs, picked after looking.\n")
    return lines


def _pair_key(p: dict) -> tuple:
    return p["method"], p["strategy"], p["protocol"], p["select"], p["k"]


def _setting(p: dict) -> str:
    name = f"{p['method']} / {p['strategy']} / {p['protocol']}"
    if p["select"] != "random":  # a study that ran no random cells (a replication of a diverse setting)
        name += f" / {p['select']}"
    return name


def _seed_range(seeds: list[int]) -> str:
    s = sorted(seeds)
    return f"{s[0]}–{s[-1]}" if s == list(range(s[0], s[-1] + 1)) and len(s) > 2 else ", ".join(map(str, s))


def _seeds_for_power(p: dict, effect: float) -> str:
    if p["n"] < 2:
        return "n/a"
    n = pairs_for_power(p["sd"], effect)
    return "> 1000" if n is None else str(n)
