"""The interface every pretext task implements: clean batch in, (input, t, target, weight) out."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Corrupted:
    """What a pretext task hands to the loop.

    input:  [B, C, H, W]   what the network sees
    t:      [B] int64      the timestep fed to the network's time embedding
    target: [B, C', H, W]  what the network must output
    weight: [B, 1|C', H, W] or None — per-pixel loss weights (a loss mask)
    """

    input: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None = None


class Corruption:
    """Base class. Subclasses define ``__call__`` and may override ``loss`` and ``out_channels``.

    ``needs_labels``: the task reads masks (hybrid, supervised); ``__call__`` then gets ``mask``
    ``[B, H, W]`` (class indices) and the run trains on a labeled split. ``archs``: the network
    architectures it can train (tasks that feed a timestep need the timestep-conditioned UNet).
    """

    name = "base"
    needs_labels = False
    archs: tuple[str, ...] = ("unet",)

    def out_channels(self, in_channels: int, num_classes: int | None = None) -> int:
        """Number of output channels the network needs for this pretext task."""
        return in_channels

    def check_input_size(self, size: int) -> None:
        """Raise ValueError (before any run folder is written) if ``size``² inputs cannot work."""

    def __call__(self, x0: torch.Tensor, generator: torch.Generator, mask: torch.Tensor | None = None) -> Corrupted:
        raise NotImplementedError

    def loss(self, pred: torch.Tensor, c: Corrupted) -> torch.Tensor:
        """Mean squared error, weighted by ``c.weight`` when given."""
        err = (pred.float() - c.target.float()) ** 2
        if c.weight is None:
            return err.mean()
        w = c.weight.expand_as(err)
        return (err * w).sum() / w.sum().clamp_min(1e-8)
