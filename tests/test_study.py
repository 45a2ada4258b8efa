"""``labeldiff study``: spec validation, subset selection, the aggregation on hand-written rows, and
tiny end-to-end studies that are interrupted, resumed and edited."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import labeldiff.recipes
import labeldiff.study.runner as runner
from labeldiff import examples
from labeldiff.data.folders import LabeledFolder
from labeldiff.data.io import DataError
from labeldiff.data.splits import select_subset
from labeldiff.study import execute, report
from labeldiff.study.configs import pretrain_key
from labeldiff.study.plan import plan_pretraining
from labeldiff.study.plots import plot_paired
from labeldiff.study.select import (diverse_subset, k_center_greedy, pixel_features, random_subset, typical_picks,
                                    typical_subset, typicality, unet_features)
from labeldiff.study.spec import StudyError, load_study, parse_study
from labeldiff.study.stats import (axis_differences, length_differences, paired_ci, paired_differences, pairs_for_power,
                                   study_differences, summarize, t_quantile)
from labeldiff.study.verdict import verdict_markdown

from conftest import DATASETS, write_labeled_dataset

REPO = Path(__file__).resolve().parents[1]
RESEARCH = REPO / "research" / "studies"
TINY_PRETRAIN = {
    "model": {"channels": [8, 16], "attention_levels": [False, False], "num_head_channels": 8, "norm_num_groups": 8,
              "num_res_blocks": 1},
    "corruption": {"method": "ddpm"},
    "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "ema_decay": 0.9, "precision": "fp32",
              "device": "cpu", "checkpoint_every": 100, "log_every": 1},
}
TINY_FINETUNE = {
    "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "precision": "fp32", "device": "cpu",
              "checkpoint_every": 100, "log_every": 1},
    "transfer": {"head_hidden": 8},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A folder with data/ (6 images, K=3, 4 train / 2 test), pre.yaml and ft.yaml (tiny recipes)."""
    root = tmp_path_factory.mktemp("study")
    write_labeled_dataset(root / "data", n=6, k=3)
    (root / "pre.yaml").write_text(yaml.safe_dump(TINY_PRETRAIN))
    (root / "ft.yaml").write_text(yaml.safe_dump(TINY_FINETUNE))
    return root


def base_study(**changes) -> dict:
    s = {"data": {"path": "data", "size": 16, "channels": 3},
         "methods": [{"name": "ddpm", "recipe": "pre.yaml", "pretrain_steps": [2]}],
         "strategies": ["full", "scratch"], "labels": [1, 2], "seeds": [0], "finetune": {"recipe": "ft.yaml"}}
    s.update(changes)
    return s


