"""Checking samples before a run folder exists: every image decodes, every mask has its image's size
and holds integer classes below K (and K inferred when it is not given), and no image is too large for
this machine's memory at the network's scale. Each failure is one line naming the file and the fix."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from labeldiff.config import DataConfig
from labeldiff.data.datasets import network_hw
from labeldiff.data.folders import Sample
from labeldiff.data.io import DataError, check_decodes, check_mask_values, image_size, mask_values
from labeldiff.data.volume_io import check_volumes

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
        if s.ref is None and s.roi is not None:  # only what lies inside the region of interest counts
            mask = s.read_mask()
            (mh, mw), present = mask.shape, np.unique(mask).tolist()
            if num_classes is not None:
                check_mask_values(s.mask, present, num_classes, s.ignore_index, hint)
        elif s.ref is None:
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
