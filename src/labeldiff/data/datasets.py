"""Labeled and unlabeled image folders, splits, k-shot subsets and per-step batches.

A labeled dataset is ``ROOT/images/*`` + ``ROOT/masks/*`` (same stem) + optional
``ROOT/split.json`` (``{"train": [stems], "test": [stems], ...}``), or an nnU-Net v2 raw volume
dataset (:class:`VolumeFolder`: its volumes as 2D slices, read lazily). An unlabeled dataset is a
folder of images, the ``images/`` of a labeled one, or a volume dataset. Nothing is read until it is
needed; decoded images sit in a cache bounded in megabytes, decoded volumes in one per process.
"""
from __future__ import annotations

import hashlib
import json
import re
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from labeldiff.config import DataConfig
from labeldiff.data.augment import seed_from
from labeldiff.data.io import (IMAGE_SUFFIXES, DataError, check_decodes, check_mask_values, image_size, mask_values,
                               read_image, read_mask)
from labeldiff.data.geometry import check_spacing, load_canonical, volume_shape
from labeldiff.data.nnunet import fit_ct_percentile, Intensity, is_nnunet_raw, NnUNetRaw
from labeldiff.data.slices import (AXIS_LETTERS, LABEL_DTYPE, MIN_LABELED_FRACTION, VOLUMES, read_slice_image,
                                   read_slice_mask, slice_stem, SliceRef)
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

    @property
    def key(self) -> str:
        return self.ref.key if self.ref is not None else str(self.image)

    def read_image(self, channels: int) -> np.ndarray:
        if self.ref is not None:
            return read_slice_image(self.ref, channels, self.intensity or Intensity("percentile"))
        return read_image(self.image, channels)

    def read_mask(self, num_classes: int | None = None) -> np.ndarray:
        if self.ref is not None:
            return read_slice_mask(self.ref, num_classes, self.ignore_index)
        assert self.mask is not None
        return read_mask(self.mask, num_classes, self.ignore_index)

    def size(self) -> tuple[int, int]:
        """(height, width) without decoding an image file (a volume slice: its display square)."""
        if self.ref is not None:
            shape = volume_shape(Path(self.ref.images[0]), self.ref.spacing)
            side = max(n for i, n in enumerate(shape) if i != self.ref.axis)
            return side, side
        return image_size(self.image)


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
            out.append(Sample(s, self.images[s], self.masks[s], ignore_index=self.ignore_index))
        return out


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


def slab_split(ds: VolumeFolder, train_fraction: float, gap: int = 4) -> dict:
    """Per labeled case, its lower slab (the first ``train_fraction`` of its labeled slices) to train and
    the slices after ``gap`` more to test: the CT paper's "label a few slices of one slab, predict a
    disjoint one"."""
    from labeldiff.data.volumes import slab_splits

    if not 0 < train_fraction < 1:
        raise DataError(f"slab_train must lie in (0, 1), got {train_fraction}")
    split: dict = {"train": [], "test": []}
    labeled = ds.stems("train")
    for case in ds.cases["train"]:
        part = slab_splits([s for s in labeled if ds.case_of(s) == case.name], train_frac=train_fraction, gap=gap)
        split["train"] += part["train"]
        split["test"] += part["test"]
    split["note"] = (f"slabs along axis {ds.axis}: per case the first {train_fraction:.0%} of the labeled slices "
                     f"train, the rest after a gap of {gap} test")
    return split


def resolve_intensity(cfg: DataConfig, root: Path) -> Intensity:
    """The :class:`Intensity` of a volume dataset from ``cfg.intensity``; a ``ct-percentile`` scheme not
    yet fitted is fitted on the training cases now and written back into ``cfg`` (so the run config
    stores it and prediction applies the same)."""
    it = Intensity.from_dict(cfg.intensity) if cfg.intensity else Intensity("percentile")
    if it.scheme == "ct-percentile" and not it.fitted_on:
        it = fit_ct_percentile(NnUNetRaw(root).cases("train"))
        print(f"intensity: ct-percentile fitted on {len(it.fitted_on)} training case(s): clip "
              f"[{it.lo:.1f}, {it.hi:.1f}], mean {it.mean:.1f}, std {it.std:.1f}")
    cfg.intensity = it.to_dict()
    return it


