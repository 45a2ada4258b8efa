"""Volume datasets as radiologists keep them: the nnU-Net v2 raw layout, NIfTI and DICOM series,
CT and MRI intensity schemes, and a bounded cache so that a volume is decoded once, not per slice.

The nnU-Net v2 raw layout (https://github.com/MIC-DKFZ/nnUNet, ``dataset_format.md``)::

    ROOT/dataset.json            {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                                  "file_ending": ".nii.gz", ...}
    ROOT/imagesTr/CASE_0000.nii.gz   one file per channel (_0000, _0001, ...)
    ROOT/labelsTr/CASE.nii.gz        integer label volume, same grid as the images
    ROOT/imagesTs/CASE_0000.nii.gz   test cases (labels optional in labelsTs/)
    ROOT/imagesUnlabeled/...         (labeldiff's addition) cases without labels, for pretraining

A :class:`Volume` is float32 voxels in the file's own voxel order with its 4×4 voxel → RAS (mm)
affine, so a prediction can be written back on exactly the input grid.
"""
from __future__ import annotations

import json
import math
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from labeldiff.data.io import DataError

SPLIT_FOLDERS = {"train": "imagesTr", "test": "imagesTs", "unlabeled": "imagesUnlabeled"}
LABEL_FOLDERS = {"train": "labelsTr", "test": "labelsTs"}
INTENSITY_SCHEMES = ("ct-window", "ct-percentile", "percentile", "zscore", "none")
CT_PERCENTILES = (0.5, 99.5)  # nnU-Net's CT scheme and the CT paper's clipping
MAX_FIT_VOXELS = 1_000_000  # voxels per case used to fit dataset-wide statistics (strided, deterministic)


# --- reading one volume -----------------------------------------------------------------------------------------

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


def canonical(vol: Volume) -> tuple[Volume, np.ndarray]:
    """The volume with its axes permuted and flipped to RAS (nibabel's orientation tools: array axis 0
    runs left → right, 1 posterior → anterior, 2 inferior → superior), and the orientation that undoes it (:func:`from_canonical`). Slicing, training and prediction work in this
    frame, so a DICOM series (stored LPS) and a NIfTI (often RAS) of the same scan give the same slices;
    the affine is updated so every voxel keeps its position in mm."""
    from nibabel import orientations as o

    src, ras = o.io_orientation(vol.affine), o.axcodes2ornt("RAS")
    to_ras = o.ornt_transform(src, ras)
    array = np.ascontiguousarray(o.apply_orientation(vol.array, to_ras))
    affine = vol.affine @ o.inv_ornt_aff(to_ras, vol.shape)
    return Volume(array, affine), o.ornt_transform(ras, src)


def from_canonical(array: np.ndarray, back: np.ndarray) -> np.ndarray:
    """Undo :func:`canonical` on an array of the canonical frame (a prediction) → the input's voxel order."""
    from nibabel import orientations as o

    return np.ascontiguousarray(o.apply_orientation(array, back))


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
        raise ValueError(f"slices {first}..{last} cover no slice of the other grid")
    return a, b


def load_canonical(path: Path, dtype=np.float32, spacing=None, reader: "Callable[..., Volume] | None" = None) -> Volume:
    """A volume file in the RAS frame (:func:`canonical`), resampled to ``spacing`` when given: what
    every slice of a dataset is cut from."""
    vol, _ = canonical((reader or read_volume)(Path(path), dtype))
    return resample(vol, spacing, label=np.issubdtype(np.dtype(dtype), np.integer))


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


# --- slice geometry: the voxel-order slice ↔ the 2D image the slice datasets hold -------------------------------

def _square(a: np.ndarray, fill: int) -> np.ndarray:
    """Pad a 2D slice to a centred square so that resizing keeps the aspect ratio."""
    h, w = a.shape
    n = max(h, w)
    out = np.full((n, n), fill, dtype=a.dtype)
    top, left = (n - h) // 2, (n - w) // 2
    out[top:top + h, left:left + w] = a
    return out


