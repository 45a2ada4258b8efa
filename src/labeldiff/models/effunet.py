"""DDeP's encoder–decoder: a supervised EfficientNet-Lite0 encoder and a UNet decoder with skips.

Decoder denoising pretraining (Brempong et al. 2022, §4 and Fig. 2) uses a TransUNet: a classifier
encoder and a decoder of five blocks whose widths are ``1× = [1024, 512, 256, 128, 64]`` (§4.3),
each block upsampling ×2 and reading the encoder map of the same resolution through a skip
connection. Here the encoder is EfficientNet-Lite0 (:mod:`labeldiff.models.efficientnet`, 4.0M
parameters without its classifier), much smaller than the paper's hybrid ViT, so the 1× decoder is
scaled with it: ``(256, 128, 64, 32, 16)`` by default, times ``decoder_width`` (1×, 2×, 3×).

``EfficientNetUNet(x [B, C, H, W] in [-1, 1], t=None) -> [B, out_channels, H, W]``. There is no
timestep input (DDeP denoises at one fixed noise level); ``t`` is accepted and ignored so the network
fits the same interfaces as the diffusion UNet. The last layer is named ``out`` like MONAI's, so
transfer drops it by the same name.

Decoder block i: bilinear ×2 upsampling → concatenate the encoder map at that stride (none for the
last block, which returns to full resolution) → 2 × (conv 3×3 → BatchNorm → ReLU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labeldiff.models.efficientnet import FEATURE_CHANNELS, EfficientNetLite0, from_minus_one_one, load_lite0_imagenet
from labeldiff.errors import ConfigError

ENCODER_PREFIX = "encoder."


def decoder_widths(base: tuple[int, ...], width: float) -> tuple[int, ...]:
    """The decoder's five block widths: ``base × width``, rounded to multiples of 8 (at least 8)."""
    if len(base) != len(FEATURE_CHANNELS):
        raise ConfigError(f"decoder_channels needs {len(FEATURE_CHANNELS)} widths (one per decoder block), got {base}")
    if width <= 0:
        raise ConfigError(f"decoder_width must be positive (DDeP uses 1, 2 or 3), got {width}")
    return tuple(max(8, int(round(c * width / 8)) * 8) for c in base)


class DecoderBlock(nn.Module):
    def __init__(self, c_in: int, c_skip: int, c_out: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(c_in + c_skip, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class EfficientNetUNet(nn.Module):
    """EfficientNet-Lite0 encoder (classifier head removed) + 5-block UNet decoder + 1×1 ``out``."""

    def __init__(self, in_channels: int, out_channels: int, decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
                 decoder_width: float = 1.0):
        super().__init__()
        if in_channels not in (1, 3):
            raise ConfigError(f"the EfficientNet encoder reads RGB (3 channels) or grey (1, repeated) images, "
                             f"not {in_channels} channels; use --channels 3 or 1")
        self.in_channels = in_channels
        self.encoder = EfficientNetLite0()
        # the classifier is not part of a segmentation network: drop it so it is neither saved nor trained
        self.encoder.head_conv = self.encoder.head_bn = self.encoder.fc = None  # type: ignore[assignment]
        widths = decoder_widths(tuple(decoder_channels), decoder_width)
        skips = tuple(reversed(FEATURE_CHANNELS[:-1])) + (0,)  # 112, 40, 24, 16 at strides 16..2, none at 1
        blocks, c = [], FEATURE_CHANNELS[-1]
        for w, s in zip(widths, skips):
            blocks.append(DecoderBlock(c, s, w))
            c = w
        self.decoder = nn.ModuleList(blocks)
        self.feature_channels = widths[-1]
        self.out = nn.Conv2d(widths[-1], out_channels, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        feats = self.encoder.features(from_minus_one_one(x))  # strides 2, 4, 8, 16, 32
        y = feats[-1]
        skips = list(reversed(feats[:-1])) + [None]
        for block, skip in zip(self.decoder, skips):
            y = block(y, skip, skip.shape[-2:] if skip is not None else (h, w))
        return self.out(y)


def imagenet_encoder_state() -> dict[str, torch.Tensor]:
    """The supervised ImageNet-1k EfficientNet-Lite0 weights without the classifier (keys of ``encoder``)."""
    full = EfficientNetLite0()
    load_lite0_imagenet(full)
    return {k: v for k, v in full.state_dict().items() if not k.startswith(("head_", "fc."))}


def init_encoder(model: EfficientNetUNet, state: dict[str, torch.Tensor]) -> list[str]:
    """Load ``state`` (encoder keys without the ``encoder.`` prefix) into ``model.encoder``, strictly.

    Where it comes from (``imagenet``, ``none`` or a run folder) is the pretraining run's choice
    (:func:`labeldiff.pretrain.run.encoder_weights`). Returns the loaded keys, prefixed.
    """
    model.encoder.load_state_dict(state, strict=True)
    return sorted(ENCODER_PREFIX + k for k in state)
