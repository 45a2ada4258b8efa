"""The timestep-conditioned 2D UNet (MONAI ``DiffusionModelUNet``) and its segmentation form.

Pretraining uses the UNet as is: ``unet(x [B,C,H,W], t [B]) -> [B, C_out, H, W]``.
Segmentation (the CT paper, Methods, Fig. 2) reuses the same network with a fixed timestep
embedding, drops the pretext output layer ``out`` and puts a new head on the last decoder
features: two (conv 3×3 → BatchNorm → ReLU), then a 1×1 conv to K classes.
"""
from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from labeldiff.config import ModelConfig
from labeldiff.errors import ConfigError, RunFolderError

PRETEXT_OUTPUT = ("out.",)  # keys of the pretext output layer, dropped on transfer by name
# MONAI's ``out`` is GroupNorm → SiLU → conv: with ``keep_out_norm`` only the conv is the pretext layer
PRETEXT_CONV = ("out.2.",)
# the encoder half of each backbone (frozen by the "decoder" transfer strategy), by submodule name
ENCODER_PARTS = {
    "unet": ("conv_in", "time_embed", "down_blocks", "middle_block"),  # MONAI DiffusionModelUNet
    "efficientnet-unet": ("encoder",),
}


ARCHS = ("unet", "efficientnet-unet")


def check_model_config(cfg: ModelConfig) -> None:
    if cfg.arch not in ARCHS:
        raise ConfigError(f"model arch {cfg.arch!r} is unknown; use one of {', '.join(ARCHS)}")
    if cfg.arch == "efficientnet-unet":
        from labeldiff.models.effunet import decoder_widths

        if cfg.in_channels not in (1, 3):
            raise ConfigError(f"--arch efficientnet-unet reads RGB or grey images, not {cfg.in_channels} channels")
        decoder_widths(tuple(cfg.decoder_channels), cfg.decoder_width)
        return
    n = len(cfg.channels)
    if len(cfg.attention_levels) != n:
        raise ConfigError(f"--attention (model.attention_levels) has {len(cfg.attention_levels)} entries but "
                          f"--unet-channels (model.channels) has {n}; give one 0/1 per level, e.g. --attention "
                          f"{','.join(['0'] * n)}")
    for c in cfg.channels:
        if c % cfg.norm_num_groups:
            raise ConfigError(f"--unet-channels: width {c} is not divisible by model.norm_num_groups="
                              f"{cfg.norm_num_groups} (GroupNorm); use multiples of {cfg.norm_num_groups}")
    for i, (c, attn) in enumerate(zip(cfg.channels, cfg.attention_levels)):
        # MONAI's middle block always has self-attention at the last width, whatever attention_levels says
        if (attn or i == n - 1) and c % cfg.num_head_channels:
            where = "an attention level" if attn else "the last level, whose middle block has attention"
            raise ConfigError(f"--unet-channels: width {c} ({where}) is not divisible by --head-channels "
                              f"(model.num_head_channels) {cfg.num_head_channels}; change the widths or the head channels")


def pretext_output(arch: str, keep_out_norm: bool) -> tuple[str, ...]:
    """Key prefixes of the pretext output layer that a transfer drops (the skip-list of
    :func:`load_backbone_strict`): all of ``out``, or only its conv when the diffusion UNet keeps
    the final GroupNorm + SiLU (``out.0``, ``out.1``). DDeP's ``out`` is a single conv."""
    return PRETEXT_CONV if keep_out_norm and arch == "unet" else PRETEXT_OUTPUT


def size_multiple(cfg: ModelConfig) -> int:
    """Input sides must be multiples of this (the UNet halves the resolution len(channels)-1 times;
    the EfficientNet encoder 5 times)."""
    if cfg.arch == "efficientnet-unet":
        return 32
    return 2 ** (len(cfg.channels) - 1)


def check_input_size(cfg: ModelConfig, size: int) -> None:
    """Reject a network config, or an input side ``size`` it cannot take, with the size to use instead."""
    check_model_config(cfg)
    m = size_multiple(cfg)
    if size % m:
        what = ("the EfficientNet encoder halves the resolution 5 times" if cfg.arch == "efficientnet-unet"
                else f"the UNet halves the resolution {len(cfg.channels) - 1} times")
        raise ConfigError(f"--size {size} is not a multiple of {m} ({what}); use --size {max(m, size // m * m)}")


