"""Pretext tasks. Adding one = one new module + one line in ``CORRUPTIONS``."""
from __future__ import annotations

from labeldiff.config import CorruptionConfig
from labeldiff.corruption.base import Corrupted, Corruption
from labeldiff.corruption.gaussian import GaussianNoise
from labeldiff.corruption.denoising import DecoderDenoising
from labeldiff.corruption.labeled import HybridDiffusion, SupervisedSegmentation
from labeldiff.corruption.masking import FixedRatioMasking, MaskedDiffusion
from labeldiff.errors import ConfigError

CORRUPTIONS: dict[str, type[Corruption]] = {
    "ddpm": GaussianNoise,
    "mdm": MaskedDiffusion,
    "mae": FixedRatioMasking,
    "ddep": DecoderDenoising,  # frozen supervised encoder, decoder learns to denoise
    "dep": DecoderDenoising,  # same objective, encoder and decoder trained from random weights
    "hybrid": HybridDiffusion,
    "supervised": SupervisedSegmentation,
}
FROZEN_ENCODER = ("ddep",)  # methods whose pretraining keeps the network's encoder frozen


def build_corruption(cfg: CorruptionConfig) -> Corruption:
    if cfg.method not in CORRUPTIONS:
        raise ConfigError(f"pretext method {cfg.method!r} is unknown; available: {sorted(CORRUPTIONS)}")
    return CORRUPTIONS[cfg.method](cfg)


__all__ = ["CORRUPTIONS", "FROZEN_ENCODER", "Corrupted", "Corruption", "build_corruption"]
