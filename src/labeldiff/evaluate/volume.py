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

NIFTI_ENDINGS = (".nii.gz", ".nii")
NSD_TOLERANCE_MM = 2.0  # normalised surface Dice tolerance (the FLARE challenges' organ setting is 1–2 mm)


def surface_metrics(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, ...],
                    tolerance_mm: float = NSD_TOLERANCE_MM) -> tuple[float, float]:
    """(HD95 in mm, surface Dice at ``tolerance_mm``) of two non-empty boolean volumes, from one pass of
    MONAI's edge distances in both directions (what ``compute_hausdorff_distance(percentile=95)`` and
    ``compute_surface_dice`` each compute again; a test checks both against them)."""
    import torch
    from monai.metrics.utils import get_edge_surface_distance

    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=bool))
    t = torch.from_numpy(np.ascontiguousarray(target, dtype=bool))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI deprecation notes inside its edge helper
        _, (to_target, to_pred), _ = get_edge_surface_distance(p, t, spacing=list(spacing), symmetric=True)
    hd95 = max(float(torch.quantile(d.double(), 0.95)) for d in (to_target, to_pred))
    within = int((to_target <= tolerance_mm).sum()) + int((to_pred <= tolerance_mm).sum())
    return hd95, within / (len(to_target) + len(to_pred))


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

SLICE_BATCH = 8  # slices per forward: one network call for several slices (the same per slice, faster)


def predict_volume(model, cfg, volumes: list, axis: int = 2, precision: str = "fp32", tta: bool = False,
                   desc: str | None = None, only: tuple[int, int] | None = None,
                   batch_size: int = SLICE_BATCH) -> np.ndarray:
    """Label volume of the input's shape from normalised channel :class:`~labeldiff.data.volume_io.Volume`s.

    Each slice along ``axis`` becomes the network input training builds for it
    (:func:`~labeldiff.data.slices.slice_image`: rotate, pad to a square), is predicted at that size by
    :func:`~labeldiff.evaluate.predict.predict_logits` (which resizes to the network and back), and is
    mapped back with :func:`~labeldiff.data.geometry.from_display`, so every rotation, pad and resize is
    undone and the result lies voxel for voxel on the input grid. ``only = (first, last)`` predicts just
    those slices (a scored slab); the others stay 0. ``batch_size`` slices go through the network at once
    (all slices of an axis have one size); each slice's labels are those it gets on its own.
    """
    import torch
    from tqdm.auto import tqdm

    from labeldiff.data.geometry import from_display
    from labeldiff.data.slices import slice_image
    from labeldiff.evaluate.predict import predict_logits

    shape = volumes[0].shape
    if any(v.shape != shape for v in volumes):
        raise ValueError(f"channel volumes differ in shape: {[v.shape for v in volumes]}")
    if len(shape) != 3 or not 0 <= axis < 3:
        raise ValueError(f"expected 3D volumes and an axis in 0..2, got shape {shape} and axis {axis}")
    out = np.zeros(shape, np.int16)
    plane = tuple(n for i, n in enumerate(shape) if i != axis)
    first, last = only if only is not None else (0, shape[axis] - 1)
    todo = list(range(max(first, 0), min(last, shape[axis] - 1) + 1))
    with tqdm(total=len(todo), desc=desc or "predict slices", unit="slice", leave=False) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            images = torch.stack([torch.from_numpy(slice_image(volumes, axis, i, cfg.channels)) for i in chunk])
            labels = predict_logits(model, images, cfg, precision, tta=tta).argmax(1).numpy()
            for i, lab in zip(chunk, labels):
                index = [slice(None)] * 3
                index[axis] = i
                out[tuple(index)] = from_display(lab, plane)
            bar.update(len(chunk))
    return out


