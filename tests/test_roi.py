"""A region of interest (``ROOT/roi/``): the retinal case of a circular field of view. Pixels outside it
count for nothing — not in the loss, not in the metrics, not in the probe's samples — whatever the mask
holds there."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from labeldiff.cli import main
from labeldiff.data.folders import ROI_IGNORE, LabeledFolder
from labeldiff.errors import DataError

T = ["--size", "16", "--steps", "2", "--batch-size", "2", "--precision", "fp32", "--device", "cpu",
     "--unet-channels", "8,16", "--attention", "0,0", "--head-channels", "8", "--head-hidden", "8"]
HW = 48


def fundus(root: Path, n: int = 6, garbage: int = 7) -> Path:
    """Fundus-like images: a bright circular field of view with dark vessels (class 1), a bright rim just
    outside it (what a camera leaves), black beyond; the masks hold ``garbage`` outside the circle, which
    a region of interest must make irrelevant."""
    rng = np.random.default_rng(0)
    for sub in ("images", "masks", "roi"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:HW, :HW]
    r = np.hypot(yy - HW / 2, xx - HW / 2)
    inside = r < 20
    stems = []
    for i in range(n):
        vessel = np.zeros((HW, HW), bool)
        for _ in range(3):
            row = int(rng.integers(8, 40))
            vessel[row:row + 2, :] = True
        vessel &= inside
        img = np.zeros((HW, HW, 3), np.uint8)
        img[inside] = (200, 120, 60)
        img[vessel] = (90, 40, 20)
        img[(r >= 20) & (r < 22)] = (250, 250, 250)  # the camera's rim, outside the region of interest
        mask = np.where(inside, vessel.astype(np.uint8), garbage).astype(np.uint8)
        stem = f"eye_{i}"
        Image.fromarray(img).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
        Image.fromarray((inside * 255).astype(np.uint8)).save(root / "roi" / f"{stem}.png")
        stems.append(stem)
    (root / "split.json").write_text(json.dumps({"train": stems[:4], "test": stems[4:]}))
    return root


def test_outside_the_region_of_interest_is_never_read(tmp_path):
    ds = LabeledFolder(fundus(tmp_path / "eyes"))
    ds.ignore_index = ROI_IGNORE
    m = ds.samples(["eye_0"])[0].read_mask(2)
    roi = np.asarray(Image.open(tmp_path / "eyes" / "roi" / "eye_0.png")) > 0
    assert set(np.unique(m[~roi])) == {ROI_IGNORE} and set(np.unique(m[roi])) <= {0, 1}


def test_finetune_and_evaluate_leave_the_outside_out(tmp_path, capsys):
    data = fundus(tmp_path / "eyes")
    out = tmp_path / "ft"
    assert main(["finetune", "--data", str(data), "--out", str(out), "--strategy", "scratch", "--labels", "3",
                 *T]) == 0  # K = 2: the 7s outside the circle are no class
    assert "roi/: pixels outside each image's region of interest are left out" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_classes"] == 2 and cfg["data"]["ignore_index"] == ROI_IGNORE
    assert main(["evaluate", "--model", str(out), "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["roi"] is True
    # the per-image Dice is the Dice inside the circle, computed here by hand from the run's own predictions
    from labeldiff.data.io import read_image
    from labeldiff.evaluate.predict import predict_mask
    from labeldiff.runs import open_segmenter

    model, run = open_segmenter(out, "cpu")
    rows = (tmp_path / "ev" / "per_image.csv").read_text().splitlines()
    header = rows[0].split(",")
    for line in rows[1:]:
        row = dict(zip(header, line.split(",")))
        stem = row["stem"]
        image = torch.from_numpy(read_image(data / "images" / f"{stem}.png", 3))
        pred = predict_mask(model, image, run.data).numpy()
        truth = np.asarray(Image.open(data / "masks" / f"{stem}.png"))
        inside = np.asarray(Image.open(data / "roi" / f"{stem}.png")) > 0
        p, t = pred[inside] == 1, truth[inside] == 1
        dice = 2 * (p & t).sum() / (p.sum() + t.sum()) if p.sum() + t.sum() else float("nan")
        assert float(row["dice_1"]) == pytest.approx(dice, abs=1e-5) or (np.isnan(dice) and row["dice_1"] == "nan")


def test_a_probe_trains_on_the_inside_only(tmp_path):
    data = fundus(tmp_path / "eyes")
    pre, probe = tmp_path / "pre", tmp_path / "probe"
    assert main(["pretrain", "--data", str(data), "--out", str(pre), *T[:-2]]) == 0
    assert main(["finetune", "--data", str(data), "--out", str(probe), "--pretrained", str(pre), "--strategy",
                 "probe", "--labels", "2", "--members", "1", "--device", "cpu"]) == 0
    assert json.loads((probe / "config.json").read_text())["data"]["ignore_index"] == ROI_IGNORE


def test_a_missing_or_misshapen_region_of_interest_is_named(tmp_path, capsys):
    data = fundus(tmp_path / "eyes")
    (data / "roi" / "eye_1.png").unlink()
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "a"), "--strategy", "scratch", "--labels",
                 "3", *T]) == 2
    assert "eye_1" in capsys.readouterr().err and not (tmp_path / "a").exists()
    Image.fromarray(np.full((HW - 1, HW), 255, np.uint8)).save(data / "roi" / "eye_1.png")
    with pytest.raises(DataError, match="region of interest .*eye_1.png is 48×47"):
        ds = LabeledFolder(data)
        ds.ignore_index = ROI_IGNORE
        ds.samples(["eye_1"])[0].read_mask()
    shutil.rmtree(data / "roi")  # without it every pixel counts: the 7s outside the circle become a class
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "b"), "--strategy", "scratch", "--labels",
                 "3", *T]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["num_classes"] == 8
