"""Evaluation overlays: outcome colours (true positive, false positive, false negative, wrong class) on a
real H&E tile, which images a grid keeps, and captions that never collide."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from labeldiff.data.io import read_image, read_mask
from labeldiff.evaluate.overlays import (FN, FP, OUTCOMES, TP, WRONG, Picker, outcome_map, outcome_overlay,
                                         overlay_figure, overlay_row, parse_choice)
from labeldiff.evaluate.report import to_rgb


def test_outcome_map_by_hand():
    """K = 3: the same class is a true positive, predicted foreground on background a false positive, missed
    foreground a false negative, another foreground class a wrong class; ignored pixels are nothing."""
    target = np.array([[0, 0, 1, 1, 2, 255]])
    pred = np.array([[0, 1, 1, 0, 1, 2]])
    assert outcome_map(pred, target).tolist() == [[0, FP, TP, FN, WRONG, WRONG]]
    assert outcome_map(pred, target, ignore_index=255).tolist() == [[0, FP, TP, FN, WRONG, 0]]


def test_outcome_colours_on_a_real_h_and_e_tile(monuseg_small):
    """On a MoNuSeg tile with the nuclei mask shifted as the prediction, every false-positive pixel is the
    false-positive colour (on its edge) or that colour blended 40 % over the tissue (inside), and likewise
    for true positives and false negatives; pixels away from every outcome keep the image's colour."""
    stem = sorted(p.stem for p in (monuseg_small / "images").glob("*.png"))[0]
    image = read_image(monuseg_small / "images" / f"{stem}.png", 3)
    target = read_mask(monuseg_small / "masks" / f"{stem}.png")
    pred = np.roll(target, (2, 3), axis=(0, 1))
    out = outcome_overlay(image, pred, target).astype(int)
    rgb = to_rgb(image).astype(int)
    kinds = outcome_map(pred, target)
    for kind in (TP, FP, FN):
        region = kinds == kind
        assert region.sum() > 10, kind
        colour = np.array(OUTCOMES[kind][1])
        solid = np.all(out[region] == colour, axis=1)
        blend = np.all(np.abs(out[region] - (0.6 * rgb[region] + 0.4 * colour)) <= 1, axis=1)
        assert solid.any() and np.all(solid | blend), kind
    from scipy.ndimage import binary_dilation

    far = ~binary_dilation(kinds > 0, iterations=2)
    assert np.array_equal(out[far], rgb[far])
    row = overlay_row(image, pred, target, 2)
    assert row.shape == (64, 2 * 64 + 4, 3) and np.array_equal(row[:, :64], rgb)


def test_picker_keeps_the_first_worst_best_or_named():
    dice = {"a": 0.9, "b": 0.2, "c": math.nan, "d": 0.5, "e": 0.2, "f": 0.95}

    def pick(how, count=2, stems=None):
        p = Picker(how, count, stems)
        for name, d in dice.items():
            p.offer({"name": name, "dice": d})
        return [r["name"] for r in p.rows()]

    assert pick("first") == pick("all") == ["a", "b"]
    assert pick("worst") == ["b", "e"] and pick("worst", 3) == ["b", "e", "d"]  # ties: the earlier first
    assert pick("best") == ["f", "a"] and pick("best", 6)[-1] == "c"  # no Dice (empty vs empty): last
    assert pick("worst", 6)[-1] == "c"
    assert pick("named", stems=["d", "a"]) == ["d", "a"]
    assert parse_choice(None) == ("first", []) and parse_choice("worst") == ("worst", [])
    assert parse_choice("img_1, img_2") == ("named", ["img_1", "img_2"])


def _extents(fig):
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    texts = [t for t in [fig._suptitle] + [ax.title for ax in fig.axes] if t is not None and t.get_text()]
    return ([t.get_window_extent(r) for t in texts] + [lg.get_window_extent(r) for lg in fig.legends],
            [ax.get_window_extent(r) for ax in fig.axes])


@pytest.mark.parametrize("k", [2, 3])
def test_captions_title_and_legend_never_collide(k):
    """Long stems, a long title, three rows: no two texts (title, every caption, the legend) overlap, and
    no caption lies over another row's picture."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        target = rng.integers(0, k, (40, 60))
        rows.append({"name": f"TCGA-2Z-A9J9-01A-01-TS1_a_very_long_stem_{i}_" + "x" * 30, "image":
                     rng.uniform(-1, 1, (3, 40, 60)).astype(np.float32), "target": target,
                     "pred": np.roll(target, 3, axis=1), "dice": 0.5 + i / 10})
    fig = overlay_figure(rows, k, title="a_run_with_a_long_name on test (14 images, mean foreground Dice 0.812): "
                                        "the 3 worst by foreground Dice, a title longer than two panels are wide")
    boxes, panels = _extents(fig)
    assert len(boxes) == 1 + 3 * (4 if k > 2 else 2) + 1
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    whole = fig.bbox
    for a in boxes:
        assert sum(a.overlaps(p) for p in panels) == 0
        assert whole.x0 <= a.x0 and a.x1 <= whole.x1 and whole.y0 <= a.y0 and a.y1 <= whole.y1  # none cut off
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:3] == ["true positive", "false positive", "false negative"]
    assert ("wrong class" in legend) == (k > 2)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_study_overlays_use_the_outcome_colours(monuseg_small, tmp_path):
    """A study's overlays.png (image | ground truth | one outcome panel per setting) still draws."""
    from labeldiff.study.plots import plot_overlays

    stems = sorted(p.stem for p in (monuseg_small / "images").glob("*.png"))[:2]
    images = [{"name": s, "image": read_image(monuseg_small / "images" / f"{s}.png", 3),
               "target": read_mask(monuseg_small / "masks" / f"{s}.png")} for s in stems]
    preds = {"ddpm / full": [np.roll(im["target"], 2, axis=0) for im in images],
             "none / scratch": [np.zeros_like(im["target"]) for im in images]}
    plot_overlays(images, preds, tmp_path / "overlays.png", title="k = 2, seed 0", num_classes=2)
    with Image.open(tmp_path / "overlays.png") as im:
        assert im.size[0] > im.size[1] > 300
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    fn = np.array(OUTCOMES[FN][1])
    assert (np.abs(pixels - fn).sum(1) < 30).sum() > 20  # the all-background prediction misses every nucleus