def predict_case(model, cfg, paths: list, intensity, axis: int, precision: str = "fp32", tta: bool = False,
                 desc: str | None = None, only: tuple[int, int] | None = None):
    """Read a case's channel files, bring them to the RAS frame the model trained in (resampled to
    ``cfg.spacing`` when the run resamples, as its training slices were), normalise them and predict:
    ``(normalised canonical channel volumes, canonical label volume, the orientation back to the input's
    voxel order, the input's affine)``. Volumes and labels lie on the input's own canonical grid: a
    prediction made on a resampled grid is put back on it by nearest neighbour. ``only``: predict just
    those slices of the input's grid (see :func:`predict_volume`); ignored when the run resamples."""
    from labeldiff.data.geometry import canonical, resample, resample_labels_to
    from labeldiff.data.volume_io import Volume, read_volume

    affine = None
    canon = []
    for p in paths:
        vol = read_volume(p)
        affine = vol.affine if affine is None else affine
        canon.append(canonical(vol))
    back, own = canon[0][1], canon[0][0]
    spacing = getattr(cfg, "spacing", None)
    if spacing is None:  # one normalised copy, predicted on and returned
        vols = [Volume(intensity.apply(v.array), v.affine) for v, _ in canon]
        return vols, predict_volume(model, cfg, vols, axis, precision, tta, desc, only), back, affine
    # the grid training sliced (resampled, then normalised), predicted on and freed; labels back on the input's
    grid = [Volume(intensity.apply(r.array), r.affine) for r in (resample(v, spacing) for v, _ in canon)]
    labels = resample_labels_to(predict_volume(model, cfg, grid, axis, precision, tta, desc), grid[0].affine,
                                own.shape, own.affine)
    del grid
    return [Volume(intensity.apply(v.array), v.affine) for v, _ in canon], labels, back, affine


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

    from labeldiff.data.nnunet import NnUNetRaw, is_nnunet_raw
    from labeldiff.data.volume_io import is_dicom_series

    inputs = Path(inputs)
    if inputs.is_file():
        end = next((e for e in NIFTI_ENDINGS if inputs.name.endswith(e)), None)
        return [(case_name(inputs.name[:-len(end)]), [inputs])] if end else []
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
        groups.setdefault(case_name(stem), []).append(f)
    return sorted(groups.items())


def case_name(stem: str) -> str:
    """nnU-Net's ``CASE_0000`` (channel 0 of CASE) → ``CASE``; any other stem as it is."""
    name, _, ch = stem.rpartition("_")
    return name if name and len(ch) == 4 and ch.isdigit() else stem



