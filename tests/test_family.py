"""Family-wise control over pre-registered primaries: Holm against a hand computation, the exact sign-flip
test against its definition, a planted effect found and null effects kept at α over many simulated families,
a registry read from results.csv files, and the command."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats

from labeldiff.cli import main
from labeldiff.study.family import (Family, Primary, holm, judge_family, primary_differences, sign_flip_p,
                                    t_test_p)
from labeldiff.study.report import write_csv


def test_holm_against_a_hand_computation():
    # sorted: 0.01 (× 4 = 0.04), 0.02 (× 3 = 0.06), 0.03 (× 2 = 0.06), 0.5 (× 1 = 0.5); given in another order
    assert holm([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    # monotone: a later raw product below an earlier one is raised to it; capped at 1; NaN not counted
    assert holm([0.04, 0.011, math.nan]) == pytest.approx([0.04, 0.022, math.nan], nan_ok=True)
    assert holm([0.6, 0.7]) == [1.0, 1.0]


def test_sign_flip_p_is_the_share_of_sign_patterns_as_extreme():
    assert sign_flip_p([0.1, 0.2, 0.3]) == pytest.approx(2 / 8)  # only all + and all − reach |mean| 0.2
    d = [0.3, -0.1, 0.2, 0.05, -0.02]
    by_hand = np.mean([abs(np.dot(s, d)) >= abs(sum(d)) - 1e-12
                       for s in itertools.product((1, -1), repeat=len(d))])
    assert sign_flip_p(d) == pytest.approx(by_hand)
    many = np.random.default_rng(1).normal(0.3, 1, 40)  # drawn, not enumerated, above 16 pairs
    assert abs(sign_flip_p(list(many)) - t_test_p(list(many))) < 0.03


def test_t_test_p_is_scipys_paired_test():
    d = [0.05, 0.02, -0.01, 0.07, 0.04, 0.03]
    assert t_test_p(d) == pytest.approx(stats.ttest_1samp(d, 0).pvalue)
    assert math.isnan(t_test_p([0.1])) and t_test_p([0.0, 0.0]) == 1.0


def _rows(diffs: list[float], method: str = "ddpm", k: int = 4, select: str = "random") -> list[dict]:
    rows = []
    for seed, d in enumerate(diffs):
        stems = f"a{seed};b{seed}"
        base = 0.5 + 0.01 * seed
        rows.append({"method": "none", "arch": "x", "strategy": "scratch", "protocol": "strong", "select": select,
                     "k": k, "seed": seed, "stems": stems, "dice": base})
        rows.append({"method": method, "arch": "x", "strategy": "full", "protocol": "strong", "select": select,
                     "k": k, "seed": seed, "stems": stems, "dice": base + d})
    return rows


def _family(tmp_path, name: str, all_diffs: list[list[float]], alpha: float = 0.05) -> Family:
    prims = []
    for i, diffs in enumerate(all_diffs):
        path = tmp_path / f"{name}_{i}.csv"
        write_csv(_rows(diffs), path)
        prims.append(Primary(f"s{i}", path, {"method": "ddpm", "strategy": "full", "k": 4}))
    return Family(name, prims, alpha=alpha, goal=0.05)


@pytest.mark.slow
def test_holm_keeps_false_survivors_near_alpha_and_finds_a_planted_effect(tmp_path):
    """300 simulated families of 5 primaries with 10 seeds each: with no effect anywhere, some primary
    survives in about α of them or fewer (uncorrected, about 1 − 0.95⁵ = 23 %); with an effect of 1.6
    standard deviation planted in one primary, it survives in most families and the null ones rarely."""
    rng = np.random.default_rng(0)
    any_null, any_raw, planted, other = 0, 0, 0, 0
    n_fam = 300
    for f in range(n_fam):
        null = _family(tmp_path, f"null{f}", [list(rng.normal(0, 0.05, 10)) for _ in range(5)])
        judged = judge_family(null)
        any_null += any(r["survives"] for r in judged)
        any_raw += any(r["p"] < 0.05 for r in judged)
        effect = _family(tmp_path, f"effect{f}", [list(rng.normal(0.08 if i == 0 else 0, 0.05, 10)) for i in range(5)])
        judged = judge_family(effect)
        planted += judged[0]["survives"]
        other += any(r["survives"] for r in judged[1:])
    assert any_null / n_fam < 0.08  # Holm: at most α (0.05) in expectation; 300 families leave some noise
    assert any_raw / n_fam > 0.15  # uncorrected, the family would be wrong far more often
    assert planted / n_fam > 0.6 and other / n_fam < 0.08


def test_primary_differences_pair_by_seed_and_subset_and_selection(tmp_path):
    rows = _rows([0.1, 0.2, -0.05])
    rows[1]["stems"] = "other"  # seed 0's scratch trained on other images: not a pair
    assert primary_differences(rows, {"method": "ddpm", "strategy": "full", "k": 4}) == pytest.approx([0.2, -0.05])
    sel = _rows([0.1, 0.1], select="random") + _rows([0.3, 0.0], select="typical")
    got = primary_differences(sel, {"method": "ddpm", "strategy": "full", "k": 4, "select": "typical", "vs": "random"})
    assert got == pytest.approx([0.2, -0.1])  # typical − random of the same method and seed
    two = _rows([0.1, 0.2], method="hybrid") + [r for r in _rows([0.05, 0.3], method="twin") if r["method"] == "twin"]
    got = primary_differences(two, {"method": "hybrid", "strategy": "full", "k": 4, "vs_method": "twin"})
    assert got == pytest.approx([0.05, -0.1])  # hybrid − its twin, same strategy, protocol, k and seed


def test_family_command_on_a_registry_and_its_errors(tmp_path, capsys):
    """Two studies' results.csv, one strong effect and one null: the command prints both, Holm-adjusted,
    says which survives, and writes the page; a registry naming a missing study or an unknown key is refused."""
    write_csv(_rows([0.08, 0.1, 0.09, 0.12, 0.07, 0.11, 0.1, 0.09, 0.08, 0.1]), tmp_path / "results" / "strong" / "results.csv")
    write_csv(_rows([0.01, -0.02, 0.0, 0.02, -0.01, 0.01, -0.01, 0.0, 0.02, -0.02]), tmp_path / "results" / "null" / "results.csv")
    registry = tmp_path / "primaries.yaml"
    registry.write_text(json.dumps({"families": {"pretraining": {"goal": 0.05, "primaries": [
        {"study": "strong", "fixed": "2026-01-01", "compare": {"method": "ddpm", "strategy": "full", "k": 4}},
        {"study": "null", "compare": {"method": "ddpm", "strategy": "full", "k": 4}}]}}}))
    out = tmp_path / "family.md"
    assert main(["family", str(registry), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## pretraining: 1 of 2 primaries survive Holm at α = 0.05" in printed
    assert "Meeting the goal (mean ≥ +0.05 and surviving): strong." in printed
    line = next(ln for ln in printed.splitlines() if ln.startswith("| strong |"))
    assert "| 2026-01-01 | 10 | 10 | +0.094 |" in line and line.endswith("| yes | met |")
    assert out.read_text() in printed
    registry.write_text(json.dumps({"families": {"f": {"primaries": [
        {"study": "gone", "compare": {"method": "ddpm", "k": 4}},
        {"study": "strong", "compare": {"method": "ddpm", "strategy": "full", "k": 4}}]}}}))
    assert main(["family", str(registry)]) == 0  # fixed, not run: counted in the family, never a survivor
    assert "| gone | ddpm, k = 4 − scratch | – | not run: no results.csv yet; it counts in the family as p = 1 |" \
        in capsys.readouterr().out
    from labeldiff.study.family import judge_registry

    (fam,) = judge_registry(registry)
    gone, strong = fam.judged
    assert strong["p_holm"] == pytest.approx(min(1.0, 2 * strong["p"]))  # m = 2: the unrun primary counts
    assert gone["p_holm"] == 1.0 and not gone["survives"]
    registry.write_text(json.dumps({"families": {"f": {"primaries": [
        {"study": "null", "compare": {"method": "ddpm", "k": 4, "seed": 1}}]}}}))
    assert main(["family", str(registry)]) == 2
    assert "(not seed)" in capsys.readouterr().err


def test_a_primary_over_several_pretraining_runs_uses_the_crossed_interval(tmp_path, capsys):
    """compare: {…, pretraining: random}: the gain over runs × seeds, its p-value from the crossed model's t
    (Satterthwaite df), consistent with the interval: p < 0.05 exactly when the 95 % interval excludes 0."""
    from labeldiff.study.stats import pretraining_variance

    rng = np.random.default_rng(3)
    for shift, name in ((0.06, "gain"), (0.0, "null")):
        rows = []
        for seed in range(6):
            stems = f"a{seed};b{seed}"
            base = 0.5 + rng.normal(0, 0.03)
            rows.append({"method": "none", "arch": "x", "strategy": "scratch", "protocol": "none", "select": "random",
                         "k": 2, "seed": seed, "stems": stems, "dice": base})
            for run in (1, 2, 3):
                rows.append({"method": f"ddpm~p{run}", "arch": "x", "strategy": "full", "protocol": "none",
                             "select": "random", "k": 2, "seed": seed, "stems": stems,
                             "dice": base + shift + 0.01 * (run - 2) + rng.normal(0, 0.01)})
        write_csv(rows, tmp_path / "results" / name / "results.csv")
    registry = tmp_path / "primaries.yaml"
    registry.write_text(json.dumps({"families": {"recheck": {"primaries": [
        {"study": s, "compare": {"method": "ddpm", "strategy": "full", "protocol": "none", "select": "random", "k": 2,
                                 "pretraining": "random"}} for s in ("gain", "null")]}}}))
    from labeldiff.study.family import judge_registry

    (fam,) = judge_registry(registry)
    for r in fam.judged:
        v = pretraining_variance(list(__import__("csv").DictReader(open(tmp_path / "results" / r["study"] /
                                                                         "results.csv"))))[0]
        assert (r["mean"], r["low"], r["high"]) == pytest.approx((v["mean"], v["low"], v["high"]))
        assert (r["p_t"] < 0.05) == (r["low"] > 0 or r["high"] < 0) and r["n"] == 18
    assert [r["survives"] for r in fam.judged] == [True, False]


def test_a_verdict_of_few_pairs_checks_its_t_test_with_the_sign_flip_test():
    from labeldiff.study.verdict import verdict_markdown

    rows = _rows([0.08, 0.1, 0.09, 0.12, 0.07])
    text = verdict_markdown(rows, "five seeds")
    d = [0.08, 0.1, 0.09, 0.12, 0.07]
    assert (f"k = 4, 5 pairs: t-test p = {t_test_p(d):.3f}, sign-flip p = {sign_flip_p(d):.3f}" in text
            and "sign-flip p = 0.062" in text and "cannot go below p = 0.0625" in text)
    many = _rows(list(np.linspace(0.05, 0.1, 12)))
    assert "sign-flip" not in verdict_markdown(many, "twelve seeds")


@pytest.mark.slow
def test_a_study_that_names_its_family_says_first_whether_its_primary_survives(tmp_path):
    from conftest import write_tiny_study

    (tmp_path / "primaries.yaml").write_text(json.dumps({"families": {"mine": {"primaries": [
        {"study": "s", "results": "elsewhere/results.csv", "compare": {"method": "ddpm", "strategy": "full", "k": 2}},
        {"study": "other", "compare": {"method": "ddpm", "k": 2}}]}}}))
    write_tiny_study(tmp_path, seeds=[0, 1], family="primaries.yaml")
    out = tmp_path / "out"
    assert main(["study", str(tmp_path / "s.yaml"), "--out", str(out)]) == 0
    lines = (out / "verdict.md").read_text().splitlines()
    assert lines[0].startswith("# Verdict: s") and lines[2].startswith("**After correction for the other primaries:** "
                                                                       "its primary (ddpm / full, k = 2 − scratch")
    assert "Holm's correction over the 2 primaries of the mine family" in lines[2]  # read from this run's results
    write_tiny_study(tmp_path / "bad", family="nowhere.yaml")
    assert main(["study", str(tmp_path / "bad" / "s.yaml"), "--out", str(tmp_path / "bad_out"), "--dry-run"]) == 2
