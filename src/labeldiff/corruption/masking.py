"""Patch masking: the masked diffusion model MDM and an MAE-style fixed-ratio baseline.

MDM (Pan et al., "Masked Diffusion as Self-supervised Representation Learner";
../shared/papers/masked-diffusion-mdm.txt, §4.1 "Masking and Reconstructing"): cut the image into
p×p patches, sample t ~ U{1..T}, set floor(N·t/T) randomly chosen patches to zero, feed the whole
corrupted image and t to the UNet and reconstruct the clean image with 1 − SSIM (§4.1 Eq. 4;
Table 4: SSIM beats MSE for MDM). Defaults p = 8, T = 1000 (Appendix A.2; Table 7 for p ∈ {4, 8, 16}).

Images are in [-1, 1], so a zeroed patch is mid-grey and SSIM uses data_range = 2.
Unlike the official code (3 channels hard-coded) any number of channels works.
"""
from __future__ import annotations

import torch
from monai.losses import SSIMLoss

from labeldiff.config import LOSS_BY_METHOD, CorruptionConfig
from labeldiff.corruption.base import Corrupted, Corruption
from labeldiff.errors import ConfigError
from labeldiff.runtime import autocast, rand, randint

LOSSES = ("ssim", "mse", "masked-mse")
SSIM_WINDOW = 11  # MONAI SSIMLoss's Gaussian window (Wang et al. 2004)
# loss "auto" per method: MDM reconstructs the whole image with 1 − SSIM (§4.1 Eq. 4, Table 4);
# MAE (He et al. 2022, §3 "Reconstruction target") computes the MSE on the masked patches only,
# and MDM's Table 4 finds SSIM worse than MSE for MAE.
DEFAULT_LOSS = LOSS_BY_METHOD  # declared with corruption.loss in labeldiff.config


def resolve_loss(method: str, loss: str) -> str:
    """``loss``, or the method's default (:data:`DEFAULT_LOSS`) when it is ``auto`` (other methods
    do not read the field: it stays ``auto``)."""
    return DEFAULT_LOSS.get(method, loss) if loss == "auto" else loss


