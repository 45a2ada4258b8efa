"""3D metrics against values computed by hand on small synthetic volumes."""
from __future__ import annotations

import math

import numpy as np
import pytest

from labeldiff.evaluate.volume import volume_scores


def blank(shape=(12, 12, 12)) -> np.ndarray:
    return np.zeros(shape, np.int64)


def only(rows, c):
    return next(r for r in rows if r["class"] == c)


def test_identical_cube_scores_perfectly():
    t = blank()
    t[2:6, 2:6, 2:6] = 1
    r = only(volume_scores(t.copy(), t, 2, (1.0, 1.0, 1.0)), 1)
    assert (r["dice"], r["hd95_mm"], r["nsd"]) == (1.0, 0.0, 1.0)


def test_shift_is_measured_in_mm_along_the_anisotropic_axis():
    t, p = blank(), blank()
    t[3, 3, 3] = 1
    p[3, 3, 5] = 1  # 2 voxels along z, 3 mm each: 6 mm
    r = only(volume_scores(p, t, 2, (1.0, 1.0, 3.0)), 1)
    assert r["dice"] == 0.0 and r["hd95_mm"] == pytest.approx(6.0)
    assert r["nsd"] == 0.0  # 6 mm is outside the 2 mm tolerance
    assert only(volume_scores(p, t, 2, (1.0, 1.0, 3.0), tolerance_mm=7.0), 1)["nsd"] == 1.0
    p2 = blank()
    p2[5, 3, 3] = 1  # 2 voxels along x at 0.5 mm: 1 mm
    assert only(volume_scores(p2, t, 2, (0.5, 1.0, 3.0)), 1)["hd95_mm"] == pytest.approx(1.0)


def test_hd95_is_the_95th_percentile_not_the_maximum():
    t, p = blank(), blank()
    t[1, 5, 5] = 1
    p[1, 5, 5] = p[11, 5, 5] = 1  # an outlier 10 mm away
    r = only(volume_scores(p, t, 2, (1.0, 1.0, 1.0)), 1)
    # directed pred → truth distances {0, 10}: 95th percentile 9.5 (linear); truth → pred {0}
    assert r["hd95_mm"] == pytest.approx(9.5)
    # surface Dice: boundary points within 2 mm over all boundary points = (1 + 1) / (2 + 1)
    assert r["nsd"] == pytest.approx(2 / 3)
    assert r["dice"] == pytest.approx(2 * 1 / (2 + 1))


def test_partial_overlap_dice():
    t, p = blank(), blank()
    t[2:6, 2:6, 2:6] = 1
    p[2:6, 2:6, 3:7] = 1
    assert only(volume_scores(p, t, 2, (1.0, 1.0, 1.0)), 1)["dice"] == pytest.approx(2 * 48 / 128)


def test_absent_and_one_sided_classes():
    t, p = blank(), blank()
    t[2:4, 2:4, 2:4] = 1
    p[2:4, 2:4, 2:4] = 1
    t[8:10, 8:10, 8:10] = 3  # class 3 in the truth only; class 2 nowhere
    rows = volume_scores(p, t, 4, (1.0, 1.0, 1.0), class_names=["bg", "liver", "spleen", "aorta"])
    absent = only(rows, 2)
    assert absent["absent"] and all(math.isnan(absent[m]) for m in ("dice", "hd95_mm", "nsd"))
    missed = only(rows, 3)
    assert missed["name"] == "aorta" and not missed["absent"]
    assert missed["dice"] == 0.0 and missed["nsd"] == 0.0
    assert math.isnan(missed["hd95_mm"]) and missed["hd95_undefined"]
    assert [r["class"] for r in rows] == [1, 2, 3]


def test_shape_and_spacing_are_checked():
    with pytest.raises(ValueError, match="differ in shape"):
        volume_scores(blank((4, 4, 4)), blank((4, 4, 5)), 2, (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        volume_scores(blank(), blank(), 2, (1, 1))