def open_labeled(cfg: DataConfig, path: str | Path | None = None, split_file: str | Path | None = None):
    """The labeled dataset at ``path`` (default ``cfg.path``): a :class:`VolumeFolder` for an nnU-Net
    raw dataset, else a :class:`LabeledFolder`."""
    root = Path(path or cfg.path)
    ds = (VolumeFolder(root, split_file, cfg.axis, resolve_intensity(cfg, root), cfg.spacing) if is_nnunet_raw(root)
          else LabeledFolder(root, split_file))
    ds.ignore_index = cfg.ignore_index
    return ds


MAX_INFERRED_CLASSES = 32  # more distinct mask values than this, with no K given, is a lossy or anti-aliased mask


def validate_samples(samples: list[Sample], num_classes: int | None, hint: str | None = None) -> int:
    """Check every pair (image decodes, same size, integer values < K) and return K.

    Files are decoded and their masks' values scanned once, with a progress bar on large datasets, and
    remembered by size and mtime (:class:`~labeldiff.data.io.ScanCache`): a second run is instant.

    With ``num_classes=None``, K is inferred as max label + 1 over these samples (at least 2) — but
    only when that is unambiguous: masks holding only 0 and 255 (a binary mask saved for viewing),
    a few small classes and 255 (Pascal VOC's "not labeled"; see ``ignore_index``) or more than
    ``MAX_INFERRED_CLASSES`` distinct values (a JPEG or anti-aliased mask) stop with an error naming
    a file and the fix. Pixels of a sample's ``ignore_index`` are no class. ``hint``: the fix a value ≥ K
    names instead of ``--num-classes`` (evaluate, whose K is the run's).
    """
    if not samples:
        raise DataError("no samples to validate: the split is empty")
    values: set[int] = set()
    first_with: dict[int, Path] = {}
    files = [s for s in samples if s.ref is None]
    check_decodes([s.image for s in files])
    check_volumes([Path(p) for s in samples if s.ref is not None for p in s.ref.images])
    known = dict(zip((s.mask for s in files), mask_values([s.mask for s in files])))  # scanned once, cached
    for s in samples:
        ih, iw = s.size()
        assert s.mask is not None
        if s.ref is None:
            mh, mw = image_size(s.mask)
            present = known[s.mask]
            if num_classes is not None:
                check_mask_values(s.mask, present, num_classes, s.ignore_index, hint)
        else:
            mask = s.read_mask(num_classes)
            (mh, mw), present = mask.shape, np.unique(mask).tolist()
        if (mh, mw) != (ih, iw):
            raise DataError(f"mask {s.mask} is {mw}×{mh} but image {s.image} is {iw}×{ih}; "
                            f"masks must have the image's size")
        if num_classes is None:
            for v in present:
                if v == s.ignore_index:
                    continue
                if v not in values:
                    values.add(v)
                    first_with[v] = s.mask
    if num_classes is not None:
        return num_classes
    if 255 in values and values <= {0, 255}:
        raise DataError(f"{first_with[255]}: masks hold only the values 0 and 255 (a binary mask saved for viewing); "
                        f"re-save them as 0 = background, 1 = foreground (mask // 255), pass --ignore-index 255 if "
                        f"255 means not labeled, or --num-classes 256 if 255 really is a class")
    others = values - {255}
    if 255 in values and others and max(others) < 128:
        raise DataError(f"{first_with[255]}: masks hold the classes {sorted(others)[:6]} and 255, which in Pascal VOC, "
                        f"Cityscapes and their kin marks unlabeled pixels; pass --ignore-index 255 (left out of the "
                        f"loss and the metrics), or --num-classes 256 if 255 really is a class")
    if not values:
        raise DataError(f"{samples[0].mask}: every mask pixel is --ignore-index {samples[0].ignore_index}; label some")
    if len(values) > MAX_INFERRED_CLASSES:
        many = max(first_with.values(), key=lambda f: sum(first_with[v] == f for v in first_with))
        raise DataError(f"{many}: the masks hold {len(values)} distinct values ({min(values)}..{max(values)}), the "
                        f"sign of a JPEG-compressed or anti-aliased mask; save masks as lossless PNG class maps, or "
                        f"pass --num-classes K if there really are that many classes")
    return max(2, max(values) + 1)


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


