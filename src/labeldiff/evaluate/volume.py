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


# --- predicting a volume, slice by slice, back on the input grid ------------------------------------------------

def predict_volume(model, cfg, channels: list[np.ndarray], axis: int = 2, precision: str = "fp32",
                   tta: bool = False, batch_desc: str | None = None) -> np.ndarray:
    """Label volume of the input's shape from normalised ``channels`` (one float volume per channel,
    already mapped to the network's [-1, 1] range by an :class:`~labeldiff.data.nnunet.Intensity`).

    Each slice along ``axis`` is turned into the image the slice datasets hold
    (:func:`~labeldiff.data.volumes.to_display`: rotate, pad to a square), predicted at that size by
    :func:`~labeldiff.evaluate.predict.predict_logits` (which resizes to the network and back), and
    mapped back with :func:`~labeldiff.data.volumes.from_display`, so every rotation, pad and resize is
    undone and the result lies voxel for voxel on the input grid.
    """
    import torch
    from tqdm.auto import tqdm

    from labeldiff.data.volumes import from_display, to_display
    from labeldiff.evaluate.predict import predict_logits

    shape = channels[0].shape
    if any(c.shape != shape for c in channels):
        raise ValueError(f"channel volumes differ in shape: {[c.shape for c in channels]}")
    if len(shape) != 3 or not 0 <= axis < 3:
        raise ValueError(f"expected 3D volumes and an axis in 0..2, got shape {shape} and axis {axis}")
    out = np.zeros(shape, np.int16)
    for i in tqdm(range(shape[axis]), desc=batch_desc or "predict slices", unit="slice", leave=False):
        slices = [np.take(c, i, axis=axis) for c in channels]
        image = np.stack([to_display(s, fill=-1.0) for s in slices]).astype(np.float32)  # outside = lowest value
        if cfg.channels != image.shape[0]:
            if cfg.channels == 3 and image.shape[0] == 1:
                image = np.repeat(image, 3, axis=0)
            else:
                raise ValueError(f"the model takes {cfg.channels} channel(s); the volume has {image.shape[0]}")
        logits = predict_logits(model, torch.from_numpy(np.ascontiguousarray(image)), cfg, precision, tta=tta)
        label = from_display(logits.argmax(0).numpy(), slices[0].shape)
        index = [slice(None)] * 3
        index[axis] = i
        out[tuple(index)] = label
    return out


def write_label_nifti(labels: np.ndarray, affine: np.ndarray, path, like=None):
    """Save a label volume as NIfTI with ``affine`` (and ``like``'s header where the input was NIfTI:
    its qform / sform codes, units and spacing survive), as 8-bit integers when the classes fit."""
    import nibabel as nib
    from pathlib import Path

    dtype = np.uint8 if labels.max(initial=0) < 256 and labels.min(initial=0) >= 0 else np.int16
    header = like.header.copy() if like is not None else None
    img = nib.Nifti1Image(labels.astype(dtype), affine, header=header)
    img.set_data_dtype(dtype)
    if header is not None:
        img.header["scl_slope"], img.header["scl_inter"] = 1, 0  # labels are never rescaled
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def volume_cases(inputs) -> list[tuple[str, list]]:
    """``(case name, [channel paths])`` of a volume input: a NIfTI file, a DICOM series folder, an
    nnU-Net raw dataset (its ``imagesTs/``), an nnU-Net ``imagesTs``-style folder (``CASE_XXXX``
    files) or a folder of NIfTI files. [] when ``inputs`` holds no volume (2D images)."""
    from pathlib import Path

    from labeldiff.data.nnunet import NnUNetRaw, is_dicom_series, is_nnunet_raw

    inputs = Path(inputs)
    if inputs.is_file():
        name = inputs.name
        for end in NIFTI_ENDINGS:
            if name.endswith(end):
                return [(name[:-len(end)], [inputs])]
        return []
    if is_dicom_series(inputs):
        return [(inputs.name, [inputs])]
    if is_nnunet_raw(inputs):
        cases = NnUNetRaw(inputs).cases("test")
        if not cases:
            from labeldiff.data.io import DataError
            raise DataError(f"{inputs}: an nnU-Net dataset with no imagesTs/ cases; point --input at "
                            f"{inputs / 'imagesTs'} or at one case's file")
        return [(c.name, c.images) for c in cases]
    if not inputs.is_dir():
        return []
    files = sorted(f for f in inputs.iterdir() if f.name.endswith(NIFTI_ENDINGS))
    groups: dict[str, list] = {}
    for f in files:
        stem = next(f.name[:-len(e)] for e in NIFTI_ENDINGS if f.name.endswith(e))
        name, _, ch = stem.rpartition("_")
        key = name if name and len(ch) == 4 and ch.isdigit() else stem  # CASE_0000 → CASE (channel files)
        groups.setdefault(key, []).append(f)
    return sorted(groups.items())


