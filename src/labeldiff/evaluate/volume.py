"""Per-volume, per-class 3D metrics: Dice, 95th-percentile Hausdorff distance and normalised surface
Dice, in millimetres from the voxel spacing.

Dice comes from the same confusion stats as the 2D metrics (:mod:`labeldiff.evaluate.metrics`); the
surface metrics are MONAI's (``compute_hausdorff_distance`` with ``percentile=95``,
``compute_surface_dice``), one class at a time so that memory stays one binary volume per class.

Conventions (the tests pin them):

- a class absent from both the prediction and the ground truth has no score: every metric is NaN,
  and ``absent`` is True (counted, never 0);
- a class on one side only: Dice 0 and surface Dice 0; HD95 is undefined (NaN) and ``hd95_undefined``
  is True, so a mean over cases says how many it left out.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from labeldiff.evaluate.metrics import confusion_stats, dice_from_stats

NSD_TOLERANCE_MM = 2.0  # normalised surface Dice tolerance (the FLARE challenges' organ setting is 1–2 mm)


def surface_metrics(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, ...],
                    tolerance_mm: float = NSD_TOLERANCE_MM) -> tuple[float, float]:
    """(HD95 in mm, surface Dice at ``tolerance_mm``) of two non-empty boolean volumes."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32))[None, None]
    t = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))[None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI deprecation notes inside its edge helper
        hd = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=list(spacing))
        nsd = compute_surface_dice(p, t, class_thresholds=[tolerance_mm], include_background=True,
                                   spacing=list(spacing))
    return float(hd.item()), float(nsd.item())


def volume_scores(pred: np.ndarray, target: np.ndarray, num_classes: int, spacing: tuple[float, ...],
                  class_names: list[str] | None = None, tolerance_mm: float = NSD_TOLERANCE_MM) -> list[dict]:
    """One row per foreground class: ``{class, name, dice, hd95_mm, nsd, absent, hd95_undefined,
    voxels_true, voxels_pred}``."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and label volume {target.shape} differ in shape")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values for a {pred.ndim}D volume")
    stats = confusion_stats(pred, target, num_classes)
    dice = dice_from_stats(stats)
    rows = []
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        n_p, n_t = int(p.sum()), int(t.sum())
        row = {"class": c, "name": class_names[c] if class_names else str(c), "dice": float(dice[c]),
               "hd95_mm": math.nan, "nsd": math.nan, "absent": n_p == 0 and n_t == 0,
               "hd95_undefined": (n_p == 0) != (n_t == 0), "voxels_true": n_t, "voxels_pred": n_p}
        if n_p and n_t:
            row["hd95_mm"], row["nsd"] = surface_metrics(p, t, spacing, tolerance_mm)
        elif n_p or n_t:
            row["nsd"] = 0.0
        rows.append(row)
    return rows