def pretraining_exclusions(cfg: DataConfig) -> tuple[list[str], str]:
    """The stems that unlabeled pretraining must not read, and a sentence saying why.

    By default the test split (``cfg.test_split`` of ``cfg.split_file`` or the dataset's
    ``split.json``) is left out, so a model is never pretrained on the images it is scored on.
    ``cfg.include_test`` opts in to the transductive protocol of the MDM paper (Table 1 pretrains
    on all 44 MoNuSeg images, test included). A folder with no split file has nothing to exclude.
    """
    root = dataset_root(Path(cfg.path))
    if is_nnunet_raw(root):
        ds = VolumeFolder(root, cfg.split_file, cfg.axis, spacing=cfg.spacing)
        splits = {cfg.test_split: ds.stems(cfg.test_split)} if ds.has_split(cfg.test_split) else {}
    else:
        splits = read_splits(split_path(root, cfg.split_file))
    test = splits.get(cfg.test_split, [])
    if cfg.include_test:
        return [], (f"include_test: pretraining also reads the {len(test)} images of split "
                    f"{cfg.test_split!r} (the transductive protocol of the MDM paper)")
    if not test:
        where = "no split file" if not splits else f"no split {cfg.test_split!r} in the split file"
        return [], f"{where}: pretraining reads every image"
    return test, (f"pretraining leaves out the {len(test)} images of split {cfg.test_split!r} "
                  f"(--include-test, or include_test: true in a study, reads them too: the MDM paper's "
                  f"transductive protocol)")


def pretraining_samples(cfg: DataConfig) -> tuple[list[Sample], list[str], str]:
    """What unlabeled pretraining reads — every image (every slice of a volume dataset, normalised by its
    resolved intensity scheme) outside :func:`pretraining_exclusions` — the stems left out, and the
    sentence saying why."""
    excluded, why = pretraining_exclusions(cfg)
    root = Path(cfg.path)
    intensity = resolve_intensity(cfg, root) if is_nnunet_raw(root) else None
    return unlabeled_samples(root, set(excluded), intensity, cfg.axis, cfg.spacing), excluded, why


def select_subset(stems: list[str], k: int, seed: int, split_name: str = "train", unit: str = "images") -> list[str]:
    """Pick ``k`` stems reproducibly for ``seed`` (order-independent of the input order)."""
    if k < 1:
        raise DataError(f"--labels must be at least 1 (got {k})")
    if k > len(stems):
        raise DataError(f"--labels {k} is larger than the {split_name!r} split ({len(stems)} {unit}); "
                        f"use --labels {len(stems)} or fewer")
    return sorted(random.Random(seed).sample(sorted(stems), k))


class ImageCache:
    """Decoded, scaled images kept in RAM up to ``max_mb`` megabytes (least recently used out)."""

    def __init__(self, max_mb: int):
        self.max_bytes = max_mb * 2**20
        self.items: OrderedDict[str, np.ndarray] = OrderedDict()
        self.bytes = 0

    def get(self, key: str, load) -> np.ndarray:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = load()
        if value.nbytes <= self.max_bytes:
            self.items[key] = value
            self.bytes += value.nbytes
            while self.bytes > self.max_bytes:
                _, old = self.items.popitem(last=False)
                self.bytes -= old.nbytes
        return value


def resize_image(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased) resize of ``[C, H, W]`` or ``[B, C, H, W]``."""
    squeeze = x.dim() == 3
    y = x[None] if squeeze else x
    if tuple(y.shape[-2:]) != tuple(hw):
        y = F.interpolate(y, size=hw, mode="bilinear", antialias=True, align_corners=False)
    return y[0] if squeeze else y


def resize_mask(m: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of an integer mask ``[H, W]``."""
    if tuple(m.shape) == tuple(hw):
        return m
    return F.interpolate(m[None, None].float(), size=hw, mode="nearest-exact")[0, 0].long()


def network_hw(hw: tuple[int, int], cfg: DataConfig) -> tuple[int, int]:
    """The size an image of size ``hw`` is brought to before the network sees it."""
    if cfg.mode == "resize":
        return cfg.size, cfg.size
    h, w = max(1, round(hw[0] * cfg.scale)), max(1, round(hw[1] * cfg.scale))
    if min(h, w) < cfg.size:  # too small for a crop: enlarge so the short side equals the crop
        f = cfg.size / min(h, w)
        h, w = max(cfg.size, round(h * f)), max(cfg.size, round(w * f))
    return h, w


