"""The Aggregated Jaccard Index of connected components: by hand, its edge cases, against a plain
per-object loop on real MoNuSeg masks, and through ``labeldiff evaluate --metrics aji`` and a study."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy import ndimage
from skimage.measure import label

from labeldiff.cli import main
from labeldiff.errors import ConfigError
from labeldiff.evaluate.instances import (aggregated_jaccard, aji_from_stats, aji_stats, connected_objects,
                                          object_stats, parse_metrics, per_image_columns, summarize_aji)

from conftest import DATASETS

MONUSEG = DATASETS / "monuseg"
MONUSEG_STEMS = ["TCGA-18-5592-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1", "TCGA-21-5786-01Z-00-DX1"]


def boxes(shape: tuple[int, int], *rects: tuple[int, int, int, int]) -> np.ndarray:
    """A 0/1 mask with the rectangles (row0, row1, col0, col1), ends included, set to 1."""
    m = np.zeros(shape, dtype=np.uint8)
    for r0, r1, c0, c1 in rects:
        m[r0:r1 + 1, c0:c1 + 1] = 1
    return m


def test_two_nuclei_three_predicted_objects_by_hand():
    """G1 rows 1-3 × cols 1-3 (9 px), G2 rows 6-8 × cols 6-9 (12 px); S1 rows 1-3 × cols 2-4 (9 px),
    S2 rows 6-8 × cols 6-7 (6 px), S3 rows 6-8 × col 9 (3 px; col 8 keeps it apart from S2).

    G1: S1 only, |G1 ∩ S1| = 6, |G1 ∪ S1| = 9 + 9 − 6 = 12 (IoU 1/2).
    G2: S2 with 6 / 12 = 1/2, S3 with 3 / 12 = 1/4: S2, ∩ = 6, ∪ = 12 + 6 − 6 = 12.
    S3 is unused: U += 3. C = 6 + 6 = 12, U = 12 + 12 + 3 = 27, AJI = 12 / 27 = 4/9.
    (Pixel Dice: 2 · 12 / (21 + 18) = 0.615; AJI is lower because of S3 and the split of G2.)"""
    target = boxes((10, 10), (1, 3, 1, 3), (6, 8, 6, 9))
    pred = boxes((10, 10), (1, 3, 2, 4), (6, 8, 6, 7), (6, 8, 9, 9))
    assert connected_objects(target)[1] == 2 and connected_objects(pred)[1] == 3
    assert object_stats(pred.astype(bool), target.astype(bool)) == (12, 27)
    assert aggregated_jaccard(pred, target) == pytest.approx(4 / 9, abs=1e-12)
    assert aggregated_jaccard(pred, target) == reference_aji(pred, target)


def test_edge_cases():
    """Perfect → 1; nothing in both → NaN; objects in one only → 0; one blob over two nuclei counts its
    pixels once per nucleus; touching nuclei are one object; diagonal neighbours too (8-connectivity)."""
    t = boxes((8, 8), (0, 2, 0, 2), (5, 7, 4, 7))
    empty = np.zeros_like(t)
    assert aggregated_jaccard(t, t) == 1.0
    assert math.isnan(aggregated_jaccard(empty, empty))
    assert aggregated_jaccard(empty, t) == 0.0 and aggregated_jaccard(t, empty) == 0.0
    # two 3×3 nuclei with a gap column between them, one 3×7 blob over both: each picks the blob,
    # ∩ = 9 and ∪ = 21 twice: AJI = 18 / 42 = 3/7 (pixel Dice 2 · 18 / 39 = 0.92)
    two = boxes((3, 7), (0, 2, 0, 2), (0, 2, 4, 6))
    blob = boxes((3, 7), (0, 2, 0, 6))
    assert aggregated_jaccard(blob, two) == pytest.approx(3 / 7, abs=1e-12)
    # the other way round: the blob (one object) picks the larger-IoU half, the other half is unused
    assert aggregated_jaccard(two, blob) == pytest.approx(9 / (21 + 9), abs=1e-12)
    # two touching nuclei (cols 0-2 and 3-5) are one object of the truth: the blob over both scores 1 (with
    # instance labels, 18 / 36), a prediction that separates them by a gap column scores 9 / (18 + 6) = 3/8
    touching = boxes((3, 6), (0, 2, 0, 5))
    assert aggregated_jaccard(touching, touching) == 1.0
    assert aggregated_jaccard(boxes((3, 6), (0, 2, 0, 2), (0, 2, 4, 5)), touching) == pytest.approx(3 / 8)
    diagonal = np.eye(4, dtype=np.uint8)
    assert connected_objects(diagonal)[1] == 1
    assert aggregated_jaccard(diagonal, diagonal) == 1.0
    with pytest.raises(ValueError, match="shape"):
        aggregated_jaccard(t[:4], t)


def test_ignored_pixels_are_background_in_both():
    """A prediction that differs from the truth only where the truth is ignore_index scores 1; an ignored
    band through a nucleus splits it into two objects, in the prediction too."""
    target = boxes((6, 9), (1, 4, 1, 7)).astype(np.int64)
    pred = target.copy()
    target[0, :] = 255  # ignored row; the prediction has foreground there
    pred[0, :] = 1
    assert aggregated_jaccard(pred, target) < 1 and aggregated_jaccard(pred, target, ignore_index=255) == 1.0
    target[:, 4] = 255  # splits the nucleus in two: 2 truth objects, the prediction's blob split the same way
    assert connected_objects((target == 1))[1] == 2
    assert aji_stats(pred, target, 2, ignore_index=255)[1].tolist() == [24, 24]  # 2 × (4 rows × 3 cols)


def test_classes_scored_apart_and_reduced_like_dice():
    """K = 3: the objects of each foreground class are matched among themselves; background is not scored;
    an image where a class is in neither map is NaN, left out of the mean and counted in n_empty."""
    target = np.zeros((6, 6), np.int64)
    target[0:2, 0:2] = 1
    target[4:6, 4:6] = 2
    pred = np.zeros_like(target)
    pred[0:2, 0:2] = 1
    pred[4:6, 4:6] = 1  # class 2 taken for class 1: a false class-1 object, class 2 missed
    stats = aji_stats(pred, target, 3)
    assert stats.tolist() == [[0, 0], [4, 8], [0, 4]]
    np.testing.assert_allclose(aji_from_stats(stats), [np.nan, 0.5, 0.0])
    assert per_image_columns(stats) == {"aji": 0.25, "aji_1": 0.5, "aji_2": 0.0}
    assert per_image_columns(aji_stats(pred == 1, target == 1, 2)) == {"aji": 0.5}  # K = 2: one column
    only_1 = aji_stats(np.where(target == 1, 1, 0), np.where(target == 1, 1, 0), 3)  # no class 2 anywhere
    s = summarize_aji(np.stack([stats, only_1]), ["bg", "nucleus", "other"])
    assert s["per_class"] == {"nucleus": 0.75, "other": 0.0} and s["n_empty"] == {"nucleus": 0, "other": 1}
    assert s["mean"] == pytest.approx(0.375)


def test_parse_metrics():
    assert parse_metrics("aji") == ["aji"] and parse_metrics("dice,iou,aji,aji") == ["aji"]
    assert parse_metrics(None) == [] and parse_metrics("dice") == []
    with pytest.raises(ConfigError, match="hd95 is not a metric evaluate scores"):
        parse_metrics("aji,hd95")


def test_evaluate_refuses_aji_on_volumes_in_one_line(tmp_path, capsys):
    raw = tmp_path / "Dataset001_X"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "dataset.json").write_text("{}")
    assert main(["evaluate", "--model", str(tmp_path / "run"), "--data", str(raw), "--metrics", "aji"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--metrics aji scores 2D images" in err[0]


def reference_aji(pred: np.ndarray, target: np.ndarray) -> float:
    """AJI as Kumar et al. 2017 (Algorithm 1) write it, one object at a time over the whole image:
    skimage's labelling (8-connectivity) and full-image boolean masks, no contingency table."""
    gt = label(np.asarray(target) > 0, connectivity=2)
    pr = label(np.asarray(pred) > 0, connectivity=2)
    c = u = 0
    used = set()
    for i in range(1, gt.max() + 1):
        g = gt == i
        best, best_iou, best_inter, best_union = None, 0.0, 0, 0
        for j in np.unique(pr[g]):  # an object that does not touch G_i has IoU 0
            if j == 0:
                continue
            s = pr == j
            inter, union = int((g & s).sum()), int((g | s).sum())
            if inter / union > best_iou:  # strictly: the lowest label wins a tie
                best, best_iou, best_inter, best_union = j, inter / union, inter, union
        if best is None:
            u += int(g.sum())
        else:
            c, u = c + best_inter, u + best_union
            used.add(best)
    for j in range(1, pr.max() + 1):
        if j not in used:
            u += int((pr == j).sum())
    return c / u if u else math.nan