def overlay_strip(channel: np.ndarray, labels: np.ndarray, axis: int, path, n: int = 6,
                  class_names: list[str] | None = None, truth: np.ndarray | None = None, title: str = "",
                  first: int = 0) -> None:
    """``n`` evenly spaced slices with the predicted classes over them (and, given ``truth``, a row with
    the ground truth above), in one PNG with a legend naming the classes shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from labeldiff.data.geometry import to_display
    from labeldiff.data.nnunet import Intensity
    from labeldiff.evaluate.report import class_legend, overlay

    idx = np.linspace(0, labels.shape[axis] - 1, min(n, labels.shape[axis])).round().astype(int)
    rows = [("truth", truth), ("prediction", labels)] if truth is not None else [("prediction", labels)]
    fig, axes = plt.subplots(len(rows), len(idx), figsize=(2.2 * len(idx), 2.3 * len(rows) + 0.5), squeeze=False)
    shown = Intensity("percentile").apply(channel)  # any scheme's volume, shown in [-1, 1]
    for r, (label, vol) in enumerate(rows):
        for ax, i in zip(axes[r], idx):
            img = to_display(np.take(shown, i, axis), -1.0)
            ax.imshow(overlay(img[None], to_display(np.take(vol, i, axis), 0)))
            ax.set_title(f"{label}, slice {first + i}", fontsize=7)
            ax.axis("off")
    class_legend(fig, [labels, truth], class_names)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize_volumes(rows: list[dict], class_names: list[str]) -> dict:
    """Per class over cases: mean Dice / HD95 / NSD over the cases where each is defined, with the
    counts of cases left out (absent class, undefined HD95); ``dice`` is the mean over classes."""
    per_class = {}
    for c, name in enumerate(class_names):
        if c == 0:
            continue
        rs = [r for r in rows if r["class"] == c]

        def mean(key):
            v = [r[key] for r in rs if not math.isnan(r[key])]
            return round(float(np.mean(v)), 6) if v else None

        per_class[name] = {"dice": mean("dice"), "hd95_mm": mean("hd95_mm"), "nsd": mean("nsd"), "cases": len(rs),
                           "absent": sum(r["absent"] for r in rs),
                           "hd95_undefined": sum(r["hd95_undefined"] for r in rs)}
    dices = [v["dice"] for v in per_class.values() if v["dice"] is not None]
    return {"dice": round(float(np.mean(dices)), 6) if dices else None, "per_class": per_class}


def class_mean(per_class: dict, key: str) -> float | None:
    """Mean of ``key`` (dice, hd95_mm, nsd) over the classes of :func:`summarize_volumes`' ``per_class``
    where it is defined (an HD95 is undefined for a class predicted nowhere); None when it is nowhere."""
    values = [c[key] for c in per_class.values() if c[key] is not None]
    return float(np.mean(values)) if values else None


def run_evaluate_volumes(model_dir, data, out, split: str = "test", axis: int | None = None,
                         intensity: str | None = None,
                         hu_window: tuple[float, float] | None = None, slab: tuple[int, int] | None = None,
                         device: str = "auto", precision: str = "fp32", tta: bool = False,
                         tolerance_mm: float = NSD_TOLERANCE_MM, slabs: dict[str, tuple[int, int]] | None = None,
                         quiet: bool = False) -> dict:
    """``labeldiff evaluate`` on an nnU-Net raw dataset: predict every labeled case of ``split`` (train:
    imagesTr + labelsTr; test: imagesTs + labelsTs), optionally only slices ``slab = (first, last)``
    along ``axis`` (a test slab of a volume whose other slab was labeled for training), and score it
    per volume and class in 3D. ``slabs`` (case → (first, last), :func:`split_slabs`) scores those
    cases of any split, each on its own slab, instead. Scores are always on each case's own grid and
    spacing: ``slab`` counts its slices; ``slabs`` count the dataset's slices (on the resampled grid
    when the run resamples: ``data.spacing``) and are mapped onto it. Writes ``metrics.json``,
    ``per_case.csv`` and ``overlays/<case>.png``."""
    import csv
    import json
    from pathlib import Path

    from tqdm.auto import tqdm

    from labeldiff.checkpoint import atomic_write_text
    from labeldiff.data.geometry import canonical, canonical_geometry, resampled_geometry, slab_on_grid
    from labeldiff.data.io import DataError
    from labeldiff.data.nnunet import NnUNetRaw
    from labeldiff.data.slices import LABEL_DTYPE
    from labeldiff.data.volume_io import read_volume
    from labeldiff.runs import open_segmenter

    raw = NnUNetRaw(data)
    if slabs is not None:
        cases = [c for part in ("train", "test") for c in raw.cases(part) if c.label is not None and c.name in slabs]
    else:
        cases = [c for c in raw.cases(split) if c.label is not None]
    if not cases:
        raise DataError(f"{data}: no labeled {split} case (split train reads imagesTr + labelsTr, test imagesTs + "
                        f"labelsTs); pass --split train with --slab FIRST:LAST to score a held-out slab")
    model, cfg = open_segmenter(model_dir, device)
    if cfg.num_classes != raw.num_classes:
        raise DataError(f"{data}: dataset.json names {raw.num_classes} classes but the model predicts "
                        f"{cfg.num_classes}; evaluate it on the dataset it was trained for")
    norm, axis = run_intensity(cfg, intensity, hu_window), cfg.data.axis if axis is None else axis
    names = raw.class_names
    from labeldiff.data.guard import check_output_folder

    out = check_output_folder(Path(out))
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    rows, scored = [], {}
    for case in tqdm(cases, desc=f"evaluate {split} volumes", unit="case", disable=quiet):
        case_slab = slabs[case.name] if slabs is not None else slab
        if slabs is not None and cfg.data.spacing is not None:  # the dataset's slab, on the resampled grid
            shape, own = canonical_geometry(case.images[0])
            case_slab = slab_on_grid(*case_slab, axis, resampled_geometry(shape, own, cfg.data.spacing)[1], own,
                                     shape[axis])
        vols, pred, _, _ = predict_case(model, cfg.data, case.images, norm, axis, precision, tta, case.name,
                                        only=case_slab)  # the slices scored, no more
        truth = canonical(read_volume(case.label, LABEL_DTYPE))[0].array  # the RAS frame: --slab counts along it
        if case_slab is not None:
            first, last = case_slab
            if not 0 <= first <= last < truth.shape[axis]:
                raise ValueError(f"--slab {first}:{last} lies outside 0..{truth.shape[axis] - 1} along axis {axis}")
            keep = [slice(None)] * 3
            keep[axis] = slice(first, last + 1)
            pred, truth, image = pred[tuple(keep)], truth[tuple(keep)], vols[0].array[tuple(keep)]
            scored[case.name] = [first, last]
        else:
            image = vols[0].array
        for r in volume_scores(pred, truth, raw.num_classes, vols[0].spacing, names, tolerance_mm):
            rows.append({"case": case.name, **r})
        overlay_strip(image, pred, axis, out / "overlays" / f"{case.name}.png", class_names=names, truth=truth,
                      title=f"{case.name}" + (f", slices {case_slab[0]}–{case_slab[1]}" if case_slab else ""),
                      first=case_slab[0] if case_slab else 0)
    metrics = summarize_volumes(rows, names)
    metrics.update({"model": str(model_dir), "data": str(data), "split": split, "axis": axis, "slab": slab,
                    "slabs": slabs, "scored_slabs": scored,  # scored: on each case's own grid
                    "intensity": norm.to_dict(), "spacing": cfg.data.spacing, "nsd_tolerance_mm": tolerance_mm,
                    "precision": precision,
                    "cases": [c.name for c in cases]})
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    with open(out / "per_case.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"{split}: {len(cases)} volume(s), 3D Dice {metrics['dice']:.4f} (mean over foreground classes); "
          f"wrote {out}/metrics.json, per_case.csv, overlays/")
    for name, v in ({} if quiet else metrics["per_class"]).items():
        hd = "–" if v["hd95_mm"] is None else f"{v['hd95_mm']:.1f} mm"
        d = "absent" if v["dice"] is None else f"{v['dice']:.3f}"
        print(f"  {name:<22} Dice {d:<7} HD95 {hd:<9} NSD@{tolerance_mm:g}mm "
              f"{'–' if v['nsd'] is None else format(v['nsd'], '.3f')}")
    return metrics


def split_slabs(ds, stems: list[str]) -> dict[str, tuple[int, int]]:
    """Case → (first, last) slice index of ``stems`` (slices of a
    :class:`~labeldiff.data.folders.VolumeFolder`, e.g. its test split): the slab each case is scored
    on in 3D. Every slice from first to last is scored, with or without labeled pixels."""
    out: dict[str, tuple[int, int]] = {}
    for stem in stems:
        case, i = ds.case_of(stem), ds.refs[stem].index
        first, last = out.get(case, (i, i))
        out[case] = (min(first, i), max(last, i))
    return out


def run_intensity(cfg, scheme: str | None = None, hu_window: tuple[float, float] | None = None):
    """The intensity scheme to predict with: ``scheme`` when given, else the one the run trained with
    (``data.intensity``; fitted statistics included), else ``percentile`` (runs trained on slices that
    ``volume_to_slices`` wrote)."""
    from labeldiff.data.nnunet import Intensity

    if scheme is not None or hu_window is not None:
        return Intensity.named(scheme or "percentile", hu_window)
    return Intensity.from_dict(cfg.data.intensity) if cfg.data.intensity else Intensity("percentile")


def run_predict_volumes(model_dir, inputs, out, axis: int | None = None, intensity: str | None = None,
                        hu_window: tuple[float, float] | None = None, device: str = "auto", tta: bool = False,
                        precision: str = "fp32", class_names: list[str] | None = None, overwrite: bool = False) -> list:
    """``labeldiff predict`` on volumes: ``OUT/<case>.nii.gz`` on each input's grid (shape, affine,
    spacing) and ``OUT/overlays/<case>.png``. The intensity scheme is the run config's unless
    ``intensity`` overrides it; it must be what the training slices had (``percentile`` for slices
    written by ``volume_to_slices``)."""
    from pathlib import Path

    from tqdm.auto import tqdm

    from labeldiff.data.geometry import from_canonical
    from labeldiff.data.nnunet import dataset_class_names, is_nnunet_raw
    from labeldiff.runs import open_segmenter

    from labeldiff.data.guard import check_output_folder, refuse_existing

    cases = volume_cases(inputs)
    if not cases:
        raise FileNotFoundError(f"{inputs}: no NIfTI volume, DICOM series or nnU-Net case found")
    out = check_output_folder(Path(out), reads=(inputs,))
    refuse_existing([p for name, _ in cases for p in (Path(out) / f"{name}.nii.gz", Path(out) / "overlays" / f"{name}.png")],
                    overwrite)
    model, cfg = open_segmenter(model_dir, device)
    norm, axis = run_intensity(cfg, intensity, hu_window), cfg.data.axis if axis is None else axis
    if class_names is None:
        class_names = dataset_class_names(inputs) if is_nnunet_raw(inputs) else None
        class_names = class_names or (dataset_class_names(cfg.data.path) if cfg.data.path else None)
    out = Path(out)
    written = []
    for name, paths in tqdm(cases, desc="predict volumes", unit="case"):
        vols, labels, back, affine = predict_case(model, cfg.data, paths, norm, axis, precision, tta, name)
        (out / "overlays").mkdir(parents=True, exist_ok=True)
        overlay_strip(vols[0].array, labels, axis, out / "overlays" / f"{name}.png", class_names=class_names,
                      title=name)  # drawn in the RAS frame: anterior up, as the model saw the slices
        labels = from_canonical(labels, back)  # back to the input's voxel order
        like = None
        if str(paths[0]).endswith(NIFTI_ENDINGS):
            import nibabel as nib
            like = nib.load(str(paths[0]))
        written.append(write_label_nifti(labels, affine, out / f"{name}.nii.gz", like=like))
    print(f"wrote {len(written)} label volume(s) (NIfTI, the input's grid and affine) to {out}, "
          f"overlay strips to {out / 'overlays'}")
    return written
