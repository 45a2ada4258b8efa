"""Volumes (NIfTI via nibabel) → 2D slice datasets in the standard folder layout.

``volume_to_slices`` reads a volume and an optional label volume lazily, slice by slice along a
chosen axis, normalises intensities as the CT paper does (clip to the 0.5 / 99.5 percentiles of
the volume, scale to [0, 255]), and writes ``images/`` and ``masks/`` so that every command of
labeldiff reads the result like any other labeled dataset (a split of its slices:
:func:`labeldiff.data.splits.slab_splits` and :func:`~labeldiff.data.splits.save_split`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from labeldiff.data.geometry import to_display
from labeldiff.data.io import DataError
from labeldiff.data.nnunet import volume_percentiles


def _load(path: Path):
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as e:  # nibabel raises several types for unreadable files
        raise DataError(f"{path}: cannot be read as a NIfTI volume ({e})") from None


def volume_to_slices(volume: Path, out: Path, labels: Path | None = None, axis: int = 2,
                     size: int | None = None, keep: slice | None = None,
                     min_foreground: float = 0.0, prefix: str = "slice",
                     percentiles: tuple[float, float] = (0.5, 99.5)) -> list[str]:
    """Write 2D slices of ``volume`` (and ``labels``) along ``axis`` into ``out``; return their stems.

    ``keep`` restricts the slice indices; ``min_foreground`` drops slices whose label map has a
    smaller fraction of non-zero pixels (or, without labels, whose image is mostly empty).
    ``size`` resizes every slice to ``size``² (bilinear for images, nearest for masks).
    Slices are rotated for display and padded to a centred square (aspect ratio kept).
    """
    from PIL import Image

    img = _load(Path(volume))
    if len(img.shape) != 3:
        raise DataError(f"{volume}: expected a 3D volume, got shape {img.shape}")
    lab = _load(Path(labels)) if labels is not None else None
    if lab is not None and tuple(lab.shape[:3]) != tuple(img.shape):
        raise DataError(f"label volume {labels} has shape {lab.shape} but {volume} has {img.shape}; they must match")
    data = img.dataobj
    lo, hi = volume_percentiles(data, percentiles)  # the ``percentile`` intensity scheme, quantised below
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if lab is not None:
        (out / "masks").mkdir(parents=True, exist_ok=True)
    indices = range(img.shape[axis])[keep] if keep is not None else range(img.shape[axis])
    stems = []
    for i in indices:
        sl = [slice(None)] * 3
        sl[axis] = i
        x = np.asarray(data[tuple(sl)], dtype=np.float32)
        m = np.asarray(lab.dataobj[tuple(sl)]).round().astype(np.int64) if lab is not None else None
        frac = float((m > 0).mean()) if m is not None else float((x > lo + 0.05 * (hi - lo)).mean())
        if frac < min_foreground or (min_foreground > 0 and frac == 0):
            continue
        x8 = (np.clip((x - lo) / max(hi - lo, 1e-8), 0, 1) * 255).round().astype(np.uint8)
        x8 = to_display(x8, 0)
        pic = Image.fromarray(np.ascontiguousarray(x8))
        if size:
            pic = pic.resize((size, size), Image.BILINEAR)
        stem = f"{prefix}_{i:04d}"
        pic.save(out / "images" / f"{stem}.png")
        if m is not None:
            if m.min() < 0 or m.max() > 255:
                raise DataError(f"{labels}: label values must lie in 0..255 for PNG masks (found {m.min()}..{m.max()})")
            mp = Image.fromarray(np.ascontiguousarray(to_display(m, 0).astype(np.uint8)))
            if size:
                mp = mp.resize((size, size), Image.NEAREST)
            mp.save(out / "masks" / f"{stem}.png")
        stems.append(stem)
    if not stems:
        raise DataError(f"{volume}: no slice along axis {axis} passed the foreground threshold {min_foreground}")
    return stems
