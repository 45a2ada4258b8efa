"""Training batches: :class:`StepBatches`, the torch ``Dataset`` whose item ``step`` is that step's batch
(fully determined by the seed and the step, so a resumed run sees the batches an uninterrupted one
would), and the images it draws, decoded once, brought to the network's scale (:func:`network_hw`) and
kept in a cache bounded in megabytes (:class:`ScaledImages`).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from labeldiff import portable
from labeldiff.config import DataConfig
from labeldiff.portable import resize_image  # noqa: F401  (the one resize, shared with exported bundles)
from labeldiff.data.augment import seed_from
from labeldiff.data.folders import Sample
from labeldiff.data.io import DataError


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


def resize_mask(m: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of an integer mask ``[H, W]``."""
    if tuple(m.shape) == tuple(hw):
        return m
    return F.interpolate(m[None, None].float(), size=hw, mode="nearest-exact")[0, 0].long()


def network_hw(hw: tuple[int, int], cfg: DataConfig) -> tuple[int, int]:
    """The size an image of size ``hw`` is brought to before the network sees it (:func:`portable.network_hw`)."""
    return portable.network_hw(hw, cfg.mode, cfg.size, cfg.scale)


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
