"""Reading one volume: a NIfTI file or a DICOM series as float32 voxels with the voxel → RAS (mm)
affine, refused with a one-line reason when it is not 3D, its affine is singular or a voxel is not finite.

A :class:`Volume` keeps the file's own voxel order, so a prediction can be written back on exactly the
input grid; :mod:`labeldiff.data.geometry` turns it into the RAS frame every slice is cut in.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from labeldiff.data.io import DataError


@dataclass
class Volume:
    """Voxels (float32, the file's voxel order: X, Y, Z for NIfTI) and the voxel → RAS mm affine."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis (the column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @cached_property
    def low(self) -> float:
        """The lowest voxel value: what a slice is padded with to a square (computed once)."""
        return float(self.array.min())


def is_dicom_series(path: Path) -> bool:
    """A folder whose files are DICOM (the 128-byte preamble + ``DICM``)."""
    path = Path(path)
    if not path.is_dir():
        return False
    for f in sorted(path.iterdir())[:3]:
        if f.is_file():
            with open(f, "rb") as fh:
                fh.seek(128)
                if fh.read(4) == b"DICM":
                    return True
    return False


def read_volume(path: Path, dtype=np.float32) -> Volume:
    """A NIfTI file or a DICOM series folder as a :class:`Volume` (labels: pass ``dtype=np.int64``)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found")
    if path.is_dir():
        if not is_dicom_series(path):
            raise DataError(f"{path}: a folder but not a DICOM series (no file starts with the DICM marker); "
                            f"point at a .nii.gz file or a folder of one series' .dcm files")
        return read_dicom_series(path, dtype)
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises several types for unreadable / truncated files
        raise DataError(f"{path}: cannot be read as a NIfTI volume ({e}); re-export it or remove it") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {data.shape}; save one channel per file "
                        f"(nnU-Net's CASE_0000, CASE_0001, ...)")
    check_affine(path, img.affine)
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        bad = np.argwhere(~np.isfinite(data))[0]
        raise DataError(f"{path}: voxel {tuple(int(i) for i in bad)} is {data[tuple(bad)]}; volumes must hold finite "
                        f"values: replace NaN and infinite voxels (e.g. with the background value) and save it again")
    if np.issubdtype(dtype, np.integer):
        if np.issubdtype(data.dtype, np.floating) and not np.allclose(data, np.round(data)):
            raise DataError(f"{path}: a label volume must hold integers; found non-integer values")
        data = np.round(data)
    return Volume(np.ascontiguousarray(data, dtype=dtype), np.asarray(img.affine, dtype=np.float64))


def check_volumes(paths: list[Path]) -> None:
    """Decode every volume file once (3D, an invertible affine, finite voxels) before a run folder exists; a
    DataError names the first bad file. Files checked before, unchanged (same size and mtime), are skipped
    (:class:`~labeldiff.data.io.ScanCache`), so a second run over the same data is instant."""
    from labeldiff.data.io import ScanCache, _progress

    cache = ScanCache("volumes-v1.json")
    todo = [Path(p) for p in dict.fromkeys(paths) if Path(p).is_dir() or cache.get(Path(p)) is None]
    try:
        for p in _progress(todo, f"checking {len(todo)} volumes", unit="volume"):
            read_volume(p)
            if p.is_file():
                cache.put(p, 1)
    finally:
        cache.save()


def check_affine(path: Path, affine) -> None:
    """A voxel → mm affine must be finite and invertible (a zero voxel size or a collapsed axis is not)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise DataError(f"{path}: its voxel-to-mm affine (qform/sform) is singular or not finite, so the voxels have "
                        f"no positions; fix the header (e.g. with nibabel: set_qform / set_sform from the voxel "
                        f"sizes) and save it again")


def read_dicom_series(folder: Path, dtype=np.float32) -> Volume:
    """One DICOM series as a volume in Hounsfield units (rescale slope / intercept applied), with its
    geometry from ImageOrientationPatient, ImagePositionPatient and PixelSpacing — MONAI's
    ``PydicomReader``, which sorts the slices along the slice normal and converts DICOM's LPS patient
    axes to the RAS of NIfTI."""
    from monai.transforms import LoadImage

    uids = _series_uids(folder)
    if len(uids) > 1:
        raise DataError(f"{folder}: holds {len(uids)} DICOM series ({', '.join(sorted(uids)[:3])}...); "
                        f"put each series in its own folder")
    try:
        with warnings.catch_warnings():  # MONAI notes it has no GPU decoder (nvImageCodec); pydicom decodes
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
            img = LoadImage(reader="PydicomReader", image_only=True)(str(folder))
    except Exception as e:
        raise DataError(f"{folder}: cannot be read as one DICOM series ({e})") from None
    array = np.asarray(img, dtype=dtype)
    if array.ndim != 3:
        raise DataError(f"{folder}: expected a 3D series, got shape {array.shape}")
    return Volume(np.ascontiguousarray(array), np.asarray(img.affine, dtype=np.float64))


def _series_uids(folder: Path) -> set[str]:
    import pydicom

    uids = set()
    for f in sorted(Path(folder).iterdir()):
        if f.is_file():
            try:
                uids.add(str(pydicom.dcmread(f, stop_before_pixels=True).get("SeriesInstanceUID", "")))
            except Exception:
                continue
    return uids
