"""Pretext tasks on a *labeled* source domain: hybrid diffusion and its supervised baseline.

Hybrid diffusion (Sauvalle & Salzmann 2024): the network sees only the noisy image x_t and t and
estimates both the clean image and the one-hot mask, i.e. E[x, y | x_t]; loss = MSE(image) +
λ·MSE(mask) with λ = ``mask_weight`` (1e-4 in the paper). The image part follows ``prediction``
(x₀ = 'sample', the paper's estimate of the clean image, or ε). With t = 0 the mask channels are a
segmenter; run backwards, the network samples (image, mask) pairs (:mod:`labeldiff.sample.diffusion`).

``image_weight: 0`` is the hybrid's mask-only twin: the same network, the same noisy inputs x_t at the same
uniform t and the same mask loss, no image term — a supervised baseline trained on the hybrid's footing.

Supervised pretraining: the same network, input the clean image at t = 0, output K class scores,
Dice + cross-entropy — the baseline the hybrid paper compares against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from labeldiff.config import CorruptionConfig
from labeldiff.corruption.base import Corrupted, Corruption
from labeldiff.corruption.gaussian import GaussianNoise
from labeldiff.errors import ConfigError


def _need_mask(mask: torch.Tensor | None, name: str) -> torch.Tensor:
    if mask is None:
        raise ConfigError(f"the {name} pretext task needs masks: pretrain it on a labeled dataset "
                         f"(images/ + masks/ + split.json)")
    return mask


class HybridDiffusion(Corruption):
    name = "hybrid"
    needs_labels = True

    def __init__(self, cfg: CorruptionConfig):
        if cfg.mask_weight < 0:
            raise ConfigError(f"mask_weight (λ) must be ≥ 0, got {cfg.mask_weight}")
        self.cfg = cfg
        self.noise = GaussianNoise(cfg)
        self.num_classes: int | None = None

    def out_channels(self, in_channels: int, num_classes: int | None = None) -> int:
        if not num_classes:
            raise ValueError("hybrid pretraining needs the number of classes K (from the masks)")
        self.num_classes = num_classes
        return in_channels + num_classes

    def __call__(self, x0: torch.Tensor, generator: torch.Generator, mask: torch.Tensor | None = None) -> Corrupted:
        """x0 [B, C, H, W], mask [B, H, W] → input x_t, target [B, C + K, H, W] = (image target, one-hot)."""
        mask = _need_mask(mask, self.name)
        k = self.num_classes or int(mask.max()) + 1
        c = self.noise(x0, generator)
        onehot = F.one_hot(mask.long(), k).permute(0, 3, 1, 2).to(x0.dtype)
        return Corrupted(input=c.input, t=c.t, target=torch.cat([c.target, onehot], dim=1))

    def split(self, out: torch.Tensor, in_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Network output [B, C + K, H, W] → (image part [B, C, …], mask part [B, K, …])."""
        return out[:, :in_channels], out[:, in_channels:]

    def loss(self, pred: torch.Tensor, c: Corrupted) -> torch.Tensor:
        ch = c.input.shape[1]
        img_pred, mask_pred = self.split(pred.float(), ch)
        img_target, mask_target = self.split(c.target.float(), ch)
        image_term = F.mse_loss(img_pred, img_target) if self.cfg.image_weight else img_pred.sum() * 0.0
        return self.cfg.image_weight * image_term + self.cfg.mask_weight * F.mse_loss(mask_pred, mask_target)


class SupervisedSegmentation(Corruption):
    """Not a corruption: clean image in, mask out — so supervised pretraining shares the one loop."""

    name = "supervised"
    needs_labels = True
    archs = ("unet", "efficientnet-unet")

    def __init__(self, cfg: CorruptionConfig, ce_weight: float = 0.5):
        self.cfg = cfg
        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=ce_weight, lambda_dice=1.0 - ce_weight)

    def out_channels(self, in_channels: int, num_classes: int | None = None) -> int:
        if not num_classes:
            raise ValueError("supervised pretraining needs the number of classes K (from the masks)")
        return num_classes

    def __call__(self, x0: torch.Tensor, generator: torch.Generator, mask: torch.Tensor | None = None) -> Corrupted:
        mask = _need_mask(mask, self.name)
        t = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
        return Corrupted(input=x0, t=t, target=mask[:, None].long())

    def loss(self, pred: torch.Tensor, c: Corrupted) -> torch.Tensor:
        return self.dice_ce(pred.float(), c.target)
