"""Object-level scores of semantic masks: the Aggregated Jaccard Index (AJI; Kumar et al. 2017, "A dataset
and a technique for generalized nuclear segmentation", IEEE TMI 36(7), Sec. IV; the MoNuSeg metric).

Our masks carry class ids, not instance ids, so the objects are the connected components of each
foreground class, in the ground truth and in the prediction, with full connectivity (8 neighbours in 2D,
26 in 3D): two touching nuclei are one object. This is the AJI of the components, not of instance labels,
and neither bounds the other: where touching nuclei are one component of the truth, a prediction that
merges them is not penalised for it (AJI of instance labels would count the blob in the union once per
nucleus), and one that separates them is (the second half is an unmatched object). Compare it only with
AJI computed the same way, not with published AJI on MoNuSeg's instance labels.

Per class: for each truth object G_i take the predicted object S_j of largest IoU with it (the lowest
label on a tie); C += |G_i ∩ S_j|, U += |G_i ∪ S_j|. A truth object no prediction touches adds |G_i| to U,
and each predicted object chosen by no truth object adds its area to U. AJI = C / U. A predicted object
may be chosen by several truth objects (one blob over two nuclei): its pixels count in U each time, as in
the original. No objects in truth and prediction (U = 0) is NaN, left out of the means like Dice's empty
case; objects in only one of them score 0. Stats, then reductions: :func:`aji_stats` counts (C, U) per
class, :func:`aji_from_stats` divides.
"""
from __future__ import annotations

import numpy as np

from labeldiff.errors import ConfigError
from labeldiff.evaluate.metrics import _nanmean

INSTANCE_METRICS = ("aji",)  # scored when asked: labeldiff evaluate --metrics aji, a study's metrics: [..., aji]


def connected_objects(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the connected components of a boolean ``mask`` (any dimension, full connectivity: 8 neighbours
    in 2D): an int32 map of the same shape, 0 = background, objects 1..n, and n."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, mask.ndim))
    return labels, int(n)


def object_stats(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """AJI's (C, U) of two boolean foreground masks of the same shape, their objects their connected
    components (:func:`connected_objects`).

    The pairs of objects that overlap come from one sparse contingency table: the (truth, prediction)
    label pairs of the pixels in both foregrounds, counted with ``np.unique``. A dense
    ``np.bincount`` table would hold n_truth × n_pred entries, 10⁸ for a speckled prediction of 10⁵
    blobs against 10³ nuclei; this one holds only the overlapping pairs.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    gt, n = connected_objects(target)
    pr, m = connected_objects(pred)
    gt_area = np.bincount(gt.ravel(), minlength=n + 1)[1:].astype(np.int64)  # [n]: object i + 1
    pr_area = np.bincount(pr.ravel(), minlength=m + 1)[1:].astype(np.int64)  # [m]
    both = (gt > 0) & (pr > 0)
    pairs, inter = np.unique(gt[both].astype(np.int64) * (m + 1) + pr[both], return_counts=True)
    gi, pj = pairs // (m + 1) - 1, pairs % (m + 1) - 1  # 0-based object indices of each overlapping pair
    union = gt_area[gi] + pr_area[pj] - inter
    iou = inter / union
    # per truth object its best pair: sort by object, then IoU descending, then prediction label ascending
    order = np.lexsort((pj, -iou, gi))
    first = np.ones(order.size, dtype=bool)
    first[1:] = gi[order][1:] != gi[order][:-1]
    best = order[first]
    matched_gt = np.zeros(n, dtype=bool)
    matched_gt[gi[best]] = True
    used_pr = np.zeros(m, dtype=bool)
    used_pr[pj[best]] = True
    c = int(inter[best].sum())
    u = int(union[best].sum() + gt_area[~matched_gt].sum() + pr_area[~used_pr].sum())
    return c, u


def aji_stats(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """Per-class ``[K, 2]`` AJI counts (C, U) of two integer maps of the same shape (``[H, W]``), the objects
    of class c being the connected components of ``== c`` (:func:`object_stats`); row 0, the background,
    is not scored (zeros). Pixels whose target is ``ignore_index`` are background in both maps before the
    components are labelled, so an ignored band can split an object in two."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    keep = np.ones(target.shape, dtype=bool) if ignore_index is None else target != ignore_index
    stats = np.zeros((num_classes, 2), dtype=np.int64)
    for c in range(1, num_classes):
        stats[c] = object_stats((pred == c) & keep, (target == c) & keep)
    return stats


def aji_from_stats(stats: np.ndarray) -> np.ndarray:
    """AJI = C / U per entry of ``stats[..., 2]``; NaN where U = 0 (no objects in truth or prediction)."""
    c, u = stats[..., 0].astype(float), stats[..., 1].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(u > 0, c / u, np.nan)


def aggregated_jaccard(pred: np.ndarray, target: np.ndarray, ignore_index: int | None = None) -> float:
    """AJI of two binary masks (0 background, 1 foreground; a bool mask is fine), ``ignore_index`` as in
    :func:`aji_stats`; NaN when neither has an object."""
    return float(aji_from_stats(aji_stats(np.asarray(pred), np.asarray(target), 2, ignore_index))[1])


def summarize_aji(per_image_stats: np.ndarray, class_names: list[str] | None = None) -> dict:
    """Reduce ``[N, K, 2]`` AJI counts to metrics.json's ``aji`` entry, as
    :func:`~labeldiff.evaluate.metrics.summarize` does Dice: ``per_class`` is each foreground class's mean
    AJI over images (NaN images left out, counted in ``n_empty``), ``mean`` the mean of those over the
    foreground classes."""
    n, k, _ = per_image_stats.shape
    names = class_names or [str(c) for c in range(k)]
    scores = aji_from_stats(per_image_stats)[:, 1:]  # [N, K - 1]
    per_class = _nanmean(scores, axis=0)
    return {"mean": float(_nanmean(np.asarray(per_class))),
            "per_class": {names[c]: float(per_class[c - 1]) for c in range(1, k)},
            "n_empty": {names[c]: int(np.isnan(scores[:, c - 1]).sum()) for c in range(1, k)},
            "reduction": "per-image AJI of the connected components (8-connected), nanmean over images, then mean "
                         "over foreground classes"}


def per_image_columns(stats: np.ndarray) -> dict[str, float]:
    """per_image.csv's AJI columns of one image's ``[K, 2]`` counts: ``aji``, the mean over the foreground
    classes that have objects (NaN where none has), and with K > 2 ``aji_<c>`` per foreground class."""
    scores = aji_from_stats(stats)[1:]
    row = {"aji": round(float(np.nanmean(scores)), 6) if np.isfinite(scores).any() else float("nan")}
    if len(scores) > 1:
        row.update({f"aji_{c}": round(float(v), 6) for c, v in enumerate(scores, 1)})
    return row


def parse_metrics(text: str | None) -> list[str]:
    """``--metrics aji``: the metrics scored besides Dice and IoU (which are always scored, so naming them
    is allowed and changes nothing)."""
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    wrong = [t for t in names if t not in ("dice", "iou", *INSTANCE_METRICS)]
    if wrong:
        raise ConfigError(f"--metrics {text}: {', '.join(wrong)} is not a metric evaluate scores; use a comma list "
                          f"of {', '.join(INSTANCE_METRICS)} (Dice and IoU are always scored)")
    return [t for t in dict.fromkeys(names) if t in INSTANCE_METRICS]