def test_random_masks_match_the_reference():
    """Speckled random masks: many objects, merges, ties."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        target = (ndimage.uniform_filter(rng.random((24, 30)), 3) > 0.55).astype(np.uint8)
        pred = (ndimage.uniform_filter(rng.random((24, 30)), 3) > rng.uniform(0.45, 0.6)).astype(np.uint8)
        pred[rng.random(pred.shape) < 0.03] = 1
        assert aggregated_jaccard(pred, target) == pytest.approx(reference_aji(pred, target), abs=1e-9)


@pytest.mark.slow
@pytest.mark.skipif(not (MONUSEG / "masks").is_dir(), reason=f"real data not available at {MONUSEG}")
def test_monuseg_masks_against_their_perturbations_match_the_reference():
    """3 real 1000×1000 MoNuSeg masks (hundreds of nuclei) against an eroded, a dilated (touching nuclei
    merge) and a shifted copy; ours equals the per-object loop to 1e-9."""
    for stem in MONUSEG_STEMS:
        with Image.open(MONUSEG / "masks" / f"{stem}.png") as im:
            target = (np.asarray(im) > 0).astype(np.uint8)
        assert connected_objects(target)[1] > 200
        for pred in (ndimage.binary_erosion(target, iterations=2), ndimage.binary_dilation(target, iterations=2),
                     np.roll(target, (4, -6), axis=(0, 1))):
            pred = pred.astype(np.uint8)
            ours = aggregated_jaccard(pred, target)
            assert 0.05 < ours < 0.95
            assert ours == pytest.approx(reference_aji(pred, target), abs=1e-9)


TINY = ["--size", "16", "--steps", "2", "--batch-size", "2", "--precision", "fp32", "--device", "cpu",
        "--channels", "3", "--unet-channels", "8,16", "--attention", "0,0", "--head-hidden", "8"]


@pytest.mark.slow
def test_evaluate_metrics_aji_writes_the_column_and_the_mean(binary_dataset, tmp_path, capsys):
    """``labeldiff evaluate --metrics aji``: an ``aji`` column per image, equal to the AJI of the mask
    ``labeldiff predict`` writes, and its mean in metrics.json; without the option nothing changes."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("model:\n  num_head_channels: 8\n  num_res_blocks: 1\ntrain:\n  warmup_steps: 1\n")
    run = tmp_path / "run"
    assert main(["finetune", "--data", str(binary_dataset), "--out", str(run), "--strategy", "scratch", "--labels", "2",
                 *TINY, "--recipe", str(recipe)]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run), "--out", str(out), "--device", "cpu", "--metrics", "aji"]) == 0
    assert ", AJI " in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    values = np.array([float(r["aji"]) for r in rows])
    assert len(rows) == 2 and np.isfinite(values).all() and ((0 <= values) & (values <= 1)).all()
    assert m["aji"]["mean"] == pytest.approx(np.nanmean(values), abs=1e-6)
    assert set(m["aji"]["per_class"]) == {"1"}
    preds = tmp_path / "preds"
    assert main(["predict", "--model", str(run), "--input", str(binary_dataset / "images"), "--out", str(preds),
                 "--device", "cpu"]) == 0
    for r in rows:
        pred, truth = (np.asarray(Image.open(f)) for f in (preds / f"{r['stem']}.png",
                                                            binary_dataset / "masks" / f"{r['stem']}.png"))
        assert float(r["aji"]) == pytest.approx(aggregated_jaccard(pred, truth), abs=1e-6)

    plain = tmp_path / "plain"
    assert main(["evaluate", "--model", str(run), "--out", str(plain), "--device", "cpu"]) == 0
    assert "aji" not in json.loads((plain / "metrics.json").read_text())
    assert "aji" not in (plain / "per_image.csv").read_text().splitlines()[0]
    assert main(["evaluate", "--model", str(run), "--out", str(tmp_path / "x"), "--metrics", "hd95"]) == 2
    assert "not a metric evaluate scores" in capsys.readouterr().err