def write_study(folder: Path, study: dict, name: str = "study.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(study))
    return path


class Calls:
    """Wraps execute.run_transfer / run_pretrain and records the calls (optionally interrupting)."""

    def __init__(self, monkeypatch, interrupt_after: int | None = None):
        self.finetune: list[str] = []
        self.pretrain: list[tuple[str, bool]] = []
        from labeldiff.pretrain.run import run_pretrain as real_pre
        from labeldiff.transfer.run import run_transfer as real_ft

        def finetune(cfg, out, *args, **kw):
            if interrupt_after is not None and len(self.finetune) == interrupt_after:
                Path(out).mkdir(parents=True)
                (Path(out) / "half_written").write_text("x")  # a partial cell folder
                raise KeyboardInterrupt
            self.finetune.append(Path(out).parent.name)
            return real_ft(cfg, out, *args, **kw)

        def pretrain(cfg, out, resume=False, overwrite=False):
            self.pretrain.append((Path(out).name, resume))
            return real_pre(cfg, out, resume=resume, overwrite=overwrite)

        monkeypatch.setattr(execute, "run_transfer", finetune)
        monkeypatch.setattr(execute, "run_pretrain", pretrain)


# --- subset selection -----------------------------------------------------------------------------------------

STEMS = [f"s{i}" for i in range(10)]


def test_random_subset_is_select_subset_and_deterministic():
    for seed in range(5):
        assert random_subset(STEMS, 3, seed) == select_subset(STEMS, 3, seed)
        assert random_subset(STEMS, 3, seed) == random_subset(list(reversed(STEMS)), 3, seed)
    assert len({tuple(random_subset(STEMS, 3, s)) for s in range(5)}) > 1


def test_random_subset_covers_every_class_deterministically():
    classes = {s: frozenset({0, 1}) for s in STEMS}
    classes["s7"] = frozenset({0, 2})  # the only image with class 2
    for seed in range(6):
        chosen = random_subset(STEMS, 2, seed, classes, num_classes=3)
        assert "s7" in chosen and len(chosen) == 2
        assert chosen == random_subset(STEMS, 2, seed, classes, num_classes=3)
    # a draw that already covers every class is select_subset's own
    covering = next(s for s in range(50) if "s7" in select_subset(STEMS, 2, s))
    assert random_subset(STEMS, 2, covering, classes, 3) == select_subset(STEMS, 2, covering)


def test_class_coverage_impossible_errors():
    classes = {s: frozenset({0, 1}) for s in STEMS}
    with pytest.raises(DataError, match="class 2 appears in no image of the 'train' split"):
        random_subset(STEMS, 3, 0, classes, num_classes=3)
    with pytest.raises(DataError, match="class 2 appears in no image"):
        diverse_subset(STEMS, np.zeros((10, 2)), 3, 0, classes, num_classes=3)
    split = {"a": frozenset({0, 1}), "b": frozenset({0, 2})}  # every class present, but never in one image
    with pytest.raises(DataError, match="none of 1000 random draws of k=1"):
        random_subset(["a", "b"], 1, 0, split, num_classes=3)
    with pytest.raises(DataError, match="none of 1000 random draws of k=1"):
        diverse_subset(["a", "b"], np.array([[0.0], [1.0]]), 1, 0, split, num_classes=3)
    x = np.array([[0.0], [1.0], [2.0], [3.0]])  # the pool covers, but k = 1 picks cannot
    with pytest.raises(DataError, match=r"cannot cover classes \[2\]"):
        diverse_subset(["a", "b", "c", "d"], x, 1, 0, {**split, "c": frozenset({0}), "d": frozenset({0})}, 3)
    with pytest.raises(DataError, match=r"typical picks cannot cover classes \[2\]"):
        typical_subset(["a", "b", "c", "d"], x, 1, 0, {**split, "c": frozenset({0}), "d": frozenset({0})}, 3)


def test_k_center_greedy_spreads_over_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = [6, 3, 2]
    x = np.concatenate([c + 0.1 * rng.standard_normal((n, 2)) for c, n in zip(centers, sizes)])
    cluster = np.repeat([0, 1, 2], sizes)
    picks = k_center_greedy(x, 3)
    assert sorted(cluster[picks]) == [0, 1, 2]
    assert picks[0] == int(np.argmin(np.linalg.norm(x - x.mean(0), axis=1)))  # first: closest to the mean
    assert k_center_greedy(x, 3) == picks  # deterministic
    # class coverage: class 2 only in one image of the big cluster → the last pick must take it
    classes = [frozenset({0, 1})] * len(x)
    classes[4] = frozenset({0, 2})
    constrained = k_center_greedy(x, 3, classes, num_classes=3)
    assert 4 in constrained and constrained[:2] == picks[:2]


def test_diverse_features_of_a_pretrained_unet(files, tmp_path, tiny_run_config):
    from labeldiff.pretrain.run import run_pretrain

    cfg = tiny_run_config(files / "data", steps=2)
    run_pretrain(cfg, tmp_path / "pre")
    ds = LabeledFolder(files / "data")
    train = ds.stems("train")
    feats = unet_features(tmp_path / "pre", ds.samples(train), cfg.data)
    assert feats.shape[0] == 4 and feats.ndim == 2 and np.isfinite(feats).all()
    pix = pixel_features(ds, train, cfg.data)
    assert pix.shape == (4, 3 * 16 * 16)
    assert diverse_subset(train, feats, 2, 0) == diverse_subset(train, feats, 2, 0)


@pytest.mark.slow
def test_select_command_picks_distinct_images_to_label(files, tmp_path, tiny_run_config, capsys):
    """`labeldiff select`: k images of a plain folder, never two copies of one image (k-center greedy
    puts the second pick as far from the first as it can), the same pick for the same seed, and
    clear errors for a k the folder cannot give and for a run that is not a pretraining run; a dataset
    root's test split is never picked."""
    from PIL import Image

    from labeldiff.cli import main
    from labeldiff.pretrain.run import run_pretrain

    run_pretrain(tiny_run_config(files / "data", steps=2), tmp_path / "pre")
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # 4 different images, each twice under two names
        img = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
        img.save(folder / f"img{i}_a.png")
        img.save(folder / f"img{i}_b.png")
    picks = {}
    for seed in range(10):
        out = tmp_path / f"picks{seed}.txt"
        assert main(["select", "--pretrained", str(tmp_path / "pre"), "--data", str(folder), "--labels", "2",
                     "--rule", "diverse", "--seed", str(seed), "--out", str(out)]) == 0
        lines = [line.split("\t") for line in out.read_text().splitlines()]
        assert len(lines) == 2 and all(Path(f).is_file() and Path(f).stem == stem for stem, f in lines)
        picks[seed] = sorted(stem for stem, _ in lines)
        assert picks[seed][0].split("_")[0] != picks[seed][1].split("_")[0], picks[seed]  # not two copies
        said = capsys.readouterr()
        assert "select: features of image 1 took" in said.out + said.err and "for the 8 candidates" in said.out + said.err
    assert len({tuple(p) for p in picks.values()}) > 1  # the seed chooses the random half
    # the default rule, typical: one typical image from each of 2 k-means clusters (copies share a cluster)
    assert main(["select", "--pretrained", str(tmp_path / "pre"), "--data", str(folder), "--labels", "2",
                 "--out", str(tmp_path / "typical.txt")]) == 0
    typical = [line.split("\t")[0] for line in (tmp_path / "typical.txt").read_text().splitlines()]
    assert len(typical) == 2 and typical[0].split("_")[0] != typical[1].split("_")[0], typical
    assert "(typical on the decoder features of" in capsys.readouterr().out
    assert main(["select", "--pretrained", str(tmp_path / "pre"), "--data", str(folder), "--labels", "2", "--seed",
                 "3", "--rule", "diverse", "--out", str(tmp_path / "again.txt")]) == 0
    assert sorted(line.split("\t")[0] for line in (tmp_path / "again.txt").read_text().splitlines()) == picks[3]
    capsys.readouterr()
    assert main(["select", "--pretrained", str(tmp_path / "pre"), "--data", str(folder), "--labels", "9"]) == 2
    assert "has 8 images; choose k from 1 to 8" in capsys.readouterr().err
    assert main(["select", "--pretrained", str(folder), "--data", str(folder), "--labels", "2"]) == 2
    assert "no config.json there" in capsys.readouterr().err
    # a dataset root: its test split (img_04, img_05) is scored later, so it is never a pick
    assert main(["select", "--pretrained", str(tmp_path / "pre"), "--data", str(files / "data"), "--labels", "4",
                 "--out", str(tmp_path / "root.txt")]) == 0
    picked = sorted(line.split("\t")[0] for line in (tmp_path / "root.txt").read_text().splitlines())
    assert picked == ["img_00", "img_01", "img_02", "img_03"]
    assert "candidates: 4 images; the 2 images of split 'test' are left out" in capsys.readouterr().out
    assert main(["select", "--pretrained", str(tmp_path / "pre"), "--data", str(files / "data"), "--labels", "5"]) == 2
    assert "has 4 images; choose k from 1 to 4" in capsys.readouterr().err


def test_diverse_subset_depends_on_the_seed_and_stays_diverse():
    """Seeds draw different candidate pools, so diverse subsets vary with the seed; within a pool the
    picks still span the clusters (two tight clusters: each k = 2 pick has one image of each)."""
    rng = np.random.default_rng(0)
    stems = [f"s{i:02d}" for i in range(20)]
    x = np.concatenate([rng.normal(0, 0.1, (10, 2)), rng.normal(10, 0.1, (10, 2))])
    subsets = {tuple(diverse_subset(stems, x, 2, seed)) for seed in range(8)}
    assert len(subsets) > 1
    for sub in subsets:
        assert sorted(int(s[1:]) >= 10 for s in sub) == [False, True]
    assert diverse_subset(stems, x, 2, 3) == diverse_subset(stems, x, 2, 3)
    # with class coverage, the pool itself must cover every class: s05 is the only class-2 image
    classes = {s: frozenset({0, 1}) for s in stems}
    classes["s05"] = frozenset({0, 2})
    for seed in range(5):
        assert "s05" in diverse_subset(stems, x, 2, seed, classes, num_classes=3)



def _two_clusters_and_an_outlier(rng):
    """A: 30 points at (0, 0); B: 20 points at (10, 0); one outlier at (5, 20) (index 50)."""
    return np.concatenate([rng.normal(0, 0.5, (30, 2)), rng.normal((10, 0), 0.5, (20, 2)), [[5.0, 20.0]]])


def test_typical_picks_skip_the_outlier_that_k_center_greedy_takes():
    """TypiClust picks one typical image per k-means cluster; k-center greedy's second pick is the
    farthest point, here the outlier."""
    x = _two_clusters_and_an_outlier(np.random.default_rng(0))
    assert 50 in k_center_greedy(x, 2)
    picks = typical_picks(x, 2, seed=0)
    assert 50 not in picks and sorted(i >= 30 for i in picks) == [False, True]  # one of A, one of B
    a = next(i for i in picks if i < 30)  # the A pick is A's densest point: its 15 nearest A-mates are closest
    assert a == int(np.argmax(typicality(x[:30], 15)))
    assert typical_picks(x, 2, seed=0) == picks  # deterministic for a seed
    # k = 1: the most typical image of the whole pool, which lies in the bigger cluster A
    assert typical_picks(x, 1, seed=0)[0] < 30
    # a cluster of fewer than MIN_CLUSTER_SIZE images is passed over while bigger ones remain: with an
    # outlier far away, k = 3 makes it a cluster of its own, and the third pick goes to the biggest cluster
    far = np.concatenate([x[:50], [[200.0, 200.0]]])
    three = typical_picks(far, 3, seed=0)
    assert 50 not in three and sum(i < 30 for i in three) == 2 and sum(30 <= i < 50 for i in three) == 1
    # class coverage: class 2 only in one image of B → the picks must include it
    classes = [frozenset({0, 1})] * len(x)
    classes[40] = frozenset({0, 2})
    assert 40 in typical_picks(x, 2, 0, classes, num_classes=3)
    with pytest.raises(DataError, match="must be between 1 and the 51 train images"):
        typical_picks(x, 52, 0)


def test_typicality_is_higher_where_neighbours_are_close():
    x = np.array([[0.0], [0.1], [0.2], [5.0]])
    t = typicality(x, 2)
    assert t.argmax() == 1 and t.argmin() == 3
    assert math.isclose(t[1], 1 / (0.1 + 1e-5), rel_tol=1e-6)  # both nearest mates 0.1 away
    assert typicality(np.zeros((1, 3)), 20).tolist() == [1.0]


def test_typical_subset_depends_on_the_seed_and_covers_classes():
    rng = np.random.default_rng(1)
    stems = [f"s{i:02d}" for i in range(51)]
    x = _two_clusters_and_an_outlier(rng)
    subsets = {tuple(typical_subset(stems, x, 2, seed)) for seed in range(8)}
    assert len(subsets) > 1  # the seed draws the candidate half
    assert all("s50" not in sub for sub in subsets)
    classes = {s: frozenset({0, 1}) for s in stems}
    classes["s05"] = frozenset({0, 2})
    for seed in range(4):
        assert "s05" in typical_subset(stems, x, 2, seed, classes, num_classes=3)

# --- aggregation on hand-written rows -------------------------------------------------------------------------

def _row(method, strategy, k, seed, dice, stems="a", select="random", arch="A"):
    return {"cell": f"{method}-{strategy}-{k}-{seed}", "method": method, "pretrain_steps": None, "arch": arch,
            "strategy": strategy, "k": k, "seed": seed, "select": select, "stems": stems, "dice": dice,
            "iou": dice / 2, "dice_0": 1.0, "dice_1": dice, "seconds": 1.0}


HAND_ROWS = [
    *[_row("ddpm", "full", 1, s, d, stems=f"x{s}") for s, d in enumerate([0.6, 0.7, 0.8])],
    *[_row("none", "scratch", 1, s, d, stems=f"x{s}") for s, d in enumerate([0.5, 0.5, 0.5])],
    *[_row("ddpm", "full", 3, s, d) for s, d in enumerate([0.9])],
    *[_row("none", "scratch", 3, s, d) for s, d in enumerate([0.95])],
]


def test_results_table_mean_std_n_and_bold_best():
    table = report.results_table(HAND_ROWS, "dice")
    lines = table.strip().splitlines()
    assert lines[0] == "| method | strategy | k = 1 | k = 3 |"
    # ddpm: mean 0.7, sample std 0.1 over 3 seeds, best at k = 1; at k = 3 only one seed and scratch is best
    assert lines[2] == "| ddpm | full | **0.700 ± 0.100 (3)** | 0.900 (1) |"
    assert lines[3] == "| none | scratch | 0.500 ± 0.000 (3) | **0.950 (1)** |"
    stats = summarize(HAND_ROWS)
    mean, std, n = stats[("ddpm", "full", "default", "random")][1]
    assert (round(mean, 9), round(std, 9), n) == (0.7, 0.1, 3)
    md = report.per_class_markdown(HAND_ROWS)
    assert "| ddpm | full | 1.000 ± 0.000 (3) | 0.700 ± 0.100 (3) |" in md


def test_results_table_select_axis_and_missing_entries():
    rows = [_row("ddpm", "full", 1, 0, 0.4), _row("ddpm", "full", 1, 0, 0.6, select="diverse"),
            _row("ddpm", "full", 2, 0, 0.5, select="diverse")]
    table = report.results_table(rows, "dice")
    assert "| ddpm | full | random | 0.400 (1) | – |" in table
    assert "| ddpm | full | diverse | **0.600 (1)** | **0.500 (1)** |" in table


def test_paired_ci_against_hand_calculation():
    pairs = paired_differences(HAND_ROWS)
    by_k = {p["k"]: p for p in pairs}
    # k = 1: differences 0.1, 0.2, 0.3 → mean 0.2, sd 0.1, t(0.975, 2) = 4.302653 → half width 0.248414
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert by_k[1]["n"] == 3 and math.isclose(by_k[1]["mean"], 0.2)
    assert math.isclose(by_k[1]["low"], 0.2 - half, rel_tol=1e-6)
    assert math.isclose(by_k[1]["high"], 0.2 + half, rel_tol=1e-6)
    assert by_k[3]["n"] == 1 and math.isclose(by_k[3]["mean"], -0.05) and math.isnan(by_k[3]["low"])
    md = report.paired_markdown(HAND_ROWS)
    assert "| ddpm | full | default | random | 1 | +0.200 | [-0.048, +0.448] | no | 3 | 0 |" in md
    assert "| ddpm | full | default | random | 3 | -0.050 | n/a | n/a | 1 | 0 |" in md
    # a different subset (diverse picks per network) is not a pair; another architecture has no baseline
    rows = HAND_ROWS + [_row("ddpm", "full", 3, 0, 0.9, stems="other", select="random", arch="B")]
    rows[6] = dict(rows[6], stems="zzz")
    p3 = {p["k"]: p for p in paired_differences(rows)}[3]
    assert (p3["n"], p3["unpaired"]) == (0, 1)


def test_two_studies_pair_cell_by_cell_by_hand():
    """A − B pairs method, strategy, k and seed with the same labeled images; scratch cells copied into both
    are one cell (Δ = 0 by construction) and are named, not tabled; a seed whose images differ is unpaired."""
    scratch = [_row("none", "scratch", 4, s, 0.5, stems=f"x{s}") for s in range(3)]
    a = scratch + [_row("ddpm", "full", 4, s, d, stems=f"x{s}") for s, d in enumerate([0.7, 0.8, 0.9])]
    b = scratch + [dict(_row("ddpm", "full", 4, s, d, stems=f"x{s}"), cell=f"b{s}")
                   for s, d in enumerate([0.6, 0.6, 0.7, 0.9])]
    b[4] = dict(b[4], stems="other")  # seed 1 labeled other images in B
    by = {p["strategy"]: p for p in study_differences(a, b)}
    # seeds 0 and 2: 0.7 − 0.6, 0.9 − 0.7 → mean 0.15, sd 0.0707107, t(0.975, 1) = 12.706205
    half = 12.706204736174707 * math.sqrt(0.005) / math.sqrt(2)
    full = by["full"]
    assert (full["n"], full["unpaired"], full["shared"]) == (2, 1, 0)
    assert math.isclose(full["mean"], 0.15) and math.isclose(full["high"], 0.15 + half, rel_tol=1e-6)
    assert math.isclose(full["a"], 0.8) and math.isclose(full["b"], 0.65)
    assert (by["scratch"]["n"], by["scratch"]["shared"]) == (3, 3)
    md = report.compare_markdown(a, b, ("videos", "random"))
    assert "| method | strategy | protocol | select | k | videos | random | mean Δ |" in md
    assert f"| ddpm | full | default | random | 4 | 0.800 | 0.650 | +0.150 | [{0.15 - half:+.3f}, {0.15 + half:+.3f}] | " \
           f"no | 2 | 1 |" in md
    assert "| none | scratch |" not in md and "none / scratch / k = 4 (3 cells)" in md
    assert "unpaired: the seed is in both" in md
    b_other = [dict(r, stems="other") for r in b]  # no seed with the same images: no means either
    assert "| ddpm | full | default | random | 4 | – | – | – | n/a | n/a | 0 | 3 |" in \
        report.compare_markdown(a, b_other, ("a", "b"))
    assert "no pairs" in report.compare_markdown(a, [_row("mae", "full", 4, 0, 0.5)], ("a", "b"))
    # a cell with no finite score pairs with nothing (the means are over the scored pairs); a cell of the same key
    # scored differently (rerun, not copied) is a real pair; a row can mix shared and unshared pairs
    a2 = [dict(a[3], dice="nan"), a[4], dict(a[0], dice=0.55), *a[1:3]]
    by2 = {p["strategy"]: p for p in study_differences(a2, b)}
    assert (by2["full"]["n"], by2["full"]["unscored"], by2["full"]["unpaired"]) == (0, 1, 1)
    assert math.isnan(by2["full"]["a"]) and (by2["scratch"]["n"], by2["scratch"]["shared"]) == (3, 2)
    md2 = report.compare_markdown(a2, b, ("a", "b"))
    assert "| none | scratch | default | random | 4 | 0.517 | 0.500 | +0.017 |" in md2
    assert "Some rows pair a shared cell with itself" in md2 and "1 pair(s) left out because a cell has no" in md2


def test_protocols_pair_within_their_own_protocol_and_verdict_by_hand():
    """Scratch of protocol p is the pair of a pretrained cell of protocol p only; the verdict names the
    best pretrained setting per k with its CI, and diverse − random is paired by seed."""
    def rows_of(protocol, gains, base=0.5, select="random", shift=0.0):
        out = []
        for seed, g in enumerate(gains):
            stems = f"{select}{seed}"
            for r in (_row("ddpm", "full", 2, seed, base + shift + g, stems=stems, select=select),
                      _row("none", "scratch", 2, seed, base + shift, stems=stems, select=select)):
                out.append(dict(r, protocol=protocol))
        return out

    rows = (rows_of("none", [0.01, 0.02, 0.03]) + rows_of("strong", [0.10, 0.12, 0.14], base=0.6)
            + rows_of("strong", [0.10, 0.13, 0.16], base=0.6, select="diverse", shift=0.05)
            + rows_of("strong", [0.10, 0.12, 0.14], base=0.6, select="typical", shift=-0.02))
    pairs = {(p["protocol"], p["select"]): p for p in paired_differences(rows)}
    assert math.isclose(pairs[("none", "random")]["mean"], 0.02)
    assert math.isclose(pairs[("strong", "random")]["mean"], 0.12)
    assert pairs[("strong", "random")]["low"] > 0 and pairs[("none", "random")]["n"] == 3
    sel = {(p["strategy"], p["protocol"]): p for p in axis_differences(rows, "select", "random")
           if p["select"] == "diverse"}
    # diverse − random for ddpm/full/strong: (0.75−0.70, 0.78−0.72, 0.81−0.74) → mean 0.06
    assert math.isclose(sel[("full", "strong")]["mean"], 0.06) and sel[("full", "strong")]["n"] == 3
    assert math.isclose(sel[("scratch", "strong")]["mean"], 0.05)
    verdict = verdict_markdown(rows, "hand")
    line = next(l for l in verdict.splitlines() if l.startswith("| 2 |"))
    cols = [c.strip() for c in line.strip("|").split("|")]
    assert cols[1] == "ddpm / full / strong" and cols[2] == "0.720" and cols[3] == "0.600"
    assert cols[4] == "+0.120" and cols[6] == "yes (+)" and cols[7] == "met"
    assert cols[8].startswith("diverse: +0.060") and cols[9].startswith("diverse: +0.050")
    assert "; typical: -0.020" in cols[8] and "; typical: -0.020" in cols[9]
    # gains 0.10, 0.12, 0.14: sd 0.02; n = 4 is the first with (t₀.₉₇₅,₃ + t₀.₈,₃)·0.02/√4 = 0.042 ≤ 0.05 (n = 3: 0.062)
    assert cols[10] == "4"
    table = report.results_table(rows, "dice")
    assert table.splitlines()[0] == "| method | strategy | protocol | select | k = 2 |"
    # a study of diverse cells only names its selection in the verdict
    only = [r for r in rows if r["select"] == "diverse"]  # (typical's best is lower)
    line = next(l for l in verdict_markdown(only, "hand").splitlines() if l.startswith("| 2 |"))
    cols = [c.strip() for c in line.strip("|").split("|")]
    assert cols[1] == "ddpm / full / strong / diverse" and cols[2] == "0.780" and cols[4] == "+0.130"


def test_length_differences_pair_each_length_with_the_shortest_of_its_run():
    """ddpm@10000 − ddpm@2000 by seed and subset; a run with one length, scratch and a cell on another subset
    give no length pair."""
    rows = []
    for seed, (short, long) in enumerate([(0.60, 0.70), (0.62, 0.66), (0.64, 0.74)]):
        rows += [_row("ddpm@2000", "full", 4, seed, short, stems=f"s{seed}"),
                 _row("ddpm@10000", "full", 4, seed, long, stems=f"s{seed}"),
                 _row("mae@2000", "full", 4, seed, 0.5, stems=f"s{seed}"),
                 _row("none", "scratch", 4, seed, 0.55, stems=f"s{seed}")]
    rows.append(_row("ddpm@10000", "full", 4, 3, 0.9, stems="other"))
    rows.append(_row("ddpm@2000", "full", 4, 3, 0.1, stems="s3"))
    (d,) = length_differences(rows)
    # differences 0.10, 0.04, 0.10 (seed 3 trained on another subset): mean 0.08, sd 0.034641, t(0.975, 2) = 4.302653
    half = 4.302652729911275 * 0.034641016 / math.sqrt(3)
    assert (d["method"], d["base"], d["strategy"], d["k"], d["n"]) == ("ddpm@10000", "ddpm@2000", "full", 4, 3)
    assert math.isclose(d["mean"], 0.08) and math.isclose(d["high"], 0.08 + half, rel_tol=1e-6)
    md = report.paired_markdown(rows)
    assert "each pretraining length − the shortest of its run" in md
    assert "| ddpm@10000 | full | default | random | 4 | +0.080 |" in md
    assert "each pretraining length" not in report.paired_markdown(HAND_ROWS)


def test_pairs_for_power_matches_the_paired_t_test():
    """Seeds for 80 % power, two-sided 5 %: the exact power of the paired t-test (noncentral t, checked
    with scipy.stats.nct) first reaches 0.8 at 10 pairs for effect = sd (0.748 at 9) and at 34 for
    effect = sd / 2 (0.795 at 33); the t approximation gives the same counts."""
    assert pairs_for_power(0.04, 0.04) == 10
    assert pairs_for_power(0.10, 0.05) == 34
    assert pairs_for_power(0.0, 0.05) == 2 and pairs_for_power(1.0, 0.01) is None
    # the smallest such n: one pair fewer is not enough
    for sd, effect in [(0.04, 0.04), (0.10, 0.05), (0.03, 0.05), (0.2, 0.05)]:
        n = pairs_for_power(sd, effect)
        gap = [(t_quantile(0.95, m - 1) + t_quantile(0.6, m - 1)) * sd / math.sqrt(m) - effect
               for m in (n - 1, n)]
        assert gap[0] > 0 >= gap[1] or n == 2
    # paired_ci reports the sample std of the finite differences
    d = [0.04, -0.02, 0.04, -0.02, math.nan]
    assert math.isclose(paired_ci(d)[4], float(np.std([0.04, -0.02, 0.04, -0.02], ddof=1)))


def test_t_quantile_matches_tables():
    for df, t in [(1, 12.7062), (2, 4.3027), (3, 3.1824), (5, 2.5706), (10, 2.2281), (30, 2.0423), (100, 1.9840)]:
        assert abs(t_quantile(0.95, df) - t) < 1e-4


def test_a_known_interval_is_scipys():
    """The CI of a paired difference is scipy's t interval. brain_none's primary comparison at k = 2 (DDPM@2000
    full − scratch, seeds 640–649, its results.csv's Dice) is reported as +0.055 [+0.002, +0.108]; the same
    interval comes from ``scipy.stats.t.interval``, at 95 % and at a second look's Bonferroni level."""
    from scipy import stats as sps

    ddpm = [0.782424, 0.815341, 0.841501, 0.801743, 0.837481, 0.824665, 0.815236, 0.803, 0.793242, 0.818691]
    scratch = [0.543288, 0.80538, 0.816054, 0.763917, 0.820875, 0.749395, 0.776021, 0.838897, 0.701711, 0.766903]
    rows = [{"method": m, "strategy": st, "arch": "unet", "k": 2, "seed": 640 + i, "stems": f"s{i}", "dice": v}
            for m, st, values in (("ddpm@2000", "full", ddpm), ("none", "scratch", scratch))
            for i, v in enumerate(values)]
    (pair,) = paired_differences(rows)
    assert (f"{pair['mean']:+.3f}", f"{pair['low']:+.3f}", f"{pair['high']:+.3f}") == ("+0.055", "+0.002", "+0.108")
    d = np.array(ddpm) - np.array(scratch)
    for level in (0.95, 0.975):
        mean, low, high, n, sd = paired_ci(list(d), level)
        want = sps.t.interval(level, len(d) - 1, loc=d.mean(), scale=d.std(ddof=1) / math.sqrt(len(d)))
        assert n == 10 and math.isclose(sd, d.std(ddof=1)) and math.isclose(mean, d.mean())
        assert np.allclose((low, high), want, rtol=0, atol=1e-12)


def test_csv_round_trip(tmp_path):
    report.write_csv(HAND_ROWS, tmp_path / "r.csv")
    back = report.read_csv(tmp_path / "r.csv")
    assert list(back[0])[:len(report.LEAD)] == report.LEAD and "dice_1" in back[0] and list(back[0])[-1] == "seconds"
    assert report.results_table(back) == report.results_table(HAND_ROWS)


def test_results_csv_is_never_left_half_written(tmp_path, monkeypatch):
    """A study killed while it rewrites results.csv keeps the previous complete file (written whole to a
    temporary name, then renamed)."""
    path = tmp_path / "results.csv"
    report.write_csv(HAND_ROWS, path)
    before = path.read_text()
    import csv

    real = csv.DictWriter.writerow
    calls = []

    def dying(self, row):
        calls.append(row)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed in the middle of the rows
        return real(self, row)

    monkeypatch.setattr(csv.DictWriter, "writerow", dying)
    with pytest.raises(KeyboardInterrupt):
        report.write_csv(HAND_ROWS + HAND_ROWS, path)
    assert path.read_text() == before and len(report.read_csv(path)) == len(HAND_ROWS)


# --- YAML validation ------------------------------------------------------------------------------------------

BAD = [
    (dict(lables=[1]), r"unknown key 'lables' \(did you mean 'labels'\?\)"),
    (dict(strategies=["full", "fine"]), "strategies: 'fine' is not one of probe, linear, decoder, full, lp-ft, scratch"),
    (dict(labels=[0]), r"labels: 0 is not an integer ≥ 1 or \"all\""),
    (dict(protocols=[{"name": "a"}, {"name": "a"}]), "protocols: the name 'a' is used twice"),
    (dict(protocols=[{"name": "s", "overrides": {"transfer.augmnt": "strong"}}]),
     r"protocols\[0\] \(s\).overrides: 'transfer.augmnt': transfer has no field 'augmnt' \(did you mean transfer.augment\?\)"),
    (dict(protocols=[{"name": "a/b"}]), r"protocols\[0\]: name 'a/b': use letters"),
    (dict(protocols=[{"name": "s", "overrides": {"transfer.augment": "heavy"}}]),
     r"--augment 'heavy' is not one of auto, none, light, strong"),
    (dict(labels=[]), "labels: missing"),
    (dict(select="best"), "select: 'best' is not one of random, diverse"),
    (dict(methods=[{"name": "ddpm", "recipe": "pre.yaml", "overrides": {"train.stepz": 3}}]),
     r"'train.stepz': train has no field 'stepz' \(did you mean train.steps\?\)"),
    (dict(methods=[{"name": "ddpm", "recipe": "pre.yaml", "overrides": {"steps": 3}}]), "is not 'section.field'"),
    (dict(methods=[{"name": "ddpm", "recipe": "nope.yaml"}]), "methods\\[0\\] \\(ddpm\\).recipe: nope.yaml does not exist"),
    (dict(methods=[{"name": "ddpm"}]), "needs a recipe"),
    (dict(methods=[{"name": "a", "recipe": "pre.yaml"}, {"name": "a", "recipe": "pre.yaml"}]), "used twice"),
    (dict(methods=["none"], strategies=["full"]), "method none has no pretraining, so it only runs with strategy scratch"),
    (dict(methods=[{"name": "hyb", "recipe": "pre.yaml", "overrides": {"corruption.method": "hybrid"}}]),
     "name a labeled source dataset in data.source"),
    (dict(data={"path": "missing_dir"}), "data.path: missing_dir does not exist"),
    (dict(data={"path": "data", "sise": 16}), "unknown key 'sise' \\(did you mean 'size'\\?\\)"),
    (dict(data={"size": 16}), "data.path: missing"),
    (dict(require_all_classes="yes"), "require_all_classes: expected true or false"),
    (dict(methods=[{"name": "ddpm", "recipe": "pre.yaml", "pretrain_steps": [2, 3], "finetune_at": [4]}]),
     r"methods\[0\] \(ddpm\).finetune_at: \[4\] must be lengths listed in pretrain_steps \(\[2, 3\]\)"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m[:30] for _, m in BAD])
def test_yaml_validation_errors(files, change, message):
    with pytest.raises(StudyError, match=message):
        parse_study(base_study(**change), files / "study.yaml")


def test_paths_relative_to_the_yaml_then_the_cwd(files, tmp_path, monkeypatch):
    sub = tmp_path / "studies"
    sub.mkdir()
    path = write_study(sub, base_study(data={"path": str(files / "data")}, finetune={"recipe": "ft.yaml"},
                                       methods=[{"name": "ddpm", "recipe": "pre.yaml"}]))
    monkeypatch.chdir(files)  # pre.yaml and ft.yaml are not next to the YAML: found in the current directory
    s = load_study(path)
    assert s.methods[0].recipe.path == files / "pre.yaml" and s.finetune.path == files / "ft.yaml"
    (sub / "pre.yaml").write_text(yaml.safe_dump(TINY_PRETRAIN))  # the YAML's folder wins
    assert load_study(path).methods[0].recipe.path == sub / "pre.yaml"


@pytest.mark.parametrize("name", examples.names())
def test_example_studies_load_by_name_from_any_folder(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    s = load_study(name)
    assert s.file == examples.FOLDER / f"{name}.yaml" and s.prepare == "brain-demo"
    assert s.methods[0].recipe.path == labeldiff.recipes.FOLDER / "ddpm-cpu.yaml"  # recipes by name
    assert load_study(examples.FOLDER / f"{name}.yaml").file == s.file  # or by path


def test_an_unknown_study_name_lists_the_examples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StudyError, match=r"study 'quik' is not a shipped name; shipped: brain, demo, quick"):
        load_study("quik")
    with pytest.raises(StudyError, match=r"study mine.yaml does not exist \(looked at "):
        load_study("mine.yaml")


@pytest.mark.parametrize("name", sorted(p.stem for p in RESEARCH.glob("*.yaml")))
def test_research_studies_parse(name, monkeypatch, tmp_path):
    # their paths are relative to their own folder: ../../../shared/datasets is the checkout's sibling. Copied
    # into a checkout-like folder whose ../shared is the benchmark data conftest found, they parse from any
    # directory, also in a clone with no ../shared beside it
    (tmp_path / "shared").symlink_to(DATASETS.parent, target_is_directory=True)
    # not studies/runs/: a local study's run folders (gigabytes) are no part of its file
    shutil.copytree(RESEARCH, tmp_path / "repo" / "research" / "studies", ignore=shutil.ignore_patterns("runs"))
    shutil.copy(RESEARCH.parent / "primaries.yaml", tmp_path / "repo" / "research")  # a study's `family:` registry
    folder = tmp_path / "repo" / "research" / "studies"
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((folder / f"{name}.yaml").read_text())
    while "extends" in raw:  # the data block may come from the study this one extends
        raw = {**yaml.safe_load((folder / raw.pop("extends")).read_text()), **raw}
    data = (raw.get("data") or {})
    for key in ("path", "source"):
        if key in data and not (folder / data[key]).exists():
            pytest.skip(f"dataset {data[key]} not available")
    for m in raw.get("methods") or []:  # a study that reuses a local run folder: runs/ is not copied
        if isinstance(m, dict) and m.get("run") and not (folder / m["run"]).exists():
            pytest.skip(f"its pretraining run {m['run']} is a local folder, not part of the study file")
    s = load_study(folder / f"{name}.yaml")
    assert s.methods and s.strategies and s.labels


def test_extends_takes_the_parent_and_replaces_whole_keys(files):
    parent = write_study(files, base_study(data={"path": "data", "size": 16, "channels": 3, "mode": "crop"},
                                           seeds=[0, 1]), name="parent.yaml")
    child = write_study(files, {"extends": parent.name, "labels": [2], "data": {"path": "data", "size": 16,
                                                                               "channels": 3}}, name="child.yaml")
    s, p = load_study(child), load_study(parent)
    assert s.labels == [2] and p.labels == [1, 2]  # replaced
    assert s.seeds == [0, 1] and s.strategies == p.strategies and s.methods[0].recipe.path == files / "pre.yaml"
    assert s.data.options.get("mode") is None and p.data.options["mode"] == "crop"  # data replaced whole, not merged
    assert s.extends == parent and s.looks == [[0, 1]]  # more than seeds changed: a new study, one look
    assert "extends" not in s.merged and s.merged["labels"] == [2] and s.merged["seeds"] == [0, 1]


def test_extends_with_only_more_seeds_is_another_look(files):
    first = write_study(files, base_study(seeds=[0, 1]), name="look1.yaml")
    second = write_study(files, {"extends": "look1.yaml", "seeds": [0, 1, 2, 3]}, name="look2.yaml")
    third = write_study(files, {"extends": "look2.yaml", "seeds": [0, 1, 2, 3, 4]}, name="look3.yaml")
    assert load_study(first).looks == [[0, 1]]
    assert load_study(second).looks == [[0, 1], [2, 3]]
    assert load_study(third).looks == [[0, 1], [2, 3], [4]]
    other = write_study(files, {"extends": "look1.yaml", "seeds": [5, 6]}, name="fresh.yaml")
    assert load_study(other).looks == [[5, 6]]  # fresh seeds only: a replication, not a second look
    changed = write_study(files, {"extends": "look1.yaml", "seeds": [0, 1, 2], "labels": [2]}, name="changed.yaml")
    assert load_study(changed).looks == [[0, 1, 2]]  # another k: a different comparison, one look


def test_extends_errors(files):
    write_study(files, {"extends": "loop_b.yaml", "seeds": [1]}, name="loop_a.yaml")
    write_study(files, {"extends": "loop_a.yaml", "seeds": [2]}, name="loop_b.yaml")
    with pytest.raises(StudyError, match=r"extend each other in a loop \(loop_a.yaml → loop_b.yaml → loop_a.yaml\)"):
        load_study(files / "loop_a.yaml")
    write_study(files, {"extends": "nowhere.yaml"}, name="orphan.yaml")
    with pytest.raises(StudyError, match="extends: nowhere.yaml does not exist"):
        load_study(files / "orphan.yaml")
    write_study(files, {"extend": "look1.yaml"}, name="typo.yaml")
    with pytest.raises(StudyError, match=r"unknown key 'extend' \(did you mean 'extends'\?\)"):
        load_study(files / "typo.yaml")


def test_verdict_of_a_second_look_judges_the_goal_on_the_split_alpha():
    """Seeds 0–2 gain 0.06, 0.08, 0.10 and seeds 3–5 gain 0.05, 0.07, 0.09: over all six, mean 0.075 and
    sd 0.0187; the 95 % CI is 0.075 ± 2.571·0.0187/√6 = [0.055, 0.095] and the 97.5 % one (two looks)
    0.075 ± 3.163·0.0187/√6 = [0.051, 0.099], both above 0: met. A gain at the edge is not: with the
    same spread around 0.02, the 95 % CI [0.000, 0.040] shifted by 0.0004 clears 0, the 97.5 % one does not."""
    def rows_of(gains, base=0.5):
        out = []
        for seed, g in enumerate(gains):
            out += [_row("ddpm", "full", 2, seed, base + g, stems=f"s{seed}"), _row("none", "scratch", 2, seed, base,
                                                                                  stems=f"s{seed}")]
        return out

    def cols(verdict):
        line = next(l for l in verdict.splitlines() if l.startswith("| 2 |"))
        return [c.strip() for c in line.strip("|").split("|")]

    rows = rows_of([0.06, 0.08, 0.10, 0.05, 0.07, 0.09])
    one = verdict_markdown(rows, "one look")
    assert "look 2 of 2" not in one and len(cols(one)) == 11
    two = verdict_markdown(rows, "two looks", looks=[[0, 1, 2], [3, 4, 5]])
    c = cols(two)
    assert len(c) == 12 and c[5] == "[+0.055, +0.095]" and c[7] == "[+0.051, +0.099] (yes (+))" and c[8] == "met"
    assert "97.5 % CI (2 looks)" in two and "look 2 of 2" in two
    alone = [l for l in two.splitlines() if l.startswith("| 1 | 0–2 |") or l.startswith("| 2 | 3–5 |")]
    assert [l.split("|")[5].strip() for l in alone] == ["+0.080", "+0.070"]

    edge = rows_of([0.0204 + g - 0.075 for g in (0.06, 0.08, 0.10, 0.05, 0.07, 0.09)])
    c1, c2 = cols(verdict_markdown(edge, "e")), cols(verdict_markdown(edge, "e", goal=0.02,
                                                                                     looks=[[0, 1, 2], [3, 4, 5]]))
    assert c1[6] == "yes (+)" and c2[6] == "yes (+)" and c2[7].endswith("(no)") and c2[8].startswith("not met")


def test_verdict_of_a_second_look_gives_selection_its_split_alpha_too():
    """Typical − random for DDPM gains 0.06, 0.08, 0.10, 0.05, 0.07, 0.09 over seeds 0–5 (the numbers of the
    test above): 95 % CI [0.055, 0.095]; with two looks the selection column adds the 97.5 % CI [0.051, 0.099]."""
    rows = []
    for seed, g in enumerate([0.06, 0.08, 0.10, 0.05, 0.07, 0.09]):
        rows += [_row("ddpm", "full", 2, seed, 0.6, stems=f"r{seed}"),
                 _row("none", "scratch", 2, seed, 0.5, stems=f"r{seed}"),
                 _row("ddpm", "full", 2, seed, 0.6 + g, stems=f"t{seed}", select="typical"),
                 _row("none", "scratch", 2, seed, 0.5 + g / 2, stems=f"t{seed}", select="typical")]

    def selection(verdict):
        line = next(l for l in verdict.splitlines() if l.startswith("| 2 |"))
        return [c.strip() for c in line.strip("|").split("|")][-3]

    assert selection(verdict_markdown(rows, "one look")) == "typical: +0.075 [+0.055, +0.095] (yes (+))"
    two = verdict_markdown(rows, "two looks", looks=[[0, 1, 2], [3, 4, 5]])
    assert selection(two) == "typical: +0.075 [+0.055, +0.095] (yes (+), 97.5 %: [+0.051, +0.099] (yes (+)))"
    assert "each selection − random is given with its 97.5 % CI as well" in two
    alone = [l for l in two.splitlines() if "typical − random" in l]
    assert [l.split("|")[1].strip() + ":" + l.split("|")[6].strip() for l in alone] == \
        ["1:+0.080", "1:+0.040", "2:+0.070", "2:+0.035"]  # DDPM and scratch (which gains half), each look alone


def test_paired_plot_draws_every_pair_with_its_seed_differences(tmp_path):
    rows = []
    for seed, (g1, g4) in enumerate([(0.02, -0.01), (0.04, 0.01), (0.09, 0.03)]):
        for k, g in ((1, g1), (4, g4)):
            rows += [_row("ddpm", "full", k, seed, 0.5 + g, stems=f"{k}-{seed}"),
                     _row("none", "scratch", k, seed, 0.5, stems=f"{k}-{seed}")]
    drawn = plot_paired(rows, tmp_path / "paired.png", title="hand")
    assert [(p["k"], p["n"]) for p in drawn] == [(1, 3), (4, 3)]
    assert np.allclose(drawn[0]["diffs"], [0.02, 0.04, 0.09]) and np.allclose(drawn[1]["diffs"], [-0.01, 0.01, 0.03])
    assert math.isclose(drawn[0]["mean"], 0.05) and drawn[0]["low"] < 0.05 < drawn[0]["high"]
    assert (tmp_path / "paired.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scratch_only = [r for r in rows if r["strategy"] == "scratch"]
    assert plot_paired(scratch_only, tmp_path / "none.png") == [] and not (tmp_path / "none.png").exists()


def test_paired_plot_spans_the_whole_interval_and_marks_zero(tmp_path, monkeypatch):
    """The case of issue 41: seeds' differences within −0.01 … +0.06 but a 3-seed interval of about
    [−0.07, +0.11]. paired.png's x-axis must hold the whole interval (it crosses 0) and 0 itself; so must
    a pair whose dots all lie far from 0."""
    import labeldiff.study.plots as plots

    rows = []
    for seed, (g1, g2) in enumerate([(-0.01, 0.30), (0.06, 0.32), (0.01, 0.35)]):
        rows += [_row("ddpm", "full", 1, seed, 0.5 + g1, stems=f"1-{seed}"),
                 _row("none", "scratch", 1, seed, 0.5, stems=f"1-{seed}"),
                 _row("ddpm", "full", 8, seed, 0.4 + g2, stems=f"8-{seed}"),
                 _row("none", "scratch", 8, seed, 0.4, stems=f"8-{seed}")]
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, dpi, rect=None: figures.append(fig))
    drawn = plots.plot_paired(rows, tmp_path / "paired.png")
    wide = drawn[0]
    assert wide["low"] < -0.05 and wide["high"] > 0.09 and max(wide["diffs"]) < 0.07  # wider than its dots
    (ax,) = figures[0].axes
    lo, hi = ax.get_xlim()
    for p in drawn:
        assert lo < p["low"] and p["high"] < hi and lo < min(p["diffs"]) and max(p["diffs"]) < hi
    assert lo < 0 < hi and any(list(line.get_xdata()) == [0, 0] for line in ax.get_lines())  # 0 is drawn
    assert drawn[1]["low"] > 0.2  # the far pair: 0 still on the axis


@pytest.mark.slow
def test_a_study_that_extends_another_reuses_its_cells(files, tmp_path, monkeypatch):
    first = write_study(files, base_study(labels=[1], seeds=[0]), name="ext1.yaml")
    second = write_study(files, {"extends": "ext1.yaml", "seeds": [0, 1]}, name="ext2.yaml")
    out = tmp_path / "out"
    Calls(monkeypatch)
    runner.run_study(first, out)
    calls = Calls(monkeypatch)
    rows = runner.run_study(second, out)
    assert calls.pretrain == [] and len(calls.finetune) == 2 and all("-s1-" in c for c in calls.finetune)
    assert len(rows) == 4
    recorded = (out / "study.yaml").read_text()
    assert recorded.startswith("# ext2.yaml, which extends ext1.yaml")
    assert yaml.safe_load(recorded)["seeds"] == [0, 1] and yaml.safe_load(recorded)["labels"] == [1]
    assert "look 2 of 2" in (out / "verdict.md").read_text()


def test_split_block_writes_a_group_split(files, tmp_path):
    from labeldiff.study.prepare import prepare_data

    data = tmp_path / "grouped"
    shutil.copytree(files / "data", data)
    (data / "split.json").unlink()
    (data / "groups.json").write_text(json.dumps({f"img_{i:02d}": i // 2 for i in range(6)}))
    s = parse_study(base_study(data={"path": str(data), "split": {"groups": "groups.json", "test_fraction": 0.3}}),
                    files / "study.yaml")
    prepare_data(s, tmp_path / "out")
    split = json.loads((tmp_path / "out" / "data" / "split.json").read_text())
    assert s.data.split_file == tmp_path / "out" / "data" / "split.json"
    group = {f"img_{i:02d}": i // 2 for i in range(6)}
    assert {group[x] for x in split["train"]}.isdisjoint({group[x] for x in split["test"]})  # groups stay together
    assert len(split["train"]) + len(split["test"]) == 6


# --- end to end -----------------------------------------------------------------------------------------------

def _metrics(out: Path) -> list[Path]:
    return sorted(out.glob("cells/*/eval/metrics.json"))


def _dry_run_labels(capsys, path: Path, out: Path) -> dict[str, str]:
    """cell id → what ``--dry-run`` prints after "labels: "."""
    capsys.readouterr()
    runner.run_study(path, out, dry_run=True)
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("  done") or ln.startswith("  todo")]
    return {parts[1]: " ".join(parts[3:]) for parts in lines}


@pytest.mark.slow
def test_dry_run_shows_the_images_each_cell_will_label_and_then_did(files, tmp_path, capsys):
    path = write_study(files, base_study(labels=[2], seeds=[0, 1], select=["random", "diverse", "typical"]),
                       name="dry.yaml")
    out = tmp_path / "out"
    before = _dry_run_labels(capsys, path, out)
    assert len(before) == 12 and not (out / "cells").exists() and not (out / "pretrain").exists()  # nothing trained
    train = LabeledFolder(files / "data").stems("train")
    for cell, labels in before.items():
        if "-random-" in cell:  # the draw the cell will make, shown before it runs
            seed = int(cell.split("-s")[-1].split("-")[0])
            assert labels == ", ".join(random_subset(train, 2, seed)), cell
        else:  # the rule that will pick, named
            rule = "k-center greedy" if "-diverse-" in cell else "TypiClust"
            assert labels.startswith(f"picked when it runs ({rule} on"), (cell, labels)
    runner.run_study(path, out)
    after = _dry_run_labels(capsys, path, out)
    rows = {r["cell"]: r["stems"] for r in report.read_csv(out / "results.csv")}
    assert after.keys() == rows.keys() and all(after[c] == rows[c].replace(";", ", ") for c in rows)
    assert all(after[c] == before[c] for c in before if "-random-" in c)


@pytest.mark.slow
def test_interrupted_study_resumes_only_what_is_missing(files, tmp_path, monkeypatch):
    path = write_study(files, base_study(), name="resume.yaml")
    out = tmp_path / "out"
    calls = Calls(monkeypatch, interrupt_after=2)
    with pytest.raises(KeyboardInterrupt):
        runner.run_study(path, out)
    assert len(calls.pretrain) == 1 and len(calls.finetune) == 2 and len(_metrics(out)) == 2
    partial = [p for p in out.glob("cells/*") if not (p / "eval" / "metrics.json").exists()]
    assert len(partial) == 1 and (partial[0] / "run" / "half_written").exists()

    calls = Calls(monkeypatch)
    rows = runner.run_study(path, out)
    assert calls.pretrain == [] and len(calls.finetune) == 2  # exactly the 2 missing cells, no pretraining
    assert partial[0].name in calls.finetune and not (partial[0] / "run" / "half_written").exists()
    assert len(rows) == 4 and {(r["strategy"], r["k"]) for r in rows} == {(s, k) for s in ("full", "scratch")
                                                                           for k in (1, 2)}
    for name in ("results.csv", "results.md", "per_class.md", "paired.md", "dice_vs_labels.png", "paired.png",
                 "overlays.png", "environment.json", "plan.json"):
        assert (out / name).is_file(), name
    csv_rows = report.read_csv(out / "results.csv")
    assert len(csv_rows) == 4 and {"dice_0", "dice_1", "dice_2", "stems", "seconds"} <= set(csv_rows[0])
    assert {r["method"] for r in csv_rows} == {"ddpm@2", "none"}
    for r in csv_rows:  # the fine-tuning trained on exactly the chosen stems
        labeled = json.loads((out / "cells" / r["cell"] / "run" / "labeled.json").read_text())["stems"]
        assert ";".join(labeled) == r["stems"] and len(labeled) == int(r["k"])
    env = json.loads((out / "environment.json").read_text())
    assert env["cpu"]["count"] and env["packages"]["torch"] and set(env["seconds_per_cell"]) == {r["cell"] for r in rows}
    from labeldiff.study.prepare import code_state  # the code at the start of the run, and per cell
    assert env["git"] == code_state()
    assert all(json.loads((out / "cells" / r["cell"] / "cell.json").read_text())["git"] == code_state() for r in rows)

    victim = _metrics(out)[0]
    victim.unlink()
    calls = Calls(monkeypatch)
    runner.run_study(path, out)
    assert calls.finetune == [victim.parents[1].name] and calls.pretrain == []

    pre = next((out / "pretrain").iterdir())  # an interrupted pretraining: checkpoint, no weights
    (pre / "model.safetensors").unlink()
    calls = Calls(monkeypatch)
    runner.run_study(path, out)
    assert calls.pretrain == [(pre.name, True)] and calls.finetune == []


def test_data_prepared_inside_the_study_folder_shares_pretraining_across_folders(files, tmp_path):
    study = load_study(write_study(files, base_study(), name="shared.yaml"))
    keys = {}
    for name in ("a", "b"):  # what prepare: does — the same data written into each study's own folder
        out = tmp_path / name
        shutil.copytree(files / "data", out / "data" / "prepared")
        study.data.path = out / "data" / "prepared"
        run = plan_pretraining(study, tmp_path / "pre", out)[0]
        keys[name], keys[name + " by path"] = run.key, pretrain_key(run.cfg)
    assert keys["a"] == keys["b"]  # --pretrain-dir finds the run the other study trained
    assert keys["a by path"] != keys["b by path"]  # named by the absolute path, the two would differ
    study.data.path = files / "data"  # a dataset outside the study folder keeps its own name
    assert plan_pretraining(study, tmp_path / "pre", tmp_path / "a")[0].key not in keys.values()


@pytest.mark.slow
def test_editing_a_method_reruns_only_its_pretraining_and_cells(files, tmp_path, monkeypatch):
    methods = [{"name": "ddpm", "recipe": "pre.yaml"},
               {"name": "mdm", "recipe": "pre.yaml", "overrides": {"corruption.method": "mdm", "corruption.patch_size": 4}}]
    path = write_study(files, base_study(methods=methods, labels=[1]), name="edit.yaml")
    out = tmp_path / "out"
    calls = Calls(monkeypatch)
    runner.run_study(path, out)
    assert len(calls.pretrain) == 2 and len(calls.finetune) == 3  # ddpm full, mdm full, one scratch (same network)

    methods[1]["overrides"]["train.lr"] = 5e-4
    write_study(files, base_study(methods=methods, labels=[1]), name="edit.yaml")
    calls = Calls(monkeypatch)
    rows = runner.run_study(path, out)
    assert [name.split("-")[0] for name, _ in calls.pretrain] == ["mdm"]
    assert len(calls.finetune) == 1 and calls.finetune[0].startswith("mdm-full-k1-s0")
    assert len(rows) == 3  # the old mdm cell stays on disk but is not reported
    assert len(list((out / "cells").iterdir())) == 4


@pytest.mark.slow
def test_sweep_continues_shorter_runs_and_protocols_pair_every_cell(files, tmp_path, monkeypatch):
    """pretrain_steps [2, 3]: the 3-step run resumes the 2-step run's checkpoint; every protocol gets
    its own scratch; diverse subsets are shared by pretrained and scratch cells; verdict.md is written."""
    study = base_study(methods=[{"name": "ddpm", "recipe": "pre.yaml", "pretrain_steps": [3, 2]}],
                       strategies=["lp-ft", "scratch"], labels=[2], select=["random", "diverse", "typical"],
                       protocols=[{"name": "plain"},
                                  {"name": "strong", "overrides": {"transfer.augment": "strong", "transfer.flips": "hv",
                                                                   "transfer.lp_steps": 1}}])
    path = write_study(files, study, name="sweep.yaml")
    out = tmp_path / "out"
    calls = Calls(monkeypatch)
    rows = runner.run_study(path, out, pretrain_dir=tmp_path / "shared")
    assert [(n.split("-")[0], resumed) for n, resumed in calls.pretrain] == [("ddpm@2", False), ("ddpm@3", True)]
    long = next((tmp_path / "shared").glob("ddpm@3-*"))
    cfg = json.loads((long / "config.json").read_text())
    assert cfg["train"]["steps"] == 3 and cfg["extended"] == [{"at_step": 2, "from_steps": 2, "to_steps": 3}]
    assert (long / "model.safetensors").is_file() and not (out / "pretrain").exists()
    # 2 lengths × lp-ft + scratch, × 2 protocols × 3 selections
    assert len(rows) == (2 + 1) * 2 * 3
    assert {r["protocol"] for r in rows} == {"plain", "strong"}
    strong = [r for r in rows if r["protocol"] == "strong" and r["strategy"] == "lp-ft"]
    assert all((out / "cells" / r["cell"] / "run" / "lp" / "model.safetensors").is_file() for r in strong)
    run_cfg = json.loads((out / "cells" / strong[0]["cell"] / "run" / "config.json").read_text())
    assert run_cfg["transfer"]["augment"] == "strong" and run_cfg["transfer"]["strategy"] == "lp-ft"
    for select in ("random", "diverse", "typical"):  # one subset per (k, seed, select), shared by every cell
        assert len({r["stems"] for r in rows if r["select"] == select}) == 1
    pairs = paired_differences(rows)
    assert len(pairs) == 2 * 2 * 3 and all(p["n"] == 1 and p["unpaired"] == 0 for p in pairs)
    verdict = (out / "verdict.md").read_text()
    assert "| 2 | ddpm@" in verdict and "selection − random" in verdict
    assert "| protocol |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_finetune_at_trains_every_length_but_fine_tunes_only_the_listed_ones(files, tmp_path, monkeypatch, capsys):
    """finetune_at [3] in a [2, 3] sweep: the 2-step run is still trained (the 3-step run continues it, so
    it keeps the key of a plain [2, 3] sweep), but only ddpm@3 and scratch get cells."""
    def methods(**extra):
        return [{"name": "ddpm", "recipe": "pre.yaml", "pretrain_steps": [2, 3], **extra}]
    path = write_study(files, base_study(methods=methods(finetune_at=[3]), labels=[1]), name="at.yaml")
    out = tmp_path / "out"
    calls = Calls(monkeypatch)
    rows = runner.run_study(path, out)
    assert "note: ddpm@2 is trained (the longer run continues it) but gets no cells" in capsys.readouterr().out
    assert [n.split("-")[0] for n, _ in calls.pretrain] == ["ddpm@2", "ddpm@3"]
    assert sorted(r["method"] for r in rows) == ["ddpm@3", "none"]
    plain = parse_study(base_study(methods=methods(), labels=[1]), files / "plain.yaml")
    planned = plan_pretraining(plain, out / "pretrain", out)
    assert all(r.finished for r in planned)  # the same runs: nothing to train for the plain sweep


@pytest.mark.slow
def test_source_rows_and_keep_head_protocol(files, tmp_path, monkeypatch):
    """strategy source: the supervised run evaluated as it is (once, copied to every cell); a keep_head
    protocol fine-tunes its own head (nothing new) and skips lp-ft, which would have no head to train first."""
    methods = [{"name": "sup", "recipe": "pre.yaml", "overrides": {"corruption.method": "supervised"}}]
    study = base_study(methods=methods, strategies=["full", "lp-ft", "source", "scratch"], labels=[1], seeds=[0, 1],
                       protocols=[{"name": "plain", "overrides": {"transfer.keep_head": False}},
                                  {"name": "keep", "overrides": {"transfer.keep_head": True}}])
    study["data"]["source"] = "data"
    path = write_study(files, study, name="source.yaml")
    out = tmp_path / "out"
    calls = Calls(monkeypatch)
    rows = runner.run_study(path, out)
    by = {(r["strategy"], r["protocol"], int(r["seed"])): r for r in rows}
    assert ("lp-ft", "keep", 0) not in by and ("lp-ft", "plain", 0) in by
    # the 4 source cells train nothing; keep_head does not apply to scratch, so keep's scratch cells are
    # plain's (the same key), computed once and copied
    assert len(calls.finetune) == len(rows) - 4 - 2
    scratch = {r["protocol"]: r["cell"] for r in rows if r["strategy"] == "scratch" and int(r["seed"]) == 0}
    assert scratch["keep"].rsplit("-", 1)[1] == scratch["plain"].rsplit("-", 1)[1]
    assert by[("scratch", "keep", 0)]["dice"] == by[("scratch", "plain", 0)]["dice"]
    source = [r for r in rows if r["strategy"] == "source"]
    assert len(source) == 4 and len({r["dice"] for r in source}) == 1 and all(r["stems"] == "" for r in source)
    pre = next((out / "pretrain").iterdir())  # every source cell scored the pretraining run itself
    assert all(json.loads((out / "cells" / r["cell"] / "eval" / "metrics.json").read_text())["model"] == str(pre)
               for r in source)
    kept = json.loads((out / "cells" / by[("full", "keep", 0)]["cell"] / "run" / "labeled.json").read_text())
    plain = json.loads((out / "cells" / by[("full", "plain", 0)]["cell"] / "run" / "labeled.json").read_text())
    assert kept["load_report"]["new"] == [] and plain["load_report"]["new"]
    pairs = {(p["strategy"], p["protocol"]): p for p in paired_differences(rows)}
    assert pairs[("source", "keep")]["n"] == 2  # the zero-label score pairs with scratch at every seed


def test_unlabeled_pool_of_folders_and_the_target_without_its_test_images(files, tmp_path, monkeypatch):
    """data.unlabeled [folder, target]: pretraining reads the folder's images and the target's train
    images, never its test split; the pool and its runs are shared by studies with one --pretrain-dir."""
    extra = tmp_path / "extra"
    write_labeled_dataset(extra, n=3, k=3)
    study = base_study(labels=[1])
    study["data"]["unlabeled"] = [str(extra), "target"]
    path = write_study(files, study, name="pool.yaml")
    calls = Calls(monkeypatch)
    runner.run_study(path, tmp_path / "a", pretrain_dir=tmp_path / "shared", pretrain_only=True)
    (pre,) = [Path(p) for p in (tmp_path / "shared").glob("ddpm@2-*")]
    cfg = json.loads((pre / "config.json").read_text())
    pool = Path(cfg["data"]["path"])
    names = sorted(p.name for p in pool.iterdir())
    test = json.loads((files / "data" / "split.json").read_text())["test"]
    assert len(names) == 3 + 4 and sum(n.startswith("target__") for n in names) == 4
    assert not any(n.startswith("target__" + t) for t in test for n in names)
    assert json.loads((pool.parent / "pool.json").read_text())["images"] == 7
    calls = Calls(monkeypatch)
    runner.run_study(path, tmp_path / "b", pretrain_dir=tmp_path / "shared", pretrain_only=True)
    assert calls.pretrain == []  # the second study finds the same pool and run


def test_pool_size_pretrains_on_a_seeded_random_part_of_the_pool(files, tmp_path, capsys):
    """data.pool_size N: a random N of the pool's 7 images (the folder's 3 + the target's 4 train images),
    the same N for the same pool_seed, another draw for another seed; its own pool folder (so its own
    pretraining run); clear errors for a size the pool cannot give and for a size without a pool."""
    from labeldiff.study.prepare import build_pool

    extra = tmp_path / "extra"
    write_labeled_dataset(extra, n=3, k=3)
    test = json.loads((files / "data" / "split.json").read_text())["test"]

    def pool(**data):
        study = base_study(labels=[1])
        study["data"].update(unlabeled=[str(extra), "target"], **data)
        images = build_pool(parse_study(study, files / "study.yaml"), tmp_path / "shared")
        return images, sorted(p.name for p in images.iterdir())

    full, all_names = pool()
    drawn = {seed: pool(pool_size=4, pool_seed=seed) for seed in range(6)}
    for images, names in drawn.values():
        assert len(names) == 4 and set(names) <= set(all_names) and images != full
        assert not any(n.startswith("target__" + t) for t in test for n in names)
        info = json.loads((images.parent / "pool.json").read_text())
        assert info["images"] == 4 and sum(info["sources"].values()) == 4 and info["drawn"].startswith("4 of 7")
    capsys.readouterr()
    pool(pool_size=4, pool_seed=0)
    assert ", a random 4 of 7 (pool_seed 0)) →" in capsys.readouterr().out  # how the draw is said
    assert pool(pool_size=4, pool_seed=2) == drawn[2]  # the same seed draws the same images, the same folder
    assert len({tuple(names) for _, names in drawn.values()}) > 1
    assert pool(pool_size=7)[1] == all_names
    assert pool(pool_size=None)[0] == full  # null (the schema's default) is the whole pool
    with pytest.raises(DataError, match="data.pool_size 8: the pool has only 7 images"):
        pool(pool_size=8)
    with pytest.raises(StudyError, match="subsamples a pool"):
        parse_study(base_study(data={"path": "data", "pool_size": 4}), files / "study.yaml")
    for bad in (0, "10", True):
        with pytest.raises(StudyError, match="is not a number of images"):
            parse_study(base_study(data={"path": "data", "unlabeled": ["target"], "pool_size": bad}),
                        files / "study.yaml")



def test_pool_by_groups_draws_whole_groups_of_the_target(files, tmp_path, capsys):
    """data.pool_by groups: the N pool images are whole groups (videos) of the target's train split, in a
    seeded order, the last group cut to fit; every image of a plain folder is a group of its own."""
    from labeldiff.study.prepare import build_pool, prepare_data

    data = write_labeled_dataset(tmp_path / "videos", n=16, k=2)
    (data / "split.json").unlink()
    group = {f"img_{i:02d}": f"v{i // 4}" for i in range(16)}  # 4 videos of 4 frames
    (data / "groups.json").write_text(json.dumps(group))

    def pool(**extra):
        study = base_study(data={"path": str(data), "split": {"groups": "groups.json", "test_fraction": 0.25},
                                 "unlabeled": ["target"], "pool_size": 6, **extra})
        s = parse_study(study, files / "study.yaml")
        prepare_data(s, tmp_path / "out")
        images = build_pool(s, tmp_path / "shared")
        return images, [group[p.stem.removeprefix("target__")] for p in sorted(images.iterdir())]

    for seed in range(4):
        images, videos = pool(pool_by="groups", pool_seed=seed)
        counts = sorted(videos.count(v) for v in set(videos))
        assert counts == [2, 4], videos  # one whole video and the first 2 frames of another
        info = json.loads((images.parent / "pool.json").read_text())
        assert info["drawn"].startswith("6 of 12 in 2 whole groups") and len(info["groups"]) == 2
        assert ", 6 of 12 in 2 whole groups (pool_seed " in capsys.readouterr().out
        split = json.loads((tmp_path / "out" / "data" / "split.json").read_text())
        assert not {group[t] for t in split["test"]} & set(videos)  # the test video never enters
    by_seed = {tuple(pool(pool_by="groups", pool_seed=seed)[1]) for seed in range(6)}
    assert len(by_seed) > 1  # the seed orders the groups
    assert pool(pool_by="groups", pool_seed=1) == pool(pool_by="groups", pool_seed=1)
    with pytest.raises(StudyError, match="data.pool_by: 'videos'; choose images or groups"):
        pool(pool_by="videos")
    with pytest.raises(StudyError, match="groups draws whole groups of the target; give data.split"):
        parse_study(base_study(data={"path": "data", "unlabeled": ["target"], "pool_size": 2, "pool_by": "groups"}),
                    files / "study.yaml")
    with pytest.raises(StudyError, match="give data.pool_size too"):
        parse_study(base_study(data={"path": "data", "unlabeled": ["target"], "pool_by": "groups"}),
                    files / "study.yaml")

def test_volume_slabs_prepare_slices_one_nnunet_case_into_disjoint_slabs(files, tmp_path):
    import nibabel as nib

    from labeldiff.study.prepare import prepare_data

    root = tmp_path / "Dataset001_Toy"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(24, 20, 30)).astype(np.float32)
    lab = np.zeros((24, 20, 30), np.uint8)
    lab[4:20, 4:16, 2:28] = 1
    lab[8:14, 6:12, 10:20] = 2
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(root / "imagesTr" / "toy_0000.nii.gz"))
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / "labelsTr" / "toy.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "a": 1, "b": 2}}))
    s = parse_study(base_study(prepare="volume-slabs", data={"path": str(root), "size": 16, "channels": 1}),
                    files / "study.yaml")
    prepare_data(s, tmp_path / "out")
    assert s.data.path == tmp_path / "out" / "data" / "Dataset001_Toy-slabs"
    split = json.loads((s.data.path / "split.json").read_text())
    z = {k: [int(x.rsplit("_", 1)[1]) for x in split[k]] for k in ("train", "test")}
    assert z["train"] == list(range(2, 15)) and z["test"] == list(range(19, 28))  # 26 slices: 13 | gap 4 | 9
    assert max(z["train"]) < min(z["test"]) - 4
    assert json.loads((s.data.path / "classes.json").read_text())["b"] == 2
    with pytest.raises(StudyError, match="prepare: volume-slabs slices the volume"):
        parse_study(base_study(prepare="volume-slabs", data={"size": 16}), files / "study.yaml")


def test_fields_added_later_keep_old_run_hashes():
    """data.axis / data.intensity at their defaults leave a run's identity (and folder hash) as it was;
    set, they change it."""
    from labeldiff.config import RunConfig
    from labeldiff.study.configs import identity

    d = identity(RunConfig())["data"]
    assert "axis" not in d and "intensity" not in d
    cfg = RunConfig()
    cfg.data.intensity = {"scheme": "zscore"}
    cfg.data.axis = 0
    assert identity(cfg)["data"]["intensity"] == {"scheme": "zscore"} and identity(cfg)["data"]["axis"] == 0


@pytest.mark.slow
def test_study_on_a_volume_dataset_with_slabs(files, tmp_path, monkeypatch):
    """A study reads an nnU-Net dataset as slices: slab split into OUT/data/split.json, pretraining leaves
    the test slab out, cells train on train-slab slices and test on the test slab."""
    import nibabel as nib

    root = tmp_path / "Dataset007_Toy"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    lab = np.zeros((16, 14, 20), np.uint8)
    lab[3:12, 3:10, 1:19] = 1
    lab[6:9, 5:8, 4:16] = 2
    nib.save(nib.Nifti1Image((rng.normal(size=lab.shape) + 2.0 * lab).astype(np.float32), np.eye(4)),
             str(root / "imagesTr" / "toy_0000.nii.gz"))
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / "labelsTr" / "toy.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "a": 1, "b": 2}}))
    study = base_study(data={"path": str(root), "size": 16, "channels": 1, "mode": "resize",
                             "split": {"slab_train": 0.5, "gap": 2}, "intensity": {"scheme": "zscore"}},
                       metrics=["dice", "iou", "per-class", "volume"])
    path = write_study(files, study, name="volumes.yaml")
    calls = Calls(monkeypatch)
    rows = runner.run_study(path, tmp_path / "out")
    split = json.loads((tmp_path / "out" / "data" / "split.json").read_text())
    assert split["train"] == [f"toy_z{i:04d}" for i in range(1, 10)] and split["test"][0] == "toy_z0012"
    assert len(rows) == 4 and len(calls.finetune) == 4  # ddpm full + scratch at k = 1, 2
    for r in rows:
        labeled = json.loads((tmp_path / "out" / "cells" / r["cell"] / "run" / "labeled.json").read_text())
        assert set(labeled["stems"]) <= set(split["train"])
        assert 0 <= r["dice"] <= 1
    (pre,) = (tmp_path / "out" / "pretrain").iterdir()
    cfg = json.loads((pre / "config.json").read_text())
    assert cfg["data"]["intensity"]["scheme"] == "zscore"
    # metrics: volume — every cell's model scored on the test slab in 3D, into the rows and the reports
    for r in rows:
        v = json.loads((tmp_path / "out" / "cells" / r["cell"] / "eval" / "volume" / "metrics.json").read_text())
        assert v["slabs"] == {"toy": [12, int(split["test"][-1][5:])]} and set(v["per_class"]) == {"a", "b"}
        assert r["dice_3d"] == v["dice"] and 0 <= r["dice_3d"] <= 1
        nsd = [c["nsd"] for c in v["per_class"].values() if c["nsd"] is not None]
        assert r["nsd"] == pytest.approx(sum(nsd) / len(nsd))  # mean over the classes where it is defined
    out = tmp_path / "out"
    assert "## 3D Dice on the test slab" in (out / "results.md").read_text()
    assert "Paired dice_3d difference" in (out / "paired.md").read_text()
    assert "dice_3d" in (out / "results.csv").read_text().splitlines()[0]
    before = {r["cell"]: (out / "cells" / r["cell"] / "eval" / "volume" / "metrics.json").stat().st_mtime_ns
              for r in rows}
    runner.run_study(path, out, report_only=True)  # scored once: a second report reuses the 3D scores
    assert before == {c: (out / "cells" / c / "eval" / "volume" / "metrics.json").stat().st_mtime_ns for c in before}


def test_volume_metric_needs_a_volume_dataset(files, tmp_path, monkeypatch):
    path = write_study(files, base_study(metrics=["dice", "volume"]), name="vol2d.yaml")
    Calls(monkeypatch)
    with pytest.raises(DataError, match="metrics: volume scores the test slices in 3D"):
        runner.run_study(path, tmp_path / "out")


def test_too_many_labels_stops_before_training(files, tmp_path, monkeypatch):
    path = write_study(files, base_study(labels=[1, 9]), name="toomany.yaml")
    calls = Calls(monkeypatch)
    with pytest.raises(DataError, match=r"labels: 9 is larger than the train split \(4 images\)"):
        runner.run_study(path, tmp_path / "out")
    assert calls.pretrain == [] and calls.finetune == []


@pytest.mark.slow
def test_a_study_killed_mid_cell_resumes_without_recomputing_finished_cells(files, tmp_path):
    """SIGKILL of `labeldiff study` while a cell is half done (its folder exists, its metrics do not):
    results.csv holds exactly the finished cells, whole; the rerun leaves those cells' files untouched
    (same bytes, same mtime), redoes the killed cell and ends with every cell."""
    import os
    import signal
    import subprocess
    import sys
    import time

    path = write_study(files, base_study(), name="kill.yaml")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "labeldiff.cli", "study", str(path), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def mid_cell() -> bool:
        started = [p for p in out.glob("cells/*") if (p / "run").is_dir()]
        return len(_metrics(out)) >= 1 and len(started) > len(_metrics(out))

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while proc.poll() is None and not mid_cell():
        assert time.time() - t0 < 180, "the study did not reach its second cell"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    finished = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in _metrics(out)}
    assert 1 <= len(finished) < 4
    rows = report.read_csv(out / "results.csv")  # never truncated: the rows of the finished cells, whole
    assert {r["cell"] for r in rows} == {p.parents[1].name for p in finished}

    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{len(finished)} finished, {4 - len(finished)} to run" in done.stdout
    for p, (data, mtime) in finished.items():
        assert p.read_bytes() == data and p.stat().st_mtime_ns == mtime, p
    assert len(_metrics(out)) == 4 and len(report.read_csv(out / "results.csv")) == 4


@pytest.mark.slow
def test_cells_side_by_side_are_the_cells_of_one_process(files, tmp_path, monkeypatch):
    """--workers 2: two `--shard i/2` processes (1 thread each) split the cells, each cell is computed once,
    and the scores are those of a one-process study with one thread; a shard refuses to pretrain."""
    import torch

    path = write_study(files, base_study(), name="workers.yaml")
    shared = tmp_path / "shared"
    with pytest.raises(ValueError, match="--pretrain-only first"):
        runner.run_study(path, tmp_path / "early", pretrain_dir=shared, shard=(0, 2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = {r["cell"]: r["dice"] for r in runner.run_study(path, tmp_path / "one", pretrain_dir=shared)}
    finally:
        torch.set_num_threads(threads)
    two = {r["cell"]: r["dice"] for r in runner.run_study(path, tmp_path / "two", pretrain_dir=shared, workers=2)}
    assert len(one) == 4 and two == one
    logs = [(tmp_path / "two" / "workers" / f"shard-{i}.log").read_text() for i in range(2)]
    ran = [{c for c in one if f"→ {tmp_path / 'two' / 'cells' / c}" in log} for log in logs]
    assert len(ran[0]) == len(ran[1]) == 2 and ran[0] | ran[1] == set(one)


@pytest.mark.slow
def test_robustness_option_adds_corrupted_dice_and_drop_columns(files, tmp_path, monkeypatch):
    """``robustness:`` runs evaluate --corruptions for every cell once; the report gains dice_corrupted and
    dice_drop (clean − corrupted) columns, tables and a paired drop table."""
    study = base_study(strategies=["full", "scratch"], labels=[1],
                       robustness={"corruptions": ["noise", "contrast"], "severities": [1, 5], "seed": 3})
    path = write_study(files, study, name="robust.yaml")
    assert load_study(path).robustness == {"corruptions": ["noise", "contrast"], "severities": [1, 5], "seed": 3}
    Calls(monkeypatch)
    out = tmp_path / "out"
    rows = runner.run_study(path, out)
    assert len(rows) == 2
    for r in rows:
        rob = json.loads((out / "cells" / r["cell"] / "eval" / "robustness" / "robustness.json").read_text())
        assert len(rob["rows"]) == 4 and rob["seed"] == 3
        assert r["dice_corrupted"] == rob["mean_dice"] and r["dice_drop"] == pytest.approx(r["dice"] - rob["mean_dice"])
    assert "## Dice under corruptions" in (out / "results.md").read_text()
    assert "Paired dice_drop difference" in (out / "paired.md").read_text()
    assert "dice_drop" in (out / "results.csv").read_text().splitlines()[0]
    stamp = {r["cell"]: (out / "cells" / r["cell"] / "eval" / "robustness" / "robustness.json").stat().st_mtime_ns
             for r in rows}
    runner.run_study(path, out, report_only=True)  # the same settings: scored once
    assert stamp == {c: (out / "cells" / c / "eval" / "robustness" / "robustness.json").stat().st_mtime_ns
                     for c in stamp}


@pytest.mark.slow
def test_a_shard_scores_its_own_cells_under_corruptions(files, tmp_path):
    """Under --workers the corruption scores are computed side by side: each shard scores the cells it ran,
    and the parent, finding them scored, does not score them again."""
    study = base_study(strategies=["full", "scratch"], labels=[1],
                       robustness={"corruptions": ["noise"], "severities": [2], "seed": 0})
    path = write_study(files, study, name="robust_shard.yaml")
    out, shared = tmp_path / "out", tmp_path / "shared"
    runner.run_study(path, out, pretrain_dir=shared, pretrain_only=True)
    runner.run_study(path, out, pretrain_dir=shared, shard=(0, 2))
    scored = lambda: {c.name: (c / "eval" / "robustness" / "robustness.json").stat().st_mtime_ns
                      for c in (out / "cells").iterdir() if (c / "eval" / "robustness" / "robustness.json").is_file()}
    ran = [c.name for c in (out / "cells").iterdir() if (c / "eval" / "metrics.json").is_file()]
    assert len(ran) == 1 and list(scored()) == ran  # shard 0 of 2: one cell, scored by the shard
    runner.run_study(path, out, pretrain_dir=shared, shard=(0, 1))  # the other cell
    first = scored()
    assert len(first) == 2
    rows = runner.run_study(path, out, pretrain_dir=shared)
    assert scored() == first and all(r["dice_drop"] is not None for r in rows)


@pytest.mark.parametrize("value, message", [
    ({"corruptions": ["fog"]}, "robustness: --corruptions"), ({"severities": [0]}, "1..5"),
    ({"sevs": [1]}, "sevs"), ("yes", "expected true or a mapping")])
def test_robustness_option_errors(files, value, message):
    with pytest.raises(StudyError, match=message):
        parse_study(base_study(robustness=value), files / "study.yaml")
    assert parse_study(base_study(robustness=True), files / "study.yaml").robustness["severities"] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_synthetic_protocol_samples_once_and_pairs_with_the_plain_protocol(files, tmp_path, monkeypatch):
    """A protocol with transfer.synthetic: the study samples the hybrid run's pairs once, before the cells
    (which read the cache, in this process or in workers), and paired.md sets it against the first protocol."""
    from conftest import tiny_model
    from labeldiff.config import CorruptionConfig, RunConfig
    from labeldiff.pretrain.run import run_pretrain
    from labeldiff.sample import synthetic

    hybrid = RunConfig(kind="pretrain", model=tiny_model(3), corruption=CorruptionConfig(method="hybrid"))
    hybrid.data.path, hybrid.data.size, hybrid.data.channels = str(files / "data"), 16, 3
    hybrid.train.steps, hybrid.train.batch_size, hybrid.train.precision, hybrid.train.device = 2, 2, "fp32", "cpu"
    hybrid.train.warmup_steps = 1
    run_pretrain(hybrid, tmp_path / "hybrid")
    sampled, out = [], tmp_path / "out"
    real = synthetic.sample_chunks
    monkeypatch.setattr(synthetic, "sample_chunks", lambda src, which, *a: (
        sampled.append((which, (out / "cells").exists())), real(src, which, *a)))
    study = base_study(methods=[{"name": "none"}], strategies=["scratch"], labels=[1], seeds=[0, 1],
                       protocols=[{"name": "plain"},
                                  {"name": "synth", "overrides": {"transfer.synthetic": f"{tmp_path / 'hybrid'}:4"}}])
    rows = runner.run_study(write_study(files, study, name="synthetic.yaml"), out)
    assert sampled == [([0], False)]  # once, before any cell
    for r in rows:
        record = json.loads((out / "cells" / r["cell"] / "run" / "labeled.json").read_text())["synthetic"]
        assert (record is not None) == (r["protocol"] == "synth")
    (diff,) = axis_differences(rows, "protocol", "plain", same_subset=True)
    assert diff["protocol"] == "synth" and diff["n"] == 2
    assert "| synth | none | scratch | random | 1 |" in (out / "paired.md").read_text()


@pytest.mark.parametrize("bf16", [True, False])
def test_environment_says_what_precision_auto_trains_in(bf16, tmp_path, monkeypatch):
    """environment.json's cpu.precision_auto is the runtime's own resolution of `auto` on this CPU."""
    from types import SimpleNamespace

    from labeldiff.study.prepare import write_environment

    monkeypatch.setattr("labeldiff.runtime.cpu_has_bf16", lambda cpuinfo=None: bf16)
    write_environment(tmp_path / "env.json", SimpleNamespace(file="s.yaml", seeds=[0]), [], {}, 1.0, None)
    assert json.loads((tmp_path / "env.json").read_text())["cpu"]["precision_auto"] == ("bf16 autocast" if bf16 else "fp32")


def test_environment_names_the_gpus_a_study_ran_on(tmp_path, monkeypatch):
    """environment.json names the CUDA GPUs a study's cells could use, and none without CUDA."""
    from types import SimpleNamespace

    import torch

    from labeldiff.study.prepare import write_environment

    args = (SimpleNamespace(file="s.yaml", seeds=[0]), [], {}, 1.0, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    write_environment(tmp_path / "none.json", *args)
    assert json.loads((tmp_path / "none.json").read_text())["gpus"] == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU {i}")
    write_environment(tmp_path / "two.json", *args)
    assert json.loads((tmp_path / "two.json").read_text())["gpus"] == ["GPU 0", "GPU 1"]


@pytest.mark.slow
def test_a_failed_worker_shows_the_end_of_its_log(tmp_path):
    """A worker that fails (here: a study file it cannot read) is reported with the end of its own log, so the
    cause is on the screen, not only in OUT/workers/shard-i.log."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {path: nowhere}\n")  # no methods, no strategies
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(StudyError) as err:
        execute.run_workers(bad, out, tmp_path / "pre", workers=1)
    log = (out / "workers" / "shard-0.log").read_text()
    assert log.strip() and log.strip().splitlines()[-1] in str(err.value)