NIFTI_ENDINGS = (".nii.gz", ".nii")


def overlay_strip(channel: np.ndarray, labels: np.ndarray, axis: int, path, n: int = 6,
                  class_names: list[str] | None = None) -> None:
    """``n`` evenly spaced slices with the predicted classes over them, in one PNG, with a legend of the
    classes shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from labeldiff.data.volumes import to_display
    from labeldiff.evaluate.report import colorize, overlay

    idx = np.linspace(0, labels.shape[axis] - 1, min(n, labels.shape[axis])).round().astype(int)
    fig, axes = plt.subplots(1, len(idx), figsize=(2.2 * len(idx), 2.6), squeeze=False)
    lo, hi = np.percentile(channel, [0.5, 99.5])
    for ax, i in zip(axes[0], idx):
        img = to_display(np.clip((np.take(channel, i, axis) - lo) / max(hi - lo, 1e-8), 0, 1) * 2 - 1, -1.0)
        ax.imshow(overlay(img[None], to_display(np.take(labels, i, axis), 0)))
        ax.set_title(f"slice {i}", fontsize=8)
        ax.axis("off")
    shown = [int(c) for c in np.unique(labels) if c > 0]
    colours = colorize(np.array(shown)[None]) / 255.0 if shown else []
    fig.legend([Patch(color=colours[0, j]) for j in range(len(shown))],
               [class_names[c] if class_names and c < len(class_names) else str(c) for c in shown],
               loc="lower center", ncol=min(len(shown), 7), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_predict_volumes(model_dir, inputs, out, axis: int = 2, intensity: str = "percentile",
                        hu_window: tuple[float, float] | None = None, device: str = "auto", tta: bool = False,
                        precision: str = "fp32", class_names: list[str] | None = None) -> list:
    """``labeldiff predict`` on volumes: ``OUT/<case>.nii.gz`` on each input's grid (shape, affine,
    spacing) and ``OUT/overlays/<case>.png``. ``intensity`` must be the one the model's training
    slices had: ``percentile`` for slices written by ``volume_to_slices`` (``prepare: volume-slabs``,
    the demo)."""
    from pathlib import Path

    from tqdm.auto import tqdm

    from labeldiff.data.nnunet import Intensity, dataset_class_names, is_nnunet_raw, read_volume
    from labeldiff.evaluate.run import open_segmenter

    cases = volume_cases(inputs)
    if not cases:
        raise FileNotFoundError(f"{inputs}: no NIfTI volume, DICOM series or nnU-Net case found")
    norm = Intensity(intensity, *(hu_window or ())) if intensity == "ct-window" else Intensity(intensity)
    model, cfg = open_segmenter(Path(model_dir), device)
    if class_names is None:
        class_names = dataset_class_names(inputs) if is_nnunet_raw(inputs) else None
        class_names = class_names or (dataset_class_names(cfg.data.path) if cfg.data.path else None)
    out = Path(out)
    written = []
    for name, paths in tqdm(cases, desc="predict volumes", unit="case"):
        vols = [read_volume(p) for p in paths]
        if any(v.shape != vols[0].shape for v in vols):
            raise ValueError(f"case {name}: channel volumes differ in shape {[v.shape for v in vols]}")
        labels = predict_volume(model, cfg.data, [norm.apply(v.array) for v in vols], axis, precision, tta,
                                batch_desc=name)
        like = None
        if str(paths[0]).endswith(NIFTI_ENDINGS):
            import nibabel as nib
            like = nib.load(str(paths[0]))
        written.append(write_label_nifti(labels, vols[0].affine, out / f"{name}.nii.gz", like=like))
        (out / "overlays").mkdir(parents=True, exist_ok=True)
        overlay_strip(vols[0].array, labels, axis, out / "overlays" / f"{name}.png", class_names=class_names)
    print(f"wrote {len(written)} label volume(s) (NIfTI, the input's grid and affine) to {out}, "
          f"overlay strips to {out / 'overlays'}")
    return written