def step_memory_floor(cfg: ModelConfig, size: int, batch: int, channels: int) -> int:
    """Bytes a training step cannot do without, counted low: one scaled image, and per image of a
    micro-batch its input and the first level's features with their gradient (fp32). The real step
    needs several times more."""
    first = 16 if cfg.arch == "efficientnet-unet" else cfg.channels[0]
    return 4 * size * size * (batch * (channels + 2 * first) + channels)


def check_step_memory(cfg: ModelConfig, size: int, batch: int, channels: int, device) -> None:
    """Refuse, before a run folder exists, a ``--size`` / batch whose step cannot fit the device's memory
    even by the low count of :func:`step_memory_floor`."""
    from labeldiff.runtime import memory_bytes

    need, have = step_memory_floor(cfg, size, batch, channels), memory_bytes(torch.device(device))
    if have is not None and need > have:
        raise ConfigError(f"--size {size} with micro-batches of {batch}: a training step needs at least "
                          f"{need / 2**30:,.0f} GiB, more than the {have / 2**30:,.0f} GiB of {device}; lower --size "
                          f"(crop mode trains on size² crops of large images) or --batch-size (or raise --grad-accum)")


def feature_channels(cfg: ModelConfig) -> int:
    """Channels of the last decoder features (what the segmentation head reads)."""
    if cfg.arch == "efficientnet-unet":
        from labeldiff.models.effunet import decoder_widths

        return decoder_widths(tuple(cfg.decoder_channels), cfg.decoder_width)[-1]
    return cfg.channels[0]


def build_network(cfg: ModelConfig, out_channels: int) -> nn.Module:
    """``net(x [B, C, H, W], t [B]) -> [B, out_channels, H, W]`` for either architecture.

    Weights are random; pretraining initialises a DDeP encoder with
    :func:`labeldiff.models.effunet.init_encoder`.
    """
    check_model_config(cfg)
    if cfg.arch == "efficientnet-unet":
        from labeldiff.models.effunet import EfficientNetUNet

        return EfficientNetUNet(cfg.in_channels, out_channels, tuple(cfg.decoder_channels), cfg.decoder_width)
    return build_unet(cfg, out_channels)


def build_unet(cfg: ModelConfig, out_channels: int) -> DiffusionModelUNet:
    check_model_config(cfg)
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=cfg.in_channels,
        out_channels=out_channels,
        channels=tuple(cfg.channels),
        num_res_blocks=cfg.num_res_blocks,
        attention_levels=tuple(cfg.attention_levels),
        norm_num_groups=cfg.norm_num_groups,
        num_head_channels=cfg.num_head_channels,
        # torch's scaled_dot_product_attention: the same result (no attention dropout here) without
        # the [tokens × tokens] matrix. MONAI's mid block always has attention; at 256² input it is a
        # 64² map, and the explicit matrix cost 547 MB per image (bench probe-memory), SDPA 114 MB.
        use_flash_attention=True,
    )


