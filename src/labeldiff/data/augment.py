"""Image + mask augmentation for few-label fine-tuning, built from MONAI's dictionary transforms.

nnU-Net's default 2D pipeline (Isensee et al. 2021, supplementary "data augmentation") is the
anchor: rotation and scaling, elastic deformation, Gaussian noise and blur, brightness, contrast
and gamma, mirroring. Three levels (``transfer.augment``):

- ``none``: only the random crop window (and the flips of ``transfer.flips``);
- ``light``: + rotation ±15°, scale ±10 %, brightness ±15 %, gamma 0.8–1.25;
- ``strong``: nnU-Net-like: any rotation, scale 0.7–1.4, elastic deformation, noise, blur,
  brightness, contrast (about the mean) and gamma.

Flips are separate (``transfer.flips``: ``h``, ``v``, ``hv`` or ``none``) because which mirrorings make
sense is a property of the data: any for tiles of histology or endoscopy, only left–right for an
axial brain slice. ``h`` with ``none`` is what labeldiff did before augmentation levels existed.

Spatial transforms resample image (bilinear) and mask (nearest) with the same random draw, so they
stay aligned; intensity transforms touch the image only, in [0, 1] (images are stored in [−1, 1])
and are clipped back to the input range. A sample's transform is fully determined by an integer
seed, so a batch still depends only on ``(seed, step)`` and resumed runs see the same batches.
"""
from __future__ import annotations

import math

import torch

from labeldiff.config import AUGMENT_LEVELS as LEVELS
from labeldiff.config import check_augment

CONTEXT = 1.5  # crop mode: spatial levels rotate a window this much larger, then keep its centre


class Augment:
    """``aug(image [C, h, w], mask [h, w] | None, seed) -> (image [C, S, S], mask [S, S] | None)``.

    The input may be larger than ``size`` (see :meth:`window`); the output is its centre ``size``²
    after the random transform.
    """

    def __init__(self, level: str, size: int):
        check_augment(level, "none")
        self.level, self.size = level, int(size)
        self.transform = _pipeline(level, self.size) if level != "none" else None

    def window(self, available: int) -> int:
        """Side of the crop to take from an image side of ``available`` pixels (≥ ``size``)."""
        if self.transform is None:
            return self.size
        return max(self.size, min(available, math.ceil(self.size * CONTEXT)))

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None, seed: int):
        if self.transform is None:
            return _centre(image, self.size), (None if mask is None else _centre(mask, self.size))
        lo, hi = float(image.min()), float(image.max())
        data = {"image": (image + 1) / 2}
        if mask is not None:
            data["mask"] = mask[None].float()
        self.transform.set_random_state(seed=seed)
        out = self.transform(data)
        x = torch.as_tensor(out["image"]).float() * 2 - 1
        x = x.clamp(min(lo, -1.0), max(hi, 1.0))
        m = torch.as_tensor(out["mask"])[0].round().long() if mask is not None else None
        return x.contiguous(), m


def _centre(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def _pipeline(level: str, size: int):
    from monai.transforms import (Compose, Rand2DElasticd, RandAdjustContrastd, RandAffined, RandGaussianNoised,
                                  RandGaussianSmoothd, RandScaleIntensityd, RandScaleIntensityFixedMeand)

    both, modes = ["image", "mask"], ("bilinear", "nearest")
    spatial = dict(keys=both, mode=modes, padding_mode="reflection", allow_missing_keys=True)
    if level == "light":
        return Compose([
            RandAffined(prob=0.5, rotate_range=math.pi / 12, scale_range=0.1, spatial_size=(size, size), **spatial),
            RandScaleIntensityd(keys="image", prob=0.3, factors=0.15),
            RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.8, 1.25)),
        ])
    # strong: nnU-Net's probabilities and ranges (rotation ±180° and scale 0.7–1.4 in 2D, p = 0.2 each;
    # noise p 0.1, blur p 0.2, brightness p 0.15, contrast p 0.15, gamma p 0.3); elastic at p 0.2
    return Compose([
        RandAffined(prob=0.35, rotate_range=math.pi, scale_range=(-0.3, 0.4), spatial_size=(size, size), **spatial),
        Rand2DElasticd(prob=0.2, spacing=(max(size // 4, 2),) * 2, magnitude_range=(1.0, 2.0), **spatial),
        RandGaussianNoised(keys="image", prob=0.1, std=0.05),
        RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0)),
        RandScaleIntensityd(keys="image", prob=0.15, factors=0.25),
        RandScaleIntensityFixedMeand(keys="image", prob=0.15, factors=0.25),
        RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.7, 1.5)),
    ])


def seed_from(g: torch.Generator) -> int:
    """An integer seed for one sample's transform, drawn from the batch's generator."""
    return int(torch.randint(2**31 - 1, (1,), generator=g))