def check_scaled_images(samples: list[Sample], cfg: DataConfig) -> None:
    """Refuse, before a run folder exists, a ``--channels`` the images cannot be read with (2D images are
    grey or RGB; a volume case has its channel files), and a ``--scale`` (or ``--size``) that brings the
    largest image to more pixels than this machine's memory holds (the decoded image and its resized
    copy, float32)."""
    import os

    for s in samples:
        have = 0 if s.ref is None else len(s.ref.images)
        if s.ref is None and cfg.channels not in (1, 3):
            raise DataError(f"--channels {cfg.channels}: 2D images are read as grey (1 channel) or RGB (3; alpha is "
                            f"dropped), e.g. {s.image}; give --channels 1 or 3")
        if s.ref is not None and cfg.channels != have and not (have == 1 and cfg.channels == 3):
            raise DataError(f"--channels {cfg.channels}: the cases of this dataset have {have} channel file(s) "
                            f"(dataset.json channel_names), e.g. {s.image}; give --channels {have}")
    sizes: dict[str, tuple[int, int]] = {}
    for s in samples:  # one header per file (a volume's slices share theirs)
        key = str(s.image) if s.ref is None else f"{s.ref.images[0]}#{s.ref.axis}"
        if key not in sizes:
            sizes[key] = s.size()
    if not sizes:
        return
    (h0, w0), name = max((hw, k) for k, hw in sizes.items())
    h, w = network_hw((h0, w0), cfg)
    need = 2 * 4 * cfg.channels * (h * w + h0 * w0)
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        by = (f"--size {cfg.size} (a crop of it needs the short side that long)" if cfg.mode == "resize" or
              min(round(h0 * cfg.scale), round(w0 * cfg.scale)) < cfg.size else f"--scale {cfg.scale:g}")
        raise DataError(f"{name.split('#')[0]}: {by} brings this {w0}×{h0} image to {w}×{h} pixels, "
                        f"{need / 2**30:,.0f} GiB in memory, more than this machine's {have / 2**30:,.0f} GiB; lower "
                        f"{by.split(' (')[0].split(' ')[0]}")


