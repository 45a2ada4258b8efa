"""The pretraining run as a factor: ``pretrain_seeds`` trains one run per seed and fine-tunes each with every
seed; the crossed random-effects interval against a hand computation, its coverage over simulated studies
(where an interval that ignores the pretraining run covers far too rarely), and a tiny study end to end."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from conftest import write_tiny_study
from scipy import stats as sps
from safetensors.numpy import load_file

from labeldiff.cli import main
from labeldiff.study.stats import base_method, crossed_interval, paired_ci, pretraining_variance


def test_base_method_reads_the_run_label():
    assert base_method("ddpm@2000~p1") == ("ddpm@2000", 1) and base_method("ddpm") == ("ddpm", None)
    assert base_method("my~pretty") == ("my~pretty", None)


def test_crossed_interval_against_a_hand_computation():
    d = np.array([[0.10, 0.06, 0.08, 0.02], [0.03, 0.01, 0.05, -0.01], [0.07, 0.02, 0.09, 0.00]])
    P, S = d.shape
    m = d.mean()
    # sums of squares written out cell by cell (rows: pretraining runs, columns: fine-tuning seeds)
    ss_runs = sum(S * (d[p].mean() - m) ** 2 for p in range(P))
    ss_seeds = sum(P * (d[:, s].mean() - m) ** 2 for s in range(S))
    ss_total = sum((d[p, s] - m) ** 2 for p in range(P) for s in range(S))
    ms_a, ms_b = ss_runs / (P - 1), ss_seeds / (S - 1)
    ms_e = (ss_total - ss_runs - ss_seeds) / ((P - 1) * (S - 1))
    var = (ms_a + ms_b - ms_e) / (P * S)
    df = (ms_a + ms_b - ms_e) ** 2 / (ms_a ** 2 / (P - 1) + ms_b ** 2 / (S - 1) + ms_e ** 2 / ((P - 1) * (S - 1)))
    half = sps.t.ppf(0.975, df) * math.sqrt(var)
    got = crossed_interval(d)
    assert got["mean"] == pytest.approx(m) and got["df"] == pytest.approx(df)
    assert (got["low"], got["high"]) == pytest.approx((m - half, m + half))
    assert got["sd_runs"] == pytest.approx(math.sqrt((ms_a - ms_e) / S))
    assert got["sd_seeds"] == pytest.approx(math.sqrt((ms_b - ms_e) / P))
    assert got["per_run"] == pytest.approx(list(d.mean(axis=1)))


@pytest.mark.slow
def test_the_interval_covers_the_recipes_gain_when_pretraining_runs_differ():
    """1000 simulated studies of 3 pretraining runs × 10 seeds whose runs differ (sd 0.03) as much as their
    seeds (0.04): the crossed interval covers the true gain about 95 % of the time; pooling the 30 pairs as
    if one run had made them covers far less often; the variance components come out near the truth."""
    rng = np.random.default_rng(0)
    mu, sd_a, sd_b, sd_e = 0.05, 0.03, 0.04, 0.02
    covered = naive = 0
    est = []
    n = 1000
    for _ in range(n):
        d = mu + rng.normal(0, sd_a, (3, 1)) + rng.normal(0, sd_b, (1, 10)) + rng.normal(0, sd_e, (3, 10))
        ci = crossed_interval(d)
        covered += ci["low"] <= mu <= ci["high"]
        _, lo, hi, _, _ = paired_ci(list(d.ravel()))
        naive += lo <= mu <= hi
        est.append((ci["sd_runs"] ** 2, ci["sd_seeds"] ** 2, ci["sd_residual"] ** 2))
    assert 0.92 <= covered / n <= 0.99, covered / n
    assert naive / n < 0.80, naive / n
    a, b, e = np.mean(est, axis=0)
    assert a == pytest.approx(sd_a ** 2, rel=0.35) and b == pytest.approx(sd_b ** 2, rel=0.2)
    assert e == pytest.approx(sd_e ** 2, rel=0.1)


def test_pretraining_variance_reads_runs_and_seeds_from_rows():
    rows = []
    for seed in range(3):
        stems = f"a{seed};b{seed}"
        rows.append({"method": "none", "arch": "x", "strategy": "scratch", "protocol": "default", "select": "random",
                     "k": 2, "seed": seed, "stems": stems, "dice": 0.5})
        for run, shift in ((0, 0.02), (1, 0.06)):
            rows.append({"method": f"ddpm~p{run}", "arch": "x", "strategy": "full", "protocol": "default",
                         "select": "random", "k": 2, "seed": seed, "stems": stems, "dice": 0.5 + shift + 0.01 * seed})
    (v,) = pretraining_variance(rows)
    assert v["method"] == "ddpm" and v["pretrain_seeds"] == [0, 1] and v["seeds_used"] == [0, 1, 2]
    assert v["per_run"] == pytest.approx([0.03, 0.07]) and v["mean"] == pytest.approx(0.05)


@pytest.mark.slow
def test_a_study_with_pretrain_seeds_trains_a_run_per_seed_and_says_how_much_each_moves(tmp_path, capsys):
    write_tiny_study(tmp_path, pretrain_steps=3, seeds=[0, 1], pretrain_seeds=[0, 1])
    out = tmp_path / "out"
    assert main(["study", str(tmp_path / "s.yaml"), "--out", str(out)]) == 0
    runs = sorted(p.name for p in (out / "pretrain").iterdir())
    assert [r.split("-")[0] for r in runs] == ["ddpm~p0", "ddpm~p1"]
    w0, w1 = (load_file(out / "pretrain" / r / "model.safetensors") for r in runs)
    assert any(not np.array_equal(w0[k], w1[k]) for k in w0)  # two seeds, two networks
    rows = list(csv.DictReader(open(out / "results.csv")))
    full = [r for r in rows if r["strategy"] == "full"]
    assert sorted((r["pretrain_seed"], r["seed"]) for r in full) == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    assert len([r for r in rows if r["strategy"] == "scratch"]) == 2  # one scratch cell per seed, shared by both
    verdict = (out / "verdict.md").read_text()
    assert "## The pretraining run as a source of variance" in verdict
    assert "| 2 | ddpm / full / default | 2 | 2 |" in verdict and "p0: " in verdict and "p1: " in verdict
    capsys.readouterr()
    write_tiny_study(tmp_path / "bad", pretrain_seeds=[0, -1])
    assert main(["study", str(tmp_path / "bad" / "s.yaml"), "--out", str(tmp_path / "bad_out"), "--dry-run"]) == 2
    assert "pretrain_seeds: -1 is not an integer ≥ 0" in capsys.readouterr().err