def patch_mask(shape: torch.Size, n_mask: torch.Tensor, patch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Boolean pixel mask [B, 1, H, W]: for image b, ``n_mask[b]`` whole p×p patches chosen uniformly.

    shape: [B, C, H, W] with H, W multiples of p; n_mask: [B] int64 in [0, N], N = (H/p)·(W/p).
    Patches are ranked by uniform noise and the n_mask lowest ranks are masked: the shuffle /
    zero-the-last / unshuffle of MDM §4.1 (and ``random_masking`` of facebookresearch/mae).
    """
    b, _, h, w = shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}×{w} is not a multiple of the patch size {p}; use --size "
                         f"{max(p, min(h, w) // p * p)} (a multiple of {p}) or another --patch-size")
    gh, gw = h // p, w // p
    ranks = rand((b, gh * gw), generator, n_mask.device).argsort(dim=1).argsort(dim=1)  # a random permutation
    masked = ranks < n_mask.view(b, 1)
    return masked.view(b, 1, gh, gw).repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)


class PatchMasking(Corruption):
    """Zero n_mask random patches per image; the target is the clean image [B, C, H, W].

    The loss weight is None (the whole image counts) except for ``masked-mse``, where it is the
    masked pixels ``[B, 1, H, W]``: visible patches do not count, as in MAE.

    Subclasses choose, per image, the timestep fed to the network and how many patches to mask.
    """

    name = "masking"

    def __init__(self, cfg: CorruptionConfig):
        if cfg.patch_size < 1:
            raise ValueError(f"patch_size must be a positive number of pixels, got {cfg.patch_size}; "
                             f"the MDM paper uses 8 (Table 7 also tries 4 and 16)")
        self.loss_name = resolve_loss(cfg.method, cfg.loss)
        if self.loss_name not in LOSSES:
            raise ValueError(f"loss {cfg.loss!r} is unknown for {cfg.method}; use auto or one of {list(LOSSES)}")
        self.cfg = cfg
        # MONAI SSIM: 11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03 (Wang et al. 2004), valid region only
        self.ssim = SSIMLoss(spatial_dims=2, data_range=2.0) if self.loss_name == "ssim" else None

    def check_input_size(self, size: int) -> None:
        if size % self.cfg.patch_size:
            raise ConfigError(f"--size {size} is not a multiple of --patch-size {self.cfg.patch_size}; "
                              f"use --size {max(1, size // self.cfg.patch_size) * self.cfg.patch_size} or another "
                              f"patch size")
        if self.ssim is not None and size < SSIM_WINDOW:
            raise ConfigError(f"--size {size}: the SSIM loss compares {SSIM_WINDOW}×{SSIM_WINDOW} windows, so inputs "
                              f"need at least {SSIM_WINDOW} pixels a side; use --size 16 or more (or --loss mse)")

    def schedule(self, batch: int, n_patches: int, generator: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [B] int64 fed to the network, n_mask [B] int64 patches to zero), on ``device``."""
        raise NotImplementedError

    def __call__(self, x0: torch.Tensor, generator: torch.Generator, mask: torch.Tensor | None = None) -> Corrupted:
        """x0: [B, C, H, W] clean images in [-1, 1] → input = x0 with masked patches zeroed, target = x0."""
        b, _, h, w = x0.shape
        p = self.cfg.patch_size
        n_patches = (h // p) * (w // p)
        t, n_mask = self.schedule(b, n_patches, generator, x0.device)
        hidden = patch_mask(x0.shape, n_mask, p, generator)
        weight = hidden.to(x0.dtype) if self.loss_name == "masked-mse" else None
        return Corrupted(input=x0.masked_fill(hidden, 0.0), t=t, target=x0, weight=weight)

    def loss(self, pred: torch.Tensor, c: Corrupted) -> torch.Tensor:
        """1 − SSIM(pred, target), averaged over channels, valid pixels and the batch; or the MSE
        (``masked-mse``: over the masked pixels only, by the weight).

        SSIM runs in fp32 even inside the loop's bf16 autocast: its variances E[x²] − E[x]² cancel badly.
        """
        if self.ssim is None:
            return super().loss(pred, c)
        with autocast(pred.device, None):  # disabled: fp32
            return self.ssim(pred.float(), c.target.float())


class MaskedDiffusion(PatchMasking):
    """MDM: t ~ U{1..T} per image and floor(N·t/T) masked patches (MDM §4.1; the ratio is t/T).

    t is fed to the network as is (in [1, T]); our UNet embeds any integer.
    """

    name = "mdm"

    def schedule(self, batch: int, n_patches: int, generator: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.cfg.num_timesteps
        t = randint(1, T + 1, (batch,), generator, device)
        return t, (n_patches * t) // T


class FixedRatioMasking(PatchMasking):
    """MAE-style baseline: the same masking at a fixed ratio, always t = 0 fed to the network.

    This is the "fixed t" ablation of MDM Table 3 (§5.2 "Diffusion"), where MDM without diffusion
    "degrades to a vanilla masked autoencoder", run on our UNet, not MAE's ViT (the whole image goes
    in, masked patches are zeros, the whole image is reconstructed). The paper fixes t = 50 there;
    we fix the ratio at ``mask_ratio`` (MAE's 0.75, He et al. 2022) and feed t = 0, the timestep the
    transfer uses. Masked patches: N − floor(N·(1 − ratio)), as ``len_keep`` in MAE's ``random_masking``.
    """

    name = "mae"

    def __init__(self, cfg: CorruptionConfig):
        if not 0.0 <= cfg.mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must lie in [0, 1], got {cfg.mask_ratio}; MAE uses 0.75")
        super().__init__(cfg)

    def schedule(self, batch: int, n_patches: int, generator: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        n_mask = n_patches - int(n_patches * (1.0 - self.cfg.mask_ratio))
        return (torch.zeros(batch, dtype=torch.int64, device=device),
                torch.full((batch,), n_mask, dtype=torch.int64, device=device))
