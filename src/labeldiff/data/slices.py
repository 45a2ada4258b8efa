"""A volume dataset's slices as 2D network inputs: a bounded cache so that a volume is decoded (and
normalised) once, not once per slice, and the slice → ``[C, H, W]`` image that training and volume
prediction share.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from labeldiff.data.geometry import load_canonical, to_display
from labeldiff.data.io import DataError
from labeldiff.data.nnunet import Intensity
from labeldiff.data.volume_io import Volume, read_volume

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
VOLUMES = VolumeCache(max_mb=2048)  # one per process: a volume is decoded (and normalised) once, not per slice
LABEL_DTYPE = np.int16  # label volumes in memory: ids up to 32767 at 2 bytes a voxel


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
