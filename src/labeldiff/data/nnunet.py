"""A volume dataset as nnU-Net keeps it: the v2 raw layout, its class names, and the intensity schemes
(nnU-Net's CT and MRI normalisations, fitted on its training cases) that turn voxels into network inputs.

The nnU-Net v2 raw layout (https://github.com/MIC-DKFZ/nnUNet, ``dataset_format.md``)::

    ROOT/dataset.json            {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                                  "file_ending": ".nii.gz", ...}
    ROOT/imagesTr/CASE_0000.nii.gz   one file per channel (_0000, _0001, ...)
    ROOT/labelsTr/CASE.nii.gz        integer label volume, same grid as the images
    ROOT/imagesTs/CASE_0000.nii.gz   test cases (labels optional in labelsTs/)
    ROOT/imagesUnlabeled/...         (labeldiff's addition) cases without labels, for pretraining

Reading one volume is :mod:`labeldiff.data.volume_io`, its frame and spacing :mod:`labeldiff.data.geometry`,
its slices as network inputs :mod:`labeldiff.data.slices`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from labeldiff.data.io import DataError
from labeldiff.data.volume_io import read_volume
from labeldiff.errors import ConfigError
from labeldiff.portable import apply_intensity, volume_percentiles  # noqa: F401

SPLIT_FOLDERS = {"train": "imagesTr", "test": "imagesTs", "unlabeled": "imagesUnlabeled"}
LABEL_FOLDERS = {"train": "labelsTr", "test": "labelsTs"}
INTENSITY_SCHEMES = ("ct-window", "ct-percentile", "dataset-percentile", "percentile", "zscore", "none")
CT_PERCENTILES = (0.5, 99.5)  # nnU-Net's CT scheme and the CT paper's clipping
MAX_FIT_VOXELS = 1_000_000  # voxels per case used to fit dataset-wide statistics (strided, deterministic)


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
    - ``dataset-percentile``: the CT paper's scheme — the 0.5 / 99.5 percentiles of every voxel of every
      training case, pooled; clip every volume to them and scale to [-1, 1];
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
            raise ConfigError(f"intensity scheme must be one of {', '.join(INTENSITY_SCHEMES)}, not {self.scheme!r}")
        if self.scheme == "ct-window" and not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
            raise ConfigError(f"ct-window needs a window lo < hi in HU (e.g. -160, 240), got [{self.lo}, {self.hi}]")

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Normalise a whole volume (the per-volume schemes take their statistics from it;
        :func:`labeldiff.portable.apply_intensity`)."""
        return apply_intensity(x, self.scheme, self.lo, self.hi, self.mean, self.std)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

    @classmethod
    def named(cls, scheme: str, hu_window: tuple[float, float] | None = None) -> Intensity:
        """The scheme a user names (``--intensity``, ``--hu-window``), not yet fitted."""
        if scheme == "ct-window":
            if hu_window is None:
                raise ConfigError("--intensity ct-window needs --hu-window LO HI (e.g. -160 240 for the abdomen)")
            return cls(scheme, float(hu_window[0]), float(hu_window[1]))
        if hu_window is not None:
            raise ConfigError("--hu-window applies to --intensity ct-window only")
        return cls(scheme)

    @classmethod
    def from_dict(cls, d: dict) -> Intensity:
        d = dict(d)
        d["lo"] = -math.inf if d.get("lo") is None else d["lo"]
        d["hi"] = math.inf if d.get("hi") is None else d["hi"]
        return cls(**d)


def fit_dataset_percentile(cases: list[Case], channel: int = 0) -> Intensity:
    """The ``dataset-percentile`` scheme fitted on ``cases`` (the training cases: never the test cases): the
    0.5 / 99.5 percentiles of all their voxels, pooled (each case strided to at most :data:`MAX_FIT_VOXELS`)."""
    if not cases:
        raise DataError("dataset-percentile needs at least one training case to fit its percentiles")
    values = []
    for c in cases:
        v = read_volume(c.images[channel]).array.ravel()
        values.append(v[::max(1, v.size // MAX_FIT_VOXELS)])
    lo, hi = np.percentile(np.concatenate(values).astype(np.float64), CT_PERCENTILES)
    return Intensity("dataset-percentile", lo=float(lo), hi=float(hi), fitted_on=[c.name for c in cases])


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