@pytest.mark.slow
def test_study_metrics_aji_adds_a_column_and_keeps_the_cells(tmp_path, monkeypatch):
    """A study asked for ``aji`` after a cell finished keeps it (cell ids do not depend on the metrics) and
    scores it again into eval/aji/, once; a cell run with ``aji`` asked has it in eval/metrics.json;
    results.csv gains an ``aji`` column and results.md an AJI table."""
    from conftest import write_tiny_study
    from labeldiff.study import execute, report, runner

    path = write_tiny_study(tmp_path / "s", strategies=["scratch"])
    out = tmp_path / "out"
    (first,) = runner.run_study(path, out)
    assert "aji" not in first and "aji" not in report.read_csv(out / "results.csv")[0]

    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "seeds": [0, 1], "metrics": ["dice", "iou", "aji"]}))
    trained, real = [], execute.run_transfer
    monkeypatch.setattr(execute, "run_transfer", lambda cfg, run, *a, **k: trained.append(run.parent.name) or
                        real(cfg, run, *a, **k))
    rows = runner.run_study(path, out)
    old, new = sorted(rows, key=lambda r: r["seed"])
    assert old["cell"] == first["cell"] and old["dice"] == first["dice"] and trained == [new["cell"]]
    old_eval, new_eval = (out / "cells" / old["cell"] / "eval", out / "cells" / new["cell"] / "eval")
    assert old["aji"] == json.loads((old_eval / "aji" / "metrics.json").read_text())["aji"]["mean"]
    assert new["aji"] == json.loads((new_eval / "metrics.json").read_text())["aji"]["mean"]
    assert not (new_eval / "aji").exists() and all(0 <= r["aji"] <= 1 for r in rows)
    assert {r["cell"]: float(r["aji"]) for r in report.read_csv(out / "results.csv")} == pytest.approx(
        {r["cell"]: r["aji"] for r in rows}, abs=1e-6)
    assert "## AJI" in (out / "results.md").read_text()
    assert "# Paired aji difference vs scratch" in (out / "paired.md").read_text()  # the same pairs, by objects
    before = (old_eval / "aji" / "metrics.json").stat().st_mtime_ns
    runner.run_study(path, out, report_only=True)  # scored once
    assert (old_eval / "aji" / "metrics.json").stat().st_mtime_ns == before
