"""Decoder denoising pretraining (DDeP) and denoising pretraining (DeP), Brempong et al. 2022.

One fixed noise level, no timestep (§3–4):

- scaled additive noise (Eq. 6, the paper's choice): x̃ = √γ·x + √(1−γ)·ε with γ = 1/(1+σ²), so a
  unit-variance x gives a unit-variance x̃ whatever σ;
- simple additive noise (Eq. 1, the Fig. 5 ablation): x̃ = x + σ·ε.

The network predicts ε (default; Table 1: noise prediction beats image prediction without an input
skip) or x₀ (``prediction='sample'``). σ = 0.22 is the best value of Fig. 5 for scaled noise.
``ddep`` keeps the supervised encoder frozen (the pretraining run does that); ``dep`` trains the
whole network from random weights. Both use :class:`labeldiff.models.effunet.EfficientNetUNet`.
"""
from __future__ import annotations

import math

import torch

from labeldiff.config import CorruptionConfig
from labeldiff.corruption.base import Corrupted, Corruption
from labeldiff.runtime import randn
from labeldiff.errors import ConfigError

NOISES = ("scaled", "additive")


class DecoderDenoising(Corruption):
    name = "ddep"
    archs = ("efficientnet-unet",)

    def __init__(self, cfg: CorruptionConfig):
        if cfg.noise not in NOISES:
            raise ConfigError(f"noise {cfg.noise!r} is unknown; use 'scaled' (√γ·x + √(1−γ)·ε) or 'additive' (x + σ·ε)")
        if cfg.prediction not in ("epsilon", "sample"):
            raise ConfigError(f"prediction {cfg.prediction!r} is unknown; use 'epsilon' or 'sample' (x0)")
        if not cfg.sigma > 0:
            raise ConfigError(f"sigma must be positive (DDeP's best: 0.22), got {cfg.sigma}")
        self.cfg = cfg

    @property
    def gamma(self) -> float:
        """γ = 1 / (1 + σ²)."""
        return 1.0 / (1.0 + self.cfg.sigma ** 2)

    def __call__(self, x0: torch.Tensor, generator: torch.Generator, mask: torch.Tensor | None = None) -> Corrupted:
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
        x = (x0 + 1.0) / 2.0 if self.cfg.noise_range == "unit" else x0  # DDeP's σ is relative to [0, 1] pixels
        if self.cfg.noise == "scaled":
            noisy = math.sqrt(self.gamma) * x + math.sqrt(1.0 - self.gamma) * noise
        else:
            noisy = x + self.cfg.sigma * noise
        if self.cfg.noise_range == "unit":
            noisy = noisy * 2.0 - 1.0  # back to the [-1, 1] images the network reads
        t = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)  # no timestep: the network ignores it
        return Corrupted(input=noisy, t=t, target=noise if self.cfg.prediction == "epsilon" else x0)
