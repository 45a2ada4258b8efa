"""Datasets on disk and the samples they hand out: a labeled 2D folder (:class:`LabeledFolder`), an
nnU-Net v2 raw volume dataset read as 2D slices (:class:`VolumeFolder`), which of the two a path is
(:func:`open_labeled`), and every image of an unlabeled one (:func:`unlabeled_samples`).

A labeled dataset is ``ROOT/images/*`` + ``ROOT/masks/*`` (same stem) + optional
``ROOT/split.json`` (``{"train": [stems], "test": [stems], ...}``) + optional ``ROOT/roi/*`` (same stem:
each image's region of interest, its field of view; pixels outside it count for nothing: see
:data:`ROI_IGNORE`), or an nnU-Net v2 raw volume
dataset (its volumes as 2D slices, read lazily). An unlabeled dataset is a folder of images, the
``images/`` of a labeled one, or a volume dataset. Nothing is read until it is needed. Making splits is
:mod:`labeldiff.data.splits`; checking samples :mod:`labeldiff.data.validation`; batches
:mod:`labeldiff.data.datasets`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labeldiff.config import DataConfig
from labeldiff.data.geometry import check_spacing, load_canonical, volume_shape
from labeldiff.data.io import IMAGE_SUFFIXES, DataError, check_decodes, image_size, read_image, read_mask
from labeldiff.data.nnunet import Intensity, NnUNetRaw, fit_ct_percentile, fit_dataset_percentile, is_nnunet_raw
from labeldiff.data.slices import (AXIS_LETTERS, LABEL_DTYPE, MIN_LABELED_FRACTION, VOLUMES, SliceRef, read_slice_image,
                                   read_slice_mask, slice_stem)
from labeldiff.data.volume_io import check_volumes


def list_images(folder: Path) -> dict[str, Path]:
    """Map stem → path for every image file in ``folder`` (sorted, non-recursive)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; point --data at a folder of images or at a dataset root")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise DataError(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    out: dict[str, Path] = {}
    for p in files:
        if p.stem in out:
            raise DataError(f"{p}: two files share the stem {p.stem!r} ({out[p.stem].name}); rename one")
        out[p.stem] = p
    return out


ROI = "roi"  # ROOT/roi/<stem>.png: non-zero inside the region of interest (a fundus camera's circle, a slide's tissue)
ROI_IGNORE = 255  # the mask value outside the region of interest when --ignore-index is not given


@dataclass
class Sample:
    """One 2D sample: an image file (and mask file), or a slice of a volume case (``ref``; then
    ``image`` / ``mask`` are the case's first channel and label volume, for messages)."""

    stem: str
    image: Path
    mask: Path | None = None
    ref: SliceRef | None = None
    intensity: Intensity | None = None
    ignore_index: int | None = None  # a mask value meaning "not labeled" (DataConfig.ignore_index)
    roi: Path | None = None  # the region of interest: pixels outside it become ignore_index

    @property
    def key(self) -> str:
        return self.ref.key if self.ref is not None else str(self.image)

    def read_image(self, channels: int) -> np.ndarray:
        if self.ref is not None:
            return read_slice_image(self.ref, channels, self.intensity or Intensity("percentile"))
        return read_image(self.image, channels)

    def read_mask(self, num_classes: int | None = None) -> np.ndarray:
        """The class map ``[H, W]``; with a region of interest, every pixel outside it is ``ignore_index``
        (what it held there is never read: a fundus camera's black surround is no class)."""
        if self.ref is not None:
            return read_slice_mask(self.ref, num_classes, self.ignore_index)
        assert self.mask is not None
        if self.roi is None:
            return read_mask(self.mask, num_classes, self.ignore_index)
        inside = read_roi(self.roi, image_size(self.mask))
        mask = read_mask(self.mask, None, self.ignore_index)
        mask[~inside] = self.ignore_index
        if num_classes is not None:
            from labeldiff.data.io import check_mask_values

            check_mask_values(self.mask, np.unique(mask[inside]).tolist(), num_classes, self.ignore_index)
        return mask

    def size(self) -> tuple[int, int]:
        """(height, width) without decoding an image file (a volume slice: its display square)."""
        if self.ref is not None:
            shape = volume_shape(Path(self.ref.images[0]), self.ref.spacing)
            side = max(n for i, n in enumerate(shape) if i != self.ref.axis)
            return side, side
        return image_size(self.image)


def read_roi(path: Path, hw: tuple[int, int]) -> np.ndarray:
    """A region-of-interest file as a boolean ``[H, W]`` (non-zero: inside), checked against the size of its
    image."""
    roi = read_mask(path)
    if roi.shape != tuple(hw):
        raise DataError(f"region of interest {path} is {roi.shape[1]}×{roi.shape[0]} but its image is {hw[1]}×{hw[0]}; "
                        f"an roi/ file must have its image's size")
    return roi > 0