class ScaledImages:
    """Loads an image (and mask) brought to :func:`network_hw`, through an :class:`ImageCache`."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.cache = ImageCache(cfg.cache_mb)

    def image(self, s: Sample) -> torch.Tensor:
        def load() -> np.ndarray:
            x = torch.from_numpy(s.read_image(self.cfg.channels))
            return resize_image(x, network_hw(tuple(x.shape[-2:]), self.cfg)).numpy()
        return torch.from_numpy(self.cache.get(f"i:{s.key}", load))

    def mask(self, s: Sample, num_classes: int | None = None) -> torch.Tensor:
        assert s.mask is not None

        def load() -> np.ndarray:
            m = torch.from_numpy(s.read_mask(num_classes))
            return resize_mask(m, network_hw(tuple(m.shape), self.cfg)).to(torch.uint8 if m.max() < 256 else torch.int64).numpy()
        return torch.from_numpy(self.cache.get(f"m:{s.key}", load)).long()


class StepBatches(torch.utils.data.Dataset):
    """``batches[step]`` is the training batch of that step, fully determined by ``(seed, step)``.

    Images are drawn with replacement, randomly cropped to ``size``² (crop mode), flipped along the
    axes of ``flips`` with probability 0.5 each, and transformed by ``augment`` (a
    :class:`labeldiff.data.augment.Augment`; None: no transform). Because a batch depends only on
    the step, a resumed run sees exactly the batches an uninterrupted one would.

    ``extra``: in-memory (images ``[N, C, S, S]``, masks ``[N, S, S]``) pairs, e.g. synthetic ones
    (:mod:`labeldiff.sample.synthetic`); each batch slot is one of them with probability
    ``extra_fraction`` and goes through the same crop, flips and augmentation. Without ``extra`` the
    batches are the ones drawn before it existed.
    Returns ``{"image": [B, C, S, S] float32, "mask": [B, S, S] int64 (labeled only)}``.
    """

    def __init__(self, samples: list[Sample], cfg: DataConfig, batch_size: int, seed: int,
                 labeled: bool, num_classes: int | None = None, flips: str = "h", augment=None,
                 extra: tuple[torch.Tensor, torch.Tensor] | None = None, extra_fraction: float = 0.0):
        if not samples:
            raise DataError("no training images")
        self.samples, self.cfg, self.batch_size, self.seed = samples, cfg, batch_size, seed
        self.labeled, self.num_classes, self.flips, self.augment = labeled, num_classes, flips, augment
        self.loader = ScaledImages(cfg)
        self.extra, self.extra_fraction = extra, extra_fraction
        if extra is not None and not (labeled and len(extra[0]) == len(extra[1]) > 0):
            raise ValueError("extra pairs need a labeled StepBatches and as many masks as images (at least one)")

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randint(len(self.samples), (self.batch_size,), generator=g)
        if self.extra is not None:
            from_extra = (torch.rand(self.batch_size, generator=g) < self.extra_fraction).tolist()
            extra_idx = torch.randint(len(self.extra[0]), (self.batch_size,), generator=g).tolist()
        images, masks = [], []
        s = self.cfg.size
        for slot, i in enumerate(idx.tolist()):
            if self.extra is not None and from_extra[slot]:
                x, m = self.extra[0][extra_idx[slot]], self.extra[1][extra_idx[slot]]
            else:
                sample = self.samples[i]
                x = self.loader.image(sample)
                m = self.loader.mask(sample, self.num_classes) if self.labeled else None
            h, w = x.shape[-2:]
            wh = self.augment.window(h) if self.augment else s
            ww = self.augment.window(w) if self.augment else s
            top = int(torch.randint(h - wh + 1, (1,), generator=g))
            left = int(torch.randint(w - ww + 1, (1,), generator=g))
            hflip = bool(torch.rand(1, generator=g) < 0.5) and "h" in self.flips
            vflip = "v" in self.flips and bool(torch.rand(1, generator=g) < 0.5)
            x = x[:, top:top + wh, left:left + ww]
            if m is not None:
                m = m[top:top + wh, left:left + ww]
            for flip, dim in ((hflip, -1), (vflip, -2)):
                if flip:
                    x = x.flip(dim)
                    m = m.flip(dim) if m is not None else None
            if self.augment is not None:
                x, m = self.augment(x, m, seed_from(g))
            images.append(x)
            if m is not None:
                masks.append(m)
        out = {"image": torch.stack(images).contiguous()}
        if self.labeled:
            out["mask"] = torch.stack(masks).contiguous()
        return out


def step_loader(batches: StepBatches, start: int, stop: int, num_workers: int, pin_memory: bool = False):
    """Iterate ``batches[start:stop]``, optionally decoding in worker processes (4 batches ahead each);
    ``pin_memory`` (for CUDA) puts batches in page-locked memory so the copy to the GPU can overlap."""
    return torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start, stop),
                                       num_workers=num_workers, persistent_workers=False,
                                       prefetch_factor=4 if num_workers else None, pin_memory=pin_memory)


def group_split(stems: list[str], groups: dict[str, object], test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Split ``stems`` into ``train`` / ``test`` so that no group (e.g. a video) is on both sides.

    Whole groups are drawn at random (``seed``) into ``test`` until it holds at least
    ``test_fraction`` of the images. Every stem must have a group.
    """
    missing = [s for s in stems if s not in groups]
    if missing:
        raise DataError(f"{len(missing)} images have no group (e.g. {missing[:3]}); the groups file must map "
                        f"every image stem to its group (video, patient, …)")
    if not 0 < test_fraction < 1:
        raise DataError(f"test fraction must be in (0, 1), got {test_fraction}")
    by_group: dict[str, list[str]] = {}
    for s in stems:
        by_group.setdefault(str(groups[s]), []).append(s)
    if len(by_group) < 2:
        raise DataError("all images are in one group; a group split needs at least two groups")
    order = sorted(by_group)
    perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
    test_groups: list[str] = []
    n_test = 0
    for i in perm:
        if n_test >= test_fraction * len(stems) or len(test_groups) == len(order) - 1:
            break
        test_groups.append(order[i])
        n_test += len(by_group[order[i]])
    test = sorted((s for g in test_groups for s in by_group[g]), key=_natural)
    train = sorted((s for s in stems if str(groups[s]) not in set(test_groups)), key=_natural)
    return {"train": train, "test": test,
            "train_groups": sorted(set(order) - set(test_groups), key=_natural),
            "test_groups": sorted(test_groups, key=_natural)}


def _natural(s: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s))