def to_display(x: np.ndarray, fill=0) -> np.ndarray:
    """A slice in the volume's voxel order → the 2D image the slice datasets hold: rotated 90° (so an
    axial NIfTI slice shows anterior up) and padded to a centred square (``fill`` outside)."""
    return _square(np.rot90(x), fill)


def from_display(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Undo :func:`to_display` for a slice of ``shape`` (voxel order); leading axes (classes) are kept."""
    h, w = shape[1], shape[0]  # rot90 swaps the axes
    n = max(h, w)
    if img.shape[-2:] != (n, n):
        raise ValueError(f"expected a {n}×{n} display image for a {shape} slice, got {img.shape[-2:]}")
    top, left = (n - h) // 2, (n - w) // 2
    return np.rot90(img[..., top:top + h, left:left + w], k=-1, axes=(-2, -1))


# --- the nnU-Net v2 raw layout ----------------------------------------------------------------------------------

@dataclass
class Case:
    """One case: its channel files (in channel order) and its label volume, if any."""

    name: str
    images: list[Path]
    label: Path | None = None


class NnUNetRaw:
    """An nnU-Net v2 raw dataset folder, read from its ``dataset.json`` and file names only."""

    def __init__(self, root: Path):
        self.root = Path(root)
        meta_path = self.root / "dataset.json"
        if not meta_path.is_file():
            raise DataError(f"{self.root}: no dataset.json; an nnU-Net v2 raw dataset needs one with "
                            f'"channel_names", "labels" and "file_ending" (see nnU-Net\'s dataset_format.md)')
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_path}: not valid JSON ({e})") from None
        missing = [k for k in ("channel_names", "labels") if k not in meta]
        if missing:
            raise DataError(f"{meta_path}: missing {', '.join(missing)}; add e.g. "
                            f'"channel_names": {{"0": "CT"}}, "labels": {{"background": 0, "liver": 1}}')
        self.meta = meta
        example = '"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}'
        names, labels_raw = meta["channel_names"], meta["labels"]
        if not isinstance(names, dict) or not names or not all(str(k).isdigit() for k in names):
            raise DataError(f"{meta_path}: channel_names must map channel numbers to names, e.g. {example}")
        if not isinstance(labels_raw, dict) or not labels_raw:
            raise DataError(f"{meta_path}: labels must map class names to ids (got {type(labels_raw).__name__}), "
                            f"e.g. {example}")
        bad = [f"{n}: {v!r}" for n, v in labels_raw.items()
               if not isinstance(v, list) and (isinstance(v, bool) or not isinstance(v, int))]
        if bad:
            raise DataError(f"{meta_path}: label ids must be integers ({', '.join(bad[:3])}); e.g. {example}")
        self.channels = [names[k] for k in sorted(names, key=int)]
        labels = {str(name): int(v) for name, v in labels_raw.items() if not isinstance(v, list)}
        ids = sorted(labels.values())
        if ids != list(range(len(ids))):
            raise DataError(f"{meta_path}: label ids must be 0, 1, ..., K-1 (found {ids}); renumber them")
        self.labels = labels
        self.file_ending = meta.get("file_ending", ".nii.gz")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def class_names(self) -> list[str]:
        """Class names in id order (``class_names[i]`` is the name of label ``i``)."""
        return [name for name, _ in sorted(self.labels.items(), key=lambda kv: kv[1])]

    def cases(self, split: str = "train") -> list[Case]:
        """The cases of ``train`` (imagesTr), ``test`` (imagesTs) or ``unlabeled`` (imagesUnlabeled);
        [] when that folder does not exist. Every case must have every channel file."""
        if split not in SPLIT_FOLDERS:
            raise ValueError(f"split must be one of {', '.join(SPLIT_FOLDERS)}, not {split!r}")
        folder = self.root / SPLIT_FOLDERS[split]
        if not folder.is_dir():
            return []
        end, n = self.file_ending, len(self.channels)
        found: dict[str, dict[int, Path]] = {}
        for f in sorted(folder.iterdir()):
            if not f.name.endswith(end) or f.name.startswith("."):
                continue
            stem = f.name[:-len(end)]
            name, _, ch = stem.rpartition("_")
            if not name or len(ch) != 4 or not ch.isdigit():
                raise DataError(f"{f}: nnU-Net image files are named CASE_XXXX{end} (XXXX = channel, e.g. "
                                f"_0000); rename it")
            found.setdefault(name, {})[int(ch)] = f
        labels_dir = self.root / LABEL_FOLDERS[split] if split in LABEL_FOLDERS else None
        out = []
        for name, files in sorted(found.items()):
            if sorted(files) != list(range(n)):
                raise DataError(f"{folder}: case {name!r} has channel files {sorted(files)} but dataset.json names "
                                f"{n} channel(s) {self.channels}; add the missing {name}_XXXX{end}")
            label = labels_dir / f"{name}{end}" if labels_dir is not None else None
            if split == "train" and (label is None or not label.is_file()):
                raise DataError(f"{folder / (name + '_0000' + end)}: no label {label}; every imagesTr case needs "
                                f"labelsTr/{name}{end} (move unlabeled cases to imagesUnlabeled/)")
            out.append(Case(name, [files[i] for i in range(n)], label if label is not None and label.is_file() else None))
        return out


def dataset_labels(root: Path) -> dict[str, int] | None:
    """Class name → id from a dataset root's ``dataset.json`` (nnU-Net ``labels``) or ``classes.json``
    (name → id, as ``prepare: volume-slabs`` writes it); None when it has neither."""
    for name in ("dataset.json", "classes.json"):
        f = Path(root) / name
        if f.is_file():
            try:
                raw = json.loads(f.read_text())
            except json.JSONDecodeError:
                return None
            labels = raw.get("labels", raw) if name == "dataset.json" else raw
            if isinstance(labels, dict) and labels and all(isinstance(v, int) for v in labels.values()):
                return labels
    return None


def dataset_class_names(root: Path) -> list[str] | None:
    """Class names in id order (:func:`dataset_labels`); None when the dataset names none."""
    labels = dataset_labels(root)
    return [n for n, _ in sorted(labels.items(), key=lambda kv: kv[1])] if labels else None


def dataset_num_classes(root: Path) -> int | None:
    """K named by the dataset (:func:`dataset_labels`: highest id + 1); None when it names none."""
    labels = dataset_labels(root)
    return max(labels.values()) + 1 if labels else None


def is_nnunet_raw(path: Path) -> bool:
    path = Path(path)
    return (path / "dataset.json").is_file() and any((path / f).is_dir() for f in SPLIT_FOLDERS.values())


# --- intensities ------------------------------------------------------------------------------------------------

@dataclass
class Intensity:
    """How voxel values become network inputs, fitted once per dataset and stored in the run config.

    - ``ct-window``: clip to a fixed HU window [lo, hi], then scale to [-1, 1];
    - ``ct-percentile``: nnU-Net's CT scheme — the 0.5 / 99.5 percentiles, mean and standard deviation
      of the foreground voxels of every training case (label > 0; every voxel of a case without a
      label); clip to the percentiles, then subtract the mean and divide by the deviation;
    - ``percentile``: per volume, clip to its own 0.5 / 99.5 percentiles and scale to [-1, 1] — what
      :func:`labeldiff.data.volumes.volume_to_slices` writes as 8-bit slices (the CT paper's clipping);
    - ``zscore``: per volume, with the mean and deviation of its non-zero voxels (MRI, whose background
      is 0; nnU-Net does the same when cropping to the non-zero region shrank the case);
    - ``none``: the values as they are.
    """

    scheme: str = "none"
    lo: float = -math.inf
    hi: float = math.inf
    mean: float = 0.0
    std: float = 1.0
    fitted_on: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.scheme not in INTENSITY_SCHEMES:
            raise ValueError(f"intensity scheme must be one of {', '.join(INTENSITY_SCHEMES)}, not {self.scheme!r}")
        if self.scheme == "ct-window" and not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
            raise ValueError(f"ct-window needs a window lo < hi in HU (e.g. -160, 240), got [{self.lo}, {self.hi}]")

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Normalise a whole volume (the per-volume schemes take their statistics from it)."""
        x = np.asarray(x, dtype=np.float32)
        if self.scheme == "percentile":
            lo, hi = volume_percentiles(x)
            return (np.clip((x - lo) / max(hi - lo, 1e-8), 0, 1) * 2 - 1).astype(np.float32)
        if self.scheme == "ct-window":
            return ((np.clip(x, self.lo, self.hi) - self.lo) / (self.hi - self.lo) * 2 - 1).astype(np.float32)
        if self.scheme == "ct-percentile":
            return ((np.clip(x, self.lo, self.hi) - self.mean) / max(self.std, 1e-8)).astype(np.float32)
        if self.scheme == "zscore":
            inside = x[x != 0]
            if inside.size == 0:
                return np.zeros_like(x)
            return ((x - inside.mean()) / max(float(inside.std()), 1e-8)).astype(np.float32)
        return x

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

    @classmethod
    def named(cls, scheme: str, hu_window: tuple[float, float] | None = None) -> Intensity:
        """The scheme a user names (``--intensity``, ``--hu-window``), not yet fitted."""
        if scheme == "ct-window":
            if hu_window is None:
                raise ValueError("--intensity ct-window needs --hu-window LO HI (e.g. -160 240 for the abdomen)")
            return cls(scheme, float(hu_window[0]), float(hu_window[1]))
        if hu_window is not None:
            raise ValueError("--hu-window applies to --intensity ct-window only")
        return cls(scheme)

    @classmethod
    def from_dict(cls, d: dict) -> Intensity:
        d = dict(d)
        d["lo"] = -math.inf if d.get("lo") is None else d["lo"]
        d["hi"] = math.inf if d.get("hi") is None else d["hi"]
        return cls(**d)


def volume_percentiles(x, percentiles: tuple[float, float] = CT_PERCENTILES) -> tuple[float, float]:
    """The 0.5 / 99.5 percentiles of a volume from every second voxel along each axis (a volume is never
    decoded twice for its statistics)."""
    lo, hi = np.percentile(np.asarray(x[::2, ::2, ::2], dtype=np.float32), percentiles)
    return float(lo), float(hi)


def fit_ct_percentile(cases: list[Case], channel: int = 0) -> Intensity:
    """The ``ct-percentile`` scheme fitted on ``cases`` (the training cases: never the test cases)."""
    if not cases:
        raise DataError("ct-percentile needs at least one training case to fit its percentiles")
    values = []
    for c in cases:
        x = read_volume(c.images[channel]).array
        if c.label is not None:
            fg = read_volume(c.label, np.int64).array > 0
            if fg.shape != x.shape:
                raise DataError(f"{c.label}: label shape {fg.shape} differs from its image {x.shape}")
            v = x[fg]
        else:
            v = x.ravel()
        step = max(1, v.size // MAX_FIT_VOXELS)
        values.append(v[::step])
    v = np.concatenate(values).astype(np.float64)
    if v.size == 0:
        raise DataError("ct-percentile: the training labels have no foreground voxel to fit on")
    lo, hi = np.percentile(v, CT_PERCENTILES)  # mean and std of the unclipped values, as nnU-Net's CTNormalization
    return Intensity("ct-percentile", lo=float(lo), hi=float(hi), mean=float(v.mean()), std=float(v.std()),
                     fitted_on=[c.name for c in cases])


# --- slices from volumes, decoded once ---------------------------------------------------------------------------

class VolumeCache:
    """Decoded volumes in a cache bounded in megabytes (least recently used out first).

    Reading every slice of a volume decodes it once; ``reads`` counts decodes per path, which is what
    a test of "never read once per slice" checks.
    """

    def __init__(self, max_mb: int = 1024, reader: Callable[..., Volume] = read_volume):
        self.max_bytes = max_mb * 2**20
        self.reader = reader
        self.items: OrderedDict[tuple[str, str, str, str], Volume] = OrderedDict()
        self.bytes = 0
        self.reads: dict[str, int] = {}

    def get(self, path: Path, dtype=np.float32, intensity: Intensity | None = None, spacing=None) -> Volume:
        """The volume at ``path`` in the RAS-canonical frame (:func:`canonical`), resampled to ``spacing``
        mm when given, then normalised by ``intensity`` when given (the cache holds that copy only: a
        volume is never held twice)."""
        norm = json.dumps(intensity.to_dict(), sort_keys=True) if intensity is not None else ""
        key = (str(path), np.dtype(dtype).name, norm, json.dumps(spacing))
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        vol = load_canonical(Path(path), dtype, spacing, self.reader)
        if intensity is not None:
            vol = Volume(intensity.apply(vol.array), vol.affine)
        self.reads[str(path)] = self.reads.get(str(path), 0) + 1
        self.items[key] = vol
        self.bytes += vol.array.nbytes
        while self.bytes > self.max_bytes and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.array.nbytes
        return vol


# --- a volume dataset as 2D slices, read lazily --------------------------------------------------------------

AXIS_LETTERS = "xyz"
MIN_LABELED_FRACTION = 0.01  # a labeled slice needs ≥ 1 % foreground pixels to be a training / test slice
VOLUMES = VolumeCache(max_mb=2048)
LABEL_DTYPE = np.int16  # label volumes in memory: ids up to 32767 at 2 bytes a voxel  # one per process: a volume is decoded (and normalised) once, not per slice


@dataclass(frozen=True)
class SliceRef:
    """Slice ``index`` along ``axis`` of a case's channel volumes (and label volume)."""

    images: tuple[str, ...]
    label: str | None
    axis: int
    index: int
    spacing: tuple[float, float, float] | None = None  # the grid the slice is cut from (None: the file's own)

    @property
    def key(self) -> str:
        return f"{self.images[0]}#{AXIS_LETTERS[self.axis]}{self.index}"


def slice_stem(case: str, axis: int, index: int) -> str:
    """``CASE_z0042``: slice 42 along z (axis 2). Not nnU-Net's ``CASE_0000`` channel suffix."""
    return f"{case}_{AXIS_LETTERS[axis]}{index:04d}"


def slice_image(volumes: list[Volume], axis: int, index: int, channels: int) -> np.ndarray:
    """``[C, H, W]`` float32: slice ``index`` along ``axis`` of each normalised channel volume, rotated
    and padded as :func:`to_display` does with the volume's lowest value, grey repeated to 3 channels
    where the network reads RGB. Training (:func:`read_slice_image`) and volume prediction both build
    their network inputs here, so a model predicts on exactly the images it was trained on."""
    x = np.stack([to_display(np.take(v.array, index, axis=axis), fill=v.low) for v in volumes]).astype(np.float32)
    if x.shape[0] != channels:
        if channels == 3 and x.shape[0] == 1:
            return np.repeat(x, 3, axis=0)
        raise DataError(f"the volume has {x.shape[0]} channel(s) but the network reads {channels}; "
                        f"set --channels {x.shape[0]}")
    return x


def read_slice_image(ref: SliceRef, channels: int, intensity: Intensity) -> np.ndarray:
    """The network input of a dataset slice: its channel volumes normalised by ``intensity`` (once,
    cached), then :func:`slice_image`."""
    vols = [VOLUMES.get(Path(path), np.float32, intensity, ref.spacing) for path in ref.images]
    return slice_image(vols, ref.axis, ref.index, channels)


def read_slice_mask(ref: SliceRef, num_classes: int | None = None, ignore_index: int | None = None) -> np.ndarray:
    if ref.label is None:
        raise DataError(f"{ref.images[0]}: this case has no label volume")
    lab = VOLUMES.get(Path(ref.label), LABEL_DTYPE, spacing=ref.spacing)
    m = to_display(np.take(lab.array, ref.index, axis=ref.axis), 0)
    labeled = m if ignore_index is None else m[m != ignore_index]
    if labeled.size and (labeled.min() < 0 or (num_classes is not None and labeled.max() >= num_classes)):
        raise DataError(f"{ref.label}: label values {int(labeled.min())}..{int(labeled.max())} outside 0..{num_classes - 1}; "
                        f"dataset.json's labels must name every value")
    return m.astype(np.int64)


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
