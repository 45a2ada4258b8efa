"""Where voxels are: the RAS frame every slice is cut in (:func:`canonical`), optional resampling to a
target spacing (MONAI's ``Spacing``, off by default), and the rotation and padding that turn a slice into
the 2D image the slice datasets hold (:func:`to_display`) and back.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from labeldiff.data.io import DataError
from labeldiff.portable import canonical as portable_canonical, from_canonical, from_display, square as _square, to_display  # noqa: F401,E501
from labeldiff.data.volume_io import Volume, check_affine, read_volume
from labeldiff.errors import DataError


# --- the RAS frame --------------------------------------------------------------------------------------------

def canonical(vol: Volume) -> tuple[Volume, np.ndarray]:
    """The volume with its axes permuted and flipped to RAS (nibabel's orientation tools: array axis 0
    runs left → right, 1 posterior → anterior, 2 inferior → superior), and the orientation that undoes it
    (:func:`from_canonical`). Slicing, training and prediction work in this frame, so a DICOM series
    (stored LPS) and a NIfTI (often RAS) of the same scan give the same slices; the affine is updated so
    every voxel keeps its position in mm (:func:`labeldiff.portable.canonical`)."""
    array, affine, back = portable_canonical(vol.array, vol.affine)
    return Volume(array, affine), back


def canonical_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine) of a NIfTI volume in the RAS-canonical frame (:func:`canonical`), from its
    header only (nothing decoded)."""
    import nibabel as nib
    from nibabel import orientations as o

    try:
        img = nib.load(str(path))
        full, affine = tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)
    except Exception as e:
        raise DataError(f"{path}: cannot be read as a NIfTI volume ({e}); re-export it or remove it") from None
    if len(full) == 4 and full[3] == 1:
        full = full[:3]
    if len(full) != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {full}; save one 3D channel per file "
                        f"(nnU-Net's CASE_0000, CASE_0001, ...)")
    check_affine(path, affine)
    shape = full
    to_ras = o.ornt_transform(o.io_orientation(affine), o.axcodes2ornt("RAS"))
    out = [0, 0, 0]
    for axis, (ras, _) in enumerate(to_ras.astype(int)):
        out[ras] = shape[axis]
    return tuple(out), affine @ o.inv_ornt_aff(to_ras, shape)


def volume_shape(path: Path, spacing=None) -> tuple[int, ...]:
    """A NIfTI volume's shape in the RAS-canonical frame (resampled to ``spacing`` when given), from its header."""
    shape, affine = canonical_geometry(path)
    return resampled_geometry(shape, affine, spacing)[0]


def load_canonical(path: Path, dtype=np.float32, spacing=None, reader: "Callable[..., Volume] | None" = None) -> Volume:
    """A volume file in the RAS frame (:func:`canonical`), resampled to ``spacing`` when given: what
    every slice of a dataset is cut from."""
    vol, _ = canonical((reader or read_volume)(Path(path), dtype))
    return resample(vol, spacing, label=np.issubdtype(np.dtype(dtype), np.integer))


# --- optional resampling to a target spacing (off by default) ----------------------------------------------------

def check_spacing(spacing) -> tuple[float, float, float] | None:
    """A target spacing as 3 positive mm values (x, y, z of the RAS frame), or None (no resampling)."""
    if spacing is None:
        return None
    try:
        out = tuple(float(t) for t in spacing)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(math.isfinite(t) and t > 0 for t in out):
        raise DataError(f"spacing must be three positive sizes in mm (x, y, z), e.g. 1.5,1.5,3; got {spacing!r}")
    return out  # type: ignore[return-value]


def resampled_geometry(shape: tuple[int, ...], affine: np.ndarray, spacing) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine) of a canonical grid resampled to ``spacing`` mm, as MONAI's ``Spacing`` makes it:
    the same first voxel centre and field of voxel centres, ``(n - 1)·s/t + 1`` voxels per axis."""
    if spacing is None:
        return tuple(shape), affine
    from monai.data.utils import compute_shape_offset, zoom_affine

    new = zoom_affine(np.asarray(affine), tuple(float(t) for t in spacing), diagonal=False)
    out, offset = compute_shape_offset(tuple(shape), np.asarray(affine), new)
    new[:3, 3] = offset
    return tuple(int(n) for n in out), new


def resample(vol: Volume, spacing, label: bool = False) -> Volume:
    """``vol`` (RAS-canonical) resampled to ``spacing`` mm with MONAI's ``Spacing``: trilinear for
    intensities, nearest for labels (nnU-Net's choice for segmentations); ``spacing=None`` returns it."""
    if spacing is None:
        return vol
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Spacing as MonaiSpacing

    x = MetaTensor(torch.from_numpy(vol.array.astype(np.float32))[None], affine=torch.from_numpy(vol.affine))
    y = MonaiSpacing(pixdim=tuple(float(t) for t in spacing), mode="nearest" if label else "bilinear",
                     padding_mode="border")(x)
    array = y[0].numpy()
    return Volume(np.ascontiguousarray(np.round(array) if label else array, dtype=vol.array.dtype),
                  np.asarray(y.affine, dtype=np.float64))


def resample_labels_to(labels: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], dst_affine: np.ndarray) -> np.ndarray:
    """A label volume on (``affine``) put on the grid (``shape``, ``dst_affine``) by nearest neighbour
    (MONAI's ``SpatialResample``): a prediction made on a resampled grid, back on the input's."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    x = MetaTensor(torch.from_numpy(labels.astype(np.float32))[None], affine=torch.from_numpy(affine))
    y = SpatialResample(mode="nearest", padding_mode="border")(x, dst_affine=torch.from_numpy(dst_affine),
                                                               spatial_size=tuple(shape))
    return np.ascontiguousarray(np.round(y[0].numpy()), dtype=labels.dtype)


def slab_on_grid(first: int, last: int, axis: int, affine: np.ndarray, dst_affine: np.ndarray, dst_n: int) -> tuple[int, int]:
    """The slices ``first..last`` along ``axis`` of one grid as the slices of another grid of the same
    space whose centres lie inside them (their edges mapped through the affines)."""
    edges = []
    for j in (first - 0.5, last + 0.5):
        point = np.zeros(4)
        point[axis], point[3] = j, 1.0
        edges.append(float((np.linalg.inv(dst_affine) @ affine @ point)[axis]))
    lo, hi = sorted(edges)
    a, b = max(0, math.ceil(lo - 1e-6)), min(dst_n - 1, math.ceil(hi - 1e-6) - 1)
    if a > b:
        raise DataError(f"slices {first}..{last} cover no slice of the other grid")
    return a, b


# --- slice geometry: the voxel-order slice ↔ the 2D image the slice datasets hold -------------------------------
