"""Segmentation metrics as stats, then reductions (checked against MONAI in the tests).

Per image and class we count tp, fp, fn. Dice = 2tp / (2tp + fp + fn), IoU = tp / (tp + fp + fn).
A class absent from both prediction and ground truth of an image (empty vs empty) has no defined
score: it is NaN, counted in ``n_empty``, and left out of the means ("nanmean" reduction). A class
absent from the ground truth but predicted scores 0.
"""
from __future__ import annotations

import numpy as np


def confusion_stats(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """Per-class ``[K, 3]`` counts (tp, fp, fn) of two integer maps of the same shape; pixels whose
    target is ``ignore_index`` are left out."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    idx = target.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
    cm = np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)  # [true, pred]
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    return np.stack([tp, fp, fn], axis=1)


def dice_from_stats(stats: np.ndarray) -> np.ndarray:
    """Dice per entry of ``stats[..., 3]``; NaN where tp + fp + fn = 0 (empty vs empty)."""
    tp, fp, fn = stats[..., 0].astype(float), stats[..., 1].astype(float), stats[..., 2].astype(float)
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, np.nan)


def iou_from_stats(stats: np.ndarray) -> np.ndarray:
    tp, fp, fn = stats[..., 0].astype(float), stats[..., 1].astype(float), stats[..., 2].astype(float)
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / denom, np.nan)


def _nanmean(x: np.ndarray, axis=None):
    with np.errstate(invalid="ignore"):
        if np.all(np.isnan(x)):
            return float("nan") if axis is None else np.full(np.delete(x.shape, axis), np.nan)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(x, axis=axis)


def summarize(per_image_stats: np.ndarray, class_names: list[str] | None = None) -> dict:
    """Reduce ``[N, K, 3]`` stats to the metrics.json structure.

    ``per_class`` is the mean over images of each class's score (NaN cases skipped);
    ``mean`` is the mean over foreground classes (1..K-1) of ``per_class``;
    ``mean_with_background`` includes class 0. Reduction: per image, then over images, then classes.
    """
    n, k, _ = per_image_stats.shape
    names = class_names or [str(c) for c in range(k)]
    out: dict = {"n_images": int(n), "reduction": "per-image score, nanmean over images, then mean over classes"}
    for metric, fn in (("dice", dice_from_stats), ("iou", iou_from_stats)):
        scores = fn(per_image_stats)  # [N, K]
        per_class = _nanmean(scores, axis=0)
        fg = per_class[1:] if k > 1 else per_class
        out[metric] = {
            "mean": float(_nanmean(np.asarray(fg))),
            "mean_with_background": float(_nanmean(np.asarray(per_class))),
            "per_class": {names[c]: float(per_class[c]) for c in range(k)},
            "n_empty": {names[c]: int(np.isnan(scores[:, c]).sum()) for c in range(k)},
        }
    return out