class SegHead(nn.Module):
    """[B, c, H, W] → [B, K, H, W]: 2 × (conv3×3 → BN → ReLU) → conv1×1 (CT paper, Fig. 2); ``hidden=0``:
    one conv3×3 to the K classes (TransUNet's segmentation head, the network DDeP fine-tunes)."""

    def __init__(self, in_channels: int, hidden: int, num_classes: int):
        super().__init__()
        if hidden == 0:
            self.layers = nn.Sequential(nn.Conv2d(in_channels, num_classes, 3, padding=1))
            return
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(2):
            layers += [nn.Conv2d(c, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)]
            c = hidden
        layers.append(nn.Conv2d(hidden, num_classes, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class KeptHead(nn.Module):
    """The mask output a hybrid or supervised source network already has: channels ``first:`` of its
    output layer (hybrid: after the C image channels; supervised: all). No parameters of its own."""

    def __init__(self, first: int):
        super().__init__()
        self.first = int(first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.first:]


def kept_head_channels(method: str, in_channels: int, num_classes: int) -> tuple[int, int]:
    """``(output channels, first mask channel)`` of a hybrid (C + K) or supervised (K) network."""
    if method == "hybrid":
        return in_channels + num_classes, in_channels
    if method == "supervised":
        return num_classes, 0
    raise ConfigError(f"a {method!r} network has no mask output to keep; --keep-head needs a hybrid or supervised "
                     f"pretraining run")


class SegmentationNet(nn.Module):
    """Backbone (either arch) with a fixed timestep ``t`` and a :class:`SegHead`.

    ``forward(x [B, C, H, W]) -> logits [B, K, H, W]``. The head reads the last decoder features
    ``[B, feature_channels(cfg), H, W]``: the UNet's output conv is always replaced; with
    ``keep_out_norm`` its final GroupNorm + SiLU stay (and keep their pretrained weights), so the
    head reads normalised features as the pretext conv did. ``skip`` is the matching skip-list.

    ``keep_head=method`` (hybrid / supervised): the backbone keeps its whole output layer and the
    head is its mask channels (:class:`KeptHead`): every weight comes from the source run, nothing is
    skipped and nothing is new.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, t: int = 0, head_hidden: int = 128,
                 keep_out_norm: bool = False, keep_head: str | None = None):
        super().__init__()
        self.t = int(t)
        if keep_head:
            out, first = kept_head_channels(keep_head, cfg.in_channels, num_classes)
            self.backbone = build_network(cfg, out_channels=out)
            self.skip: tuple[str, ...] = ()
            self.head: nn.Module = KeptHead(first)
            return
        self.backbone = build_network(cfg, out_channels=cfg.in_channels)
        self.skip = pretext_output(cfg.arch, keep_out_norm)
        if self.skip == PRETEXT_CONV:
            self.backbone.out = nn.Sequential(*list(self.backbone.out.children())[:2])  # out.0 norm, out.1 SiLU
        else:
            self.backbone.out = nn.Identity()
        self.head = SegHead(feature_channels(cfg), head_hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.full((x.shape[0],), self.t, dtype=torch.long, device=x.device)
        return self.backbone(x, t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_backbone_strict(model: SegmentationNet, pretrained: dict[str, torch.Tensor],
                         skip: tuple[str, ...] | None = None) -> dict[str, list[str]]:
    """Load a pretrained UNet state dict into ``model.backbone``, strictly.

    Every backbone key must be present with the same shape. Pretrained keys starting with a
    prefix in ``skip`` (the pretext output layer; default ``model.skip``) are dropped by name; any other unused key is an
    error. Only ``head.*`` may stay at its fresh initialisation.
    Returns ``{"loaded": [...], "skipped": [...], "new": [...]}``.
    """
    skip = model.skip if skip is None else skip
    own = model.backbone.state_dict()
    skipped = sorted(k for k in pretrained if skip and k.startswith(skip))
    usable = {k: v for k, v in pretrained.items() if not (skip and k.startswith(skip))}
    missing = sorted(set(own) - set(usable))
    unexpected = sorted(set(usable) - set(own))
    if missing or unexpected:
        raise RunFolderError(
            f"pretrained weights do not fit this backbone: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); was the run pretrained with another "
            f"model config? (the config is read from its config.json)")
    bad = [f"{k}: {tuple(usable[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if usable[k].shape != v.shape]
    if bad:
        raise RunFolderError(f"pretrained weights have the wrong shape for {len(bad)} keys, e.g. {bad[:3]}")
    model.backbone.load_state_dict(usable, strict=True)
    new = sorted(f"head.{k}" for k in model.head.state_dict())
    return {"loaded": sorted(usable), "skipped": skipped, "new": new}


class DirectSegmenter(nn.Module):
    """A pretrained network that already outputs class scores: hybrid (mask channels) or supervised.

    ``forward(x) = net(x, t)[:, first:]`` with the fixed timestep ``t`` (0: the hybrid paper's
    "taking t = 0, a pure discriminative segmentation model").
    """

    def __init__(self, net: nn.Module, first_channel: int, t: int = 0):
        super().__init__()
        self.net = net
        self.first = int(first_channel)
        self.t = int(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.full((x.shape[0],), self.t, dtype=torch.long, device=x.device)
        return self.net(x, t)[:, self.first:]