def read_splits(split_file: Path) -> dict[str, list[str]]:
    """The named stem lists of a split JSON (``{"train": [...], "test": [...], ...}``); {} if absent."""
    split_file = Path(split_file)
    if not split_file.is_file():
        return {}
    try:
        raw = json.loads(split_file.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{split_file}: not valid JSON ({e})") from None
    return {k: list(v) for k, v in raw.items() if isinstance(v, list)}


def split_path(root: Path, split_file: str | Path | None) -> Path:
    """``split_file`` (which must exist) or ``ROOT/split.json``."""
    if split_file is not None and not Path(split_file).is_file():
        raise DataError(f"split file {split_file} does not exist; write one with `labeldiff split`")
    return Path(split_file) if split_file else Path(root) / "split.json"


class LabeledFolder:
    """``images/`` + ``masks/`` + optional ``split.json`` (or another split file, ``split_file``)."""

    def __init__(self, root: Path, split_file: str | Path | None = None):
        self.root = Path(root)
        if not (self.root / "images").is_dir():
            raise DataError(f"{self.root}: no images/ folder; a labeled dataset is ROOT/images + ROOT/masks")
        if not (self.root / "masks").is_dir():
            raise DataError(f"{self.root}: no masks/ folder; a labeled dataset is ROOT/images + ROOT/masks")
        self.images = list_images(self.root / "images")
        self.masks = list_images(self.root / "masks")
        self.rois = list_images(self.root / ROI) if (self.root / ROI).is_dir() else None
        self.split_file = split_path(self.root, split_file)
        self.splits = read_splits(self.split_file)
        self.ignore_index: int | None = None  # set by open_labeled from DataConfig.ignore_index

    def stems(self, split: str | None) -> list[str]:
        """Stems of a named split (``None`` or ``"all"`` without a split.json entry: every image). With no
        split file at all, ``train`` is every image (fine-tuning and pretraining need no split), and a
        test split is asked for with the command that makes one."""
        if split is None or (split == "all" and "all" not in self.splits):
            return sorted(self.images)
        if not self.split_file.is_file():
            if split == "train":
                return sorted(self.images)
            raise DataError(f"{self.root}: no split.json, so there is no {split!r} split; make one with `labeldiff "
                            f"split --data {self.root} --out {self.root / 'split.json'}` (a random split; --groups "
                            f"keeps videos or patients on one side)")
        if split not in self.splits:
            have = ", ".join(sorted(self.splits)) or "none"
            raise DataError(f"{self.split_file}: no split named {split!r}; available: {have}")
        missing = [s for s in self.splits[split] if s not in self.images]
        if missing:
            raise DataError(f"{self.split_file}: split {split!r} names {missing[0]!r} but "
                            f"images/ has no such file; fix {self.split_file.name}")
        return list(self.splits[split])

    def samples(self, stems: list[str]) -> list[Sample]:
        out = []
        for s in stems:
            if s not in self.masks:
                raise DataError(f"{self.images[s]}: no mask with stem {s!r} in {self.root / 'masks'}; "
                                f"add masks/{s}.png or drop the image")
            roi = None
            if self.rois is not None:
                if s not in self.rois:
                    raise DataError(f"{self.images[s]}: no region of interest with stem {s!r} in {self.root / ROI}; add "
                                    f"{ROI}/{s}.png (non-zero inside), or remove {ROI}/ to use every pixel")
                roi = self.rois[s]
            out.append(Sample(s, self.images[s], self.masks[s], ignore_index=self.ignore_index, roi=roi))
        return out

    @property
    def has_roi(self) -> bool:
        return self.rois is not None


class VolumeFolder:
    """An nnU-Net v2 raw dataset (:class:`labeldiff.data.nnunet.NnUNetRaw`) as a labeled 2D dataset
    with :class:`LabeledFolder`'s interface: every slice along ``axis`` of every case is a sample
    (stem ``CASE_z0042``), read from its volume, decoded once per process, in float intensities.

    Splits: ``train`` = the slices of ``imagesTr`` with ≥ 1 % labeled pixels, ``test`` = the same of
    ``imagesTs`` cases that have ``labelsTs``, ``unlabeled`` = every slice of ``imagesUnlabeled``; a
    split file (``ROOT/split.json`` or ``split_file``, e.g. a train slab and a test slab of one
    volume) replaces or adds named splits.
    """

    def __init__(self, root: Path, split_file: str | Path | None = None, axis: int = 2,
                 intensity: Intensity | None = None, spacing=None):
        self.root = Path(root)
        self.spacing = check_spacing(spacing)
        self.raw = NnUNetRaw(self.root)
        if axis not in (0, 1, 2):
            raise DataError(f"axis must be 0, 1 or 2 (got {axis})")
        self.axis = axis
        self.intensity = intensity or Intensity("percentile")
        self.ignore_index: int | None = None  # set by open_labeled from DataConfig.ignore_index
        self.refs: dict[str, SliceRef] = {}
        self.case_names: dict[str, str] = {}  # slice stem → its case
        self.case_slices: dict[str, list[str]] = {}
        self.cases = {split: self.raw.cases(split) for split in ("train", "test", "unlabeled")}
        for split, cases in self.cases.items():
            stems = []
            for case in cases:
                shape = volume_shape(case.images[0])
                for extra in case.images[1:] + ([case.label] if case.label is not None else []):
                    if volume_shape(extra) != shape:
                        raise DataError(f"{extra}: shape {volume_shape(extra)} differs from {case.images[0]} "
                                        f"{shape}; every channel and the label must share one grid")
                shape = volume_shape(case.images[0], self.spacing)  # the grid slices are cut from
                for i in range(shape[axis]):
                    stem = slice_stem(case.name, axis, i)
                    self.refs[stem] = SliceRef(tuple(str(p) for p in case.images),
                                               str(case.label) if case.label is not None else None, axis, i,
                                               self.spacing)
                    self.case_names[stem] = case.name
                    stems.append(stem)
            self.case_slices[split] = stems
        self.images = {stem: Path(ref.images[0]) for stem, ref in self.refs.items()}
        self.split_file = split_path(self.root, split_file)
        self.splits = read_splits(self.split_file)
        self.default_splits = [s for s in ("train", "test") if self.case_slices[s]] + ["unlabeled"] * bool(
            self.case_slices["unlabeled"])

    def labeled_slices(self, split: str) -> list[str]:
        """The slices of a split's cases with at least ``MIN_LABELED_FRACTION`` labeled pixels."""
        out = []
        for stem in self.case_slices[split]:
            ref = self.refs[stem]
            if ref.label is None:
                continue
            lab = VOLUMES.get(Path(ref.label), LABEL_DTYPE, spacing=self.spacing)
            if float((np.take(lab.array, ref.index, axis=ref.axis) > 0).mean()) >= MIN_LABELED_FRACTION:
                out.append(stem)
        return out

    def stems(self, split: str | None) -> list[str]:
        if split is None or (split == "all" and "all" not in self.splits):
            return sorted(self.refs)
        if split in self.splits:
            missing = [s for s in self.splits[split] if s not in self.refs]
            if missing:
                raise DataError(f"{self.split_file}: split {split!r} names {missing[0]!r}, which is no slice of "
                                f"{self.root} along axis {self.axis} (stems are CASE_{AXIS_LETTERS[self.axis]}NNNN)")
            return list(self.splits[split])
        if split in ("train", "test"):
            return self.labeled_slices(split)
        if split == "unlabeled":
            return list(self.case_slices["unlabeled"])
        have = ", ".join(sorted(set(self.splits) | set(self.default_splits))) or "none"
        raise DataError(f"{self.root}: no split named {split!r}; available: {have}")

    def has_split(self, split: str) -> bool:
        return split in self.splits or split in self.default_splits

    def case_of(self, stem: str) -> str:
        return self.case_names[stem]

    def samples(self, stems: list[str]) -> list[Sample]:
        out = []
        for s in stems:
            ref = self.refs[s]
            if ref.label is None:
                raise DataError(f"{ref.images[0]}: slice {s} has no label volume; labeled splits take cases "
                                f"with labelsTr/ (or labelsTs/)")
            out.append(Sample(s, Path(ref.images[0]), Path(ref.label), ref=ref, intensity=self.intensity,
                              ignore_index=self.ignore_index))
        return out

    def copies(self, stems: set[str] | frozenset[str]) -> set[str]:
        """The slices of the other cases whose voxels equal one of ``stems``' exactly: a labeled crop cut
        from an unlabeled whole scan shares its slices with it (ct_abdomen's crop is slices 82–111 of
        its scan), and a test slab must not come back through the scan. Matched on content, not on the
        affines (that crop's affine keeps the scan's origin). A resampled copy is not found."""
        digests: dict[str, list[str]] = {}

        def digest_of(ref: SliceRef) -> str:  # raw voxels (per-volume schemes would normalise copies apart)
            if ref.images[0] not in digests:  # one case at a time, freed after hashing: not held in memory
                vol = load_canonical(Path(ref.images[0]), spacing=ref.spacing).array
                digests[ref.images[0]] = [hashlib.sha1(np.ascontiguousarray(np.take(vol, i, axis=ref.axis)).tobytes())
                                          .hexdigest() for i in range(vol.shape[ref.axis])]
            return digests[ref.images[0]][ref.index]

        wanted = {digest_of(self.refs[s]) for s in stems}
        mine = {self.refs[s].images[0] for s in stems}
        return {stem for stem, ref in self.refs.items()
                if stem not in stems and ref.images[0] not in mine and digest_of(ref) in wanted}

    def unlabeled_samples(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[Sample]:
        """Every slice of every case (train, test, unlabeled) outside ``exclude`` and its exact copies in
        other cases (:meth:`copies`), labels not read."""
        if exclude:
            extra = self.copies(set(exclude))
            if extra:
                print(f"pretraining also leaves out {len(extra)} slice(s) of other cases that are exact copies of "
                      f"excluded ones ({', '.join(sorted(extra)[:3])}{', ...' if len(extra) > 3 else ''})")
            exclude = set(exclude) | extra
        chosen = [s for s in sorted(self.refs) if s not in exclude]
        if not chosen:
            raise DataError(f"{self.root}: every slice is in the excluded test split; pretraining needs slices "
                            f"outside it (or --include-test)")
        return [Sample(s, Path(self.refs[s].images[0]), None, ref=self.refs[s], intensity=self.intensity)
                for s in chosen]


def resolve_intensity(cfg: DataConfig, root: Path) -> Intensity:
    """The :class:`Intensity` of a volume dataset from ``cfg.intensity``; a ``ct-percentile`` scheme not
    yet fitted is fitted on the training cases now and written back into ``cfg`` (so the run config
    stores it and prediction applies the same)."""
    it = Intensity.from_dict(cfg.intensity) if cfg.intensity else Intensity("percentile")
    if it.scheme == "ct-percentile" and not it.fitted_on:
        it = fit_ct_percentile(NnUNetRaw(root).cases("train"))
        print(f"intensity: ct-percentile fitted on {len(it.fitted_on)} training case(s): clip "
              f"[{it.lo:.1f}, {it.hi:.1f}], mean {it.mean:.1f}, std {it.std:.1f}")
    if it.scheme == "dataset-percentile" and not it.fitted_on:
        it = fit_dataset_percentile(NnUNetRaw(root).cases("train"))
        print(f"intensity: dataset-percentile fitted on every voxel of {len(it.fitted_on)} training case(s): clip "
              f"[{it.lo:.1f}, {it.hi:.1f}] to [-1, 1]")
    cfg.intensity = it.to_dict()
    return it


def open_labeled(cfg: DataConfig, path: str | Path | None = None, split_file: str | Path | None = None):
    """The labeled dataset at ``path`` (default ``cfg.path``): a :class:`VolumeFolder` for an nnU-Net
    raw dataset, else a :class:`LabeledFolder`."""
    root = Path(path or cfg.path)
    ds = (VolumeFolder(root, split_file, cfg.axis, resolve_intensity(cfg, root), cfg.spacing) if is_nnunet_raw(root)
          else LabeledFolder(root, split_file))
    ds.ignore_index = cfg.ignore_index
    if getattr(ds, "has_roi", False) and ds.ignore_index is None:
        ds.ignore_index = ROI_IGNORE  # outside the region of interest: left out, as --ignore-index 255 would
    return ds


def dataset_root(path: Path) -> Path:
    """The dataset root of ``path``: itself, or its parent when ``path`` is a root's ``images/``."""
    path = Path(path)
    if path.name == "images" and not (path / "images").is_dir() and (path.parent / "split.json").is_file():
        return path.parent
    return path


def unlabeled_samples(path: Path, exclude: set[str] | frozenset[str] = frozenset(),
                      intensity: Intensity | None = None, axis: int = 2, spacing=None) -> list[Sample]:
    """Every image under ``path`` (a folder of images, or a dataset root with ``images/``) whose stem
    is not in ``exclude``; for a volume dataset every slice of its train and unlabeled cases (and of its
    test cases, unless excluded)."""
    path = Path(path)
    if is_nnunet_raw(path):
        samples = VolumeFolder(path, axis=axis, intensity=intensity, spacing=spacing).unlabeled_samples(exclude)
        check_volumes([Path(p) for s in samples for p in s.ref.images])  # 3D, finite, before a run folder exists
        return samples
    folder = path / "images" if (path / "images").is_dir() else path
    samples = [Sample(stem, p) for stem, p in list_images(folder).items() if stem not in exclude]
    if not samples:
        raise DataError(f"{folder}: every image is in the excluded test split; pretraining needs images "
                        f"outside it (or --include-test)")
    check_decodes([s.image for s in samples])  # every file decodes, or a DataError naming it
    return samples
