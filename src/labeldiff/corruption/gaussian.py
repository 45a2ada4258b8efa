"""Gaussian-noise corruption of DDPM (Ho et al. 2020) on MONAI's scheduler.

x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε with t ~ U{0..T-1}; the network predicts ε (default) or x_0.
The CT paper (Huang et al. 2025, Implementation details): T = 1000, β from 1e-4 to 0.02.
"""
from __future__ import annotations

import torch
from monai.networks.schedulers import DDPMScheduler

from labeldiff.config import CorruptionConfig
from labeldiff.corruption.base import Corrupted, Corruption
from labeldiff.runtime import randint, randn
from labeldiff.errors import ConfigError

MONAI_SCHEDULES = {"linear": "linear_beta", "cosine": "cosine"}


def make_scheduler(cfg: CorruptionConfig) -> DDPMScheduler:
    """MONAI's DDPM scheduler for ``cfg``. ``linear``: β from ``beta_start`` to ``beta_end``. ``cosine``
    (Nichol & Dhariwal 2021, as MONAI implements it): ᾱ_t = cos²((t/T + s)/(1 + s)·π/2) normalised, s = 0.008,
    β clipped at 0.999; it has no β endpoints, so a ``beta_start`` / ``beta_end`` other than the defaults is
    refused rather than silently ignored."""
    if cfg.schedule not in MONAI_SCHEDULES:
        raise ConfigError(f"schedule {cfg.schedule!r} is unknown; use one of {sorted(MONAI_SCHEDULES)}")
    defaults = CorruptionConfig()
    if cfg.schedule == "cosine" and (cfg.beta_start, cfg.beta_end) != (defaults.beta_start, defaults.beta_end):
        raise ConfigError(f"corruption.beta_start {cfg.beta_start} / beta_end {cfg.beta_end}: the cosine schedule has "
                          f"no β endpoints (its βs follow from ᾱ_t = cos²(…), clipped at 0.999), so they would be "
                          f"ignored; drop them, or use schedule: linear")
    kwargs = {"beta_start": cfg.beta_start, "beta_end": cfg.beta_end} if cfg.schedule == "linear" else {}
    return DDPMScheduler(num_train_timesteps=cfg.num_timesteps, schedule=MONAI_SCHEDULES[cfg.schedule],
                         prediction_type=cfg.prediction, **kwargs)


class GaussianNoise(Corruption):
    name = "ddpm"

    def __init__(self, cfg: CorruptionConfig):
        if cfg.prediction not in ("epsilon", "sample"):
            raise ConfigError(f"prediction {cfg.prediction!r} is unknown; use 'epsilon' or 'sample' (x0)")
        self.cfg = cfg
        self.scheduler = make_scheduler(cfg)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod

    def __call__(self, x0: torch.Tensor, generator: torch.Generator, mask: torch.Tensor | None = None) -> Corrupted:
        b = x0.shape[0]
        t = randint(0, self.cfg.num_timesteps, (b,), generator, x0.device)
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
        xt = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
        target = noise if self.cfg.prediction == "epsilon" else x0
        return Corrupted(input=xt, t=t, target=target)
