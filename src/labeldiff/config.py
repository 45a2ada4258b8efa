"""Every setting, declared once.

A setting is one field of a section dataclass (``model``, ``corruption``, ``data``, ``train``,
``transfer``), and its declaration (:func:`setting`) carries everything about it: the type (the
annotation), the default (a second one for fine-tuning where it differs from pretraining), the help
line, the range or choices, the command-line flag and the commands that show it, and its role:
``geometry`` (how images become network inputs: a transfer takes it from its pretrained run) and
``result`` (whether it changes what a run computes). The argument parser (:mod:`labeldiff.cli`), the
range, choice and type checks (:func:`check`), the reference documentation (:mod:`labeldiff.cli.reference`)
and the validation of recipes and study overrides all read these declarations; nothing about a setting
is written twice. :mod:`labeldiff.resolve` resolves a run's configuration from its layers.

Names here end up in saved ``config.json`` files, so they are chosen once and kept.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from labeldiff.errors import ConfigError, RunFolderError

PRETRAIN, FINETUNE = ("pretrain",), ("finetune",)
BOTH = PRETRAIN + FINETUNE
FLOAT32_MAX = 3.4028234663852886e38  # the network and optimiser compute in float32 at most


class _Same:
    """The ``finetune`` default of a setting whose default is the same for every kind of run."""

    def __repr__(self) -> str:
        return "SAME"


SAME = _Same()


@dataclass(frozen=True)
class Setting:
    """What a field's declaration says besides its type and default (see :func:`setting`)."""

    help: str
    flag: str | None = None  # the command-line flag; None: reachable with --set, a recipe or a study
    commands: tuple[str, ...] = ()  # the commands that show the flag
    metavar: str | None = None
    lo: float | None = None  # range of a number (of each number of a tuple)
    hi: float | None = None
    lo_open: bool = False  # the bound itself is excluded
    hi_open: bool = False
    choices: tuple | None = None
    finetune: Any = SAME  # the default of a fine-tuning run, where it differs from pretraining's
    geometry: bool = False  # how images become network inputs: a transfer takes it from its pretrained run
    result: bool = True  # False: how a run is computed, not what (not hashed by studies; may change on resume)
    resume: bool = False  # may change on --resume (train.steps extends a run; train.device moves it)
    applies: Callable[[Any], str | None] | None = None  # why a flag given on the command line cannot apply
    store_true: bool = False  # a flag without a value


def setting(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field whose metadata is a :class:`Setting`."""
    meta = {"setting": Setting(help, **kw)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _unless(field_: str, values: tuple, why: str) -> Callable[[Any], str | None]:
    """An ``applies`` rule: the flag applies only when ``field_`` (dotted) is one of ``values``."""
    section, name = field_.split(".")
    return lambda cfg: None if getattr(getattr(cfg, section), name) in values else why


def _when_set(field_: str, why: str) -> Callable[[Any], str | None]:
    section, name = field_.split(".")
    return lambda cfg: None if getattr(getattr(cfg, section), name) else why


UNET_ONLY = _unless("model.arch", ("unet",), "it shapes the diffusion UNet, not --arch efficientnet-unet")
EFFUNET_ONLY = _unless("model.arch", ("efficientnet-unet",), "it shapes --arch efficientnet-unet only")


@dataclass
class ModelConfig:
    """The network.

    ``arch='unet'``: the timestep-conditioned UNet (MONAI ``DiffusionModelUNet``, 2D); the CT paper's GPU
    network (ResBlock widths 128/256, 256²) is the recipe ``ddpm``. ``arch='efficientnet-unet'``: DDeP's
    encoder–decoder (:mod:`labeldiff.models.effunet`), an EfficientNet-Lite0 encoder and a UNet decoder of
    widths ``decoder_channels × decoder_width``; no timestep input. The ``channels`` …
    ``num_head_channels`` fields are read by ``unet`` only.
    """

    arch: str = setting("unet", "network: unet (timestep-conditioned diffusion UNet) or efficientnet-unet "
                                "(DDeP's EfficientNet-Lite0 encoder + UNet decoder; ddep and dep pick it)",
                        flag="--arch", commands=BOTH, choices=("unet", "efficientnet-unet"))
    in_channels: int = setting(3, "image channels the network reads (derived: always data.channels)")
    channels: tuple[int, ...] = setting((32, 64, 128), "UNet widths per level", flag="--unet-channels",
                                        commands=BOTH, metavar="W,W,...", lo=1, applies=UNET_ONLY)
    num_res_blocks: int = setting(1, "residual blocks per UNet level", flag="--res-blocks", commands=BOTH, lo=1,
                                  applies=UNET_ONLY)
    attention_levels: tuple[bool, ...] = setting((False, False, False), "self-attention per UNet level (0 or 1 each)",
                                                 flag="--attention", commands=BOTH, metavar="0,0,1",
                                                 applies=UNET_ONLY)
    norm_num_groups: int = setting(8, "GroupNorm groups (every width must be a multiple)", lo=1)
    num_head_channels: int = setting(32, "channels per attention head (attention widths and the last width must "
                                         "be multiples)", flag="--head-channels", commands=BOTH, lo=1,
                                     applies=UNET_ONLY)
    decoder_channels: tuple[int, ...] = setting((256, 128, 64, 32, 16), "efficientnet-unet: the 1× decoder widths",
                                                lo=1)
    decoder_width: float = setting(1.0, "efficientnet-unet: decoder width multiplier (DDeP §4.3: 1, 2, 3)",
                                   flag="--decoder-width", commands=BOTH, lo=0, lo_open=True, applies=EFFUNET_ONLY)
    encoder: str = setting("imagenet", "efficientnet-unet at pretraining: the encoder's first weights: imagenet, "
                                       "none (random) or a labeldiff run folder with this encoder",
                           flag="--encoder", commands=PRETRAIN, metavar="imagenet|none|RUN", applies=EFFUNET_ONLY)


DIFFUSION = ("ddpm", "mdm", "hybrid")  # pretext tasks with a timestep schedule
DENOISING = ("ddpm", "ddep", "dep", "hybrid")  # pretext tasks that predict noise or the clean image
LOSS_BY_METHOD = {"mdm": "ssim", "mae": "masked-mse"}  # corruption.loss "auto" (MDM Table 4; MAE §3)


@dataclass
class CorruptionConfig:
    """The pretext task (``method``; the registry is :data:`labeldiff.corruption.CORRUPTIONS`).

    ``ddpm``: ε-prediction (Ho et al.; the CT paper, Methods). ``mdm``: masked diffusion (MDM §4.1),
    t ~ U{1..T} and floor(N·t/T) of the N patches zeroed. ``mae``: the same masking at the fixed
    ``mask_ratio``, t = 0. ``ddep`` / ``dep``: decoder denoising (Brempong et al. 2022, §3–4) at one noise
    level ``sigma``, ``noise='scaled'`` √γ·x + √(1−γ)·ε with γ = 1/(1+σ²), ``'additive'`` x + σ·ε; ddep
    freezes the supervised encoder, dep trains both from random weights. ``hybrid`` (Sauvalle & Salzmann
    2024): labeled images, the UNet sees x_t and t and outputs C image + K mask channels, loss
    MSE(image) + ``mask_weight``·MSE(mask). ``supervised``: plain segmentation training of the same network
    (Dice + CE, t = 0). ``loss='auto'`` is stored resolved (:data:`LOSS_BY_METHOD`).
    """

    method: str = setting("ddpm", "pretext task (ddpm, mdm, mae, ddep, dep; on labeled images hybrid, supervised)",
                          flag="--method", commands=PRETRAIN, metavar="METHOD")
    num_timesteps: int = setting(1000, "diffusion steps T", flag="--timesteps", commands=PRETRAIN, lo=1, hi=100_000,
                                 applies=_unless("corruption.method", DIFFUSION, "only ddpm, mdm and hybrid have T"))
    schedule: str = setting("linear", "β schedule: linear (1e-4 → 0.02) or cosine", flag="--schedule",
                            commands=PRETRAIN, choices=("linear", "cosine"),
                            applies=_unless("corruption.method", ("ddpm", "hybrid"), "only ddpm and hybrid add noise "
                                                                                     "on a schedule"))
    beta_start: float = setting(1e-4, "first β of the linear schedule", lo=0, hi=1, lo_open=True, hi_open=True)
    beta_end: float = setting(0.02, "last β of the linear schedule", lo=0, hi=1, lo_open=True, hi_open=True)
    prediction: str = setting("epsilon", "what the network predicts: epsilon (the noise) or sample (the clean image)",
                              flag="--prediction", commands=PRETRAIN, choices=("epsilon", "sample"),
                              applies=_unless("corruption.method", DENOISING, "only the denoising tasks predict "
                                                                              "noise or the clean image"))
    patch_size: int = setting(8, "mdm/mae: side of the masked square patches in pixels (MDM App. A.2); --size must "
                                 "be a multiple", flag="--patch-size", commands=PRETRAIN, lo=1,
                              applies=_unless("corruption.method", ("mdm", "mae"), "only mdm and mae mask patches"))
    mask_ratio: float = setting(0.75, "mae: fraction of the patches masked", flag="--mask-ratio", commands=PRETRAIN,
                                lo=0, hi=1, lo_open=True, hi_open=True,
                                applies=_unless("corruption.method", ("mae",), "only mae masks a fixed fraction"))
    loss: str = setting("auto", "mdm/mae reconstruction loss: ssim (1 − SSIM), mse, masked-mse (masked patches "
                                "only) or auto (mdm ssim, mae masked-mse)", flag="--loss", commands=PRETRAIN,
                        choices=("auto", "ssim", "mse", "masked-mse"),
                        applies=_unless("corruption.method", ("mdm", "mae"), "only mdm and mae choose their loss"))
    sigma: float = setting(0.22, "ddep/dep noise level σ (DDeP §4.1)", flag="--sigma", commands=PRETRAIN, lo=0,
                           lo_open=True, applies=_unless("corruption.method", ("ddep", "dep"), "only ddep and dep "
                                                                                                 "use one σ"))
    noise: str = setting("scaled", "ddep/dep: scaled (√γ·x + √(1−γ)·ε, γ = 1/(1+σ²)) or additive (x + σ·ε)",
                         flag="--noise", commands=PRETRAIN, choices=("scaled", "additive"),
                         applies=_unless("corruption.method", ("ddep", "dep"), "only ddep and dep"))
    mask_weight: float = setting(1e-4, "hybrid: λ in MSE(image) + λ·MSE(mask) (hybrid paper, Sec. 4)",
                                 flag="--mask-weight", commands=PRETRAIN, lo=0,
                                 applies=_unless("corruption.method", ("hybrid",), "only hybrid weighs a mask loss"))


@dataclass
class DataConfig:
    """How images become network inputs.

    ``mode='crop'``: scale the image by ``scale`` then take random ``size``² crops (training) or slide a
    ``size``² window over it (inference). ``mode='resize'``: resize the whole image to ``size``². Masks are
    always resized with nearest neighbour. Volume datasets (nnU-Net raw) are sliced along ``axis``,
    normalised by ``intensity`` and, with ``spacing``, resampled first.
    """

    path: str = setting("", "the dataset: a folder of images, a dataset root (images/, masks/, split.json) or an "
                            "nnU-Net raw volume dataset", flag="--data", commands=BOTH, metavar="DATA")
    size: int = setting(64, "training input size in pixels (square crops, or the resize target)", flag="--size",
                        commands=BOTH, lo=8, geometry=True)
    mode: str = setting("crop", "crop: random size² crops of the scaled image, a sliding window at inference; "
                                "resize: the whole image resized to size²", flag="--mode", commands=BOTH,
                        choices=("crop", "resize"), geometry=True)
    scale: float = setting(1.0, "crop mode: factor applied to each image side before cropping", flag="--scale",
                           commands=BOTH, lo=0, lo_open=True, geometry=True)
    channels: int = setting(3, "image channels the network sees: 1 grey, 3 RGB (volumes: their channel files)",
                            flag="--channels", commands=BOTH, lo=1, geometry=True)
    train_split: str = setting("train", "split.json entry of the labeled (training) images", flag="--train-split",
                               commands=BOTH)
    test_split: str = setting("test", "split.json entry that is evaluated, and left out of unlabeled pretraining",
                              flag="--test-split", commands=BOTH)
    split_file: str | None = setting(None, "a split JSON to use instead of DATA/split.json (see `labeldiff split`)",
                                     flag="--split-file", commands=BOTH, metavar="FILE")
    include_test: bool = setting(False, "unlabeled pretraining also reads the test split's images (the MDM paper's "
                                        "transductive protocol)", flag="--include-test", commands=PRETRAIN,
                                 store_true=True)
    num_classes: int | None = setting(None, "number of classes K (default: from dataset.json / classes.json, else "
                                            "the largest mask value + 1)", flag="--num-classes", commands=BOTH, lo=2)
    cache_mb: int = setting(512, "megabytes of decoded images kept in memory", lo=0, result=False)
    num_workers: int = setting(0, "data-loading worker processes", flag="--num-workers", commands=BOTH, lo=0,
                               result=False)
    axis: int = setting(2, "volume datasets: the axis slices are cut along, 0, 1 or 2 (axial)", flag="--axis",
                        commands=BOTH, lo=0, hi=2, geometry=True)
    ignore_index: int | None = setting(None, "a mask value meaning 'not labeled' (e.g. 255): left out of the loss, "
                                             "the metrics and the probe's samples", flag="--ignore-index",
                                       commands=FINETUNE, lo=0)
    intensity: dict | None = setting(None, "volume datasets: the intensity scheme (labeldiff.data.nnunet.Intensity; "
                                           "--intensity and --hu-window), fitted statistics included", geometry=True)
    spacing: list[float] | None = setting(None, "volume datasets: resample every volume to this voxel size in mm, "
                                                "x,y,z of the RAS frame, before slicing (predictions go back to each "
                                                "input's grid)", flag="--spacing", commands=BOTH, metavar="X,Y,Z",
                                          lo=0, lo_open=True, geometry=True)


@dataclass
class TrainConfig:
    """Optimisation, sized for a 2-core CPU; the recipes hold the papers' settings."""

    steps: int = setting(1000, "optimisation steps", flag="--steps", commands=BOTH, lo=1, finetune=300, resume=True)
    batch_size: int = setting(8, "images per step (the global batch)", flag="--batch-size", commands=BOTH, lo=1)
    lr: float = setting(5e-4, "base learning rate", flag="--lr", commands=BOTH, lo=0, lo_open=True, finetune=2e-4)
    lr_final_ratio: float = setting(0.1, "the learning rate decays linearly to lr × this (CT paper: 2e-4 → 2e-5)",
                                    lo=0, hi=1)
    warmup_steps: int = setting(50, "linear learning-rate warm-up steps", flag="--warmup-steps", commands=BOTH, lo=0,
                                finetune=20)
    weight_decay: float = setting(0.0, "AdamW weight decay of pretraining", lo=0)
    ema_decay: float = setting(0.999, "exponential moving average of the weights; 0 turns it off", flag="--ema-decay",
                               commands=BOTH, lo=0, hi=1, hi_open=True, finetune=0.0)
    grad_clip: float = setting(1.0, "gradient norm clip; 0 turns it off", flag="--grad-clip", commands=BOTH, lo=0)
    precision: str = setting("auto", "auto (bf16 where the CPU/GPU computes it), fp32, bf16, or fp16 (GPUs without "
                                     "bf16, with a gradient scaler)", flag="--precision", commands=BOTH,
                             choices=("auto", "fp32", "bf16", "fp16"))
    channels_last: bool = setting(False, "channels-last (NHWC) weights and inputs: faster convolutions on recent GPUs")
    compile: bool = setting(False, "torch.compile the network for training (minutes of compiling; pays on GPUs)",
                            flag="--compile", commands=BOTH)
    checkpoint_every: int = setting(200, "write a resumable checkpoint every N steps", flag="--checkpoint-every",
                                    commands=BOTH, lo=1, finetune=100, result=False)
    grad_accum: int = setting(1, "compute each batch in N micro-batches, gradients accumulated (the same update in "
                                 "1/N of the activation memory)", flag="--grad-accum", commands=BOTH, lo=1)
    log_every: int = setting(10, "write a log.jsonl record every N steps", lo=1, result=False)
    seed: int = setting(0, "random seed: the labeled images drawn, the initial weights, the batches", flag="--seed",
                        commands=BOTH, lo=0)
    device: str = setting("auto", "auto (CUDA if present), cpu or cuda[:N]", flag="--device", commands=BOTH,
                          resume=True)


STRATEGIES = ("probe", "linear", "decoder", "full", "lp-ft", "scratch")  # labeldiff.transfer: one enum
PROBE_ONLY = _unless("transfer.strategy", ("probe",), "only --strategy probe trains pixel MLPs")


@dataclass
class TransferConfig:
    """Segmentation transfer (the CT paper, Methods: fine-tuning settings).

    Adam; head learning rate ``head_lr_mult``× the base; weight decay 1e-3 for the head and 1e-4 for the
    rest; loss = 0.5·CE + 0.5·Dice; a fixed timestep embedding ``t``. ``probe``: pixel-MLP ensemble on
    frozen features (Baranchuk et al.; MDM's protocol).
    """

    pretrained: str | None = setting(None, "a `labeldiff pretrain` run folder to start from", flag="--pretrained",
                                     commands=FINETUNE, metavar="RUN")
    strategy: str = setting("full", "linear (head on the frozen backbone), decoder (encoder frozen), full (train "
                                    "everything), lp-ft (linear, then full), scratch (random init, same network), "
                                    "probe (pixel-MLP ensemble on frozen features)", flag="--strategy",
                            commands=FINETUNE, choices=STRATEGIES)
    labels: int = setting(3, "number of labeled training images k, drawn with --seed", flag="--labels",
                          commands=FINETUNE, lo=1)
    t: int = setting(0, "fixed timestep fed to the backbone's time embedding", flag="--t", commands=FINETUNE, lo=0)
    head_hidden: int = setting(128, "hidden channels of the segmentation head", flag="--head-hidden",
                               commands=FINETUNE, lo=1)
    head_lr_mult: float = setting(10.0, "the head's learning rate is lr × this (CT paper: 10)", lo=0, lo_open=True)
    head_weight_decay: float = setting(1e-3, "Adam weight decay of the head (CT paper)", lo=0)
    backbone_weight_decay: float = setting(1e-4, "Adam weight decay of the backbone (CT paper)", lo=0)
    ce_weight: float = setting(0.5, "loss = w·CE + (1 − w)·Dice", lo=0, hi=1)
    features: str = setting("default", "probe: default (per method: mdm t=50, ddpm t=50,150,250; middle decoder "
                                       "blocks), auto (chosen by leave-one-image-out validation) or "
                                       "'blocks=1,2;t=50,150'", flag="--features", commands=FINETUNE,
                            applies=PROBE_ONLY)
    members: int = setting(10, "probe: MLPs in the ensemble (Baranchuk et al.: 10)", flag="--members",
                           commands=FINETUNE, lo=1, applies=PROBE_ONLY)
    probe_stop_iters: int = setting(0, "probe: after 4 epochs, stop a member once this many batches in a row did not "
                                       "lower its best batch loss (the reference's rule: 50); 0: epoch patience only",
                                    flag="--probe-stop-iters", commands=FINETUNE, lo=0, applies=PROBE_ONLY)
    keep_out_norm: bool = setting(False, "unet: keep the pretrained final GroupNorm + SiLU in front of the new head",
                                  flag="--keep-out-norm", commands=FINETUNE)
    augment: str = setting("strong", "image+mask augmentation: none (crop window only), light (small rotation/scale, "
                                     "brightness, gamma) or strong (nnU-Net-like: rotation, scale, elastic, noise, "
                                     "blur, contrast)", flag="--augment", commands=FINETUNE,
                           choices=("none", "light", "strong"))
    flips: str = setting("h", "mirrorings that make sense for the data: none, h (left-right), v, hv", flag="--flips",
                         commands=FINETUNE, choices=("none", "h", "v", "hv"))
    steps_rule: str = setting("fixed", "fine-tuning length: fixed (--steps) or plateau (stop when the training loss "
                                       "stops falling, at most --steps)", flag="--steps-rule", commands=FINETUNE,
                              choices=("fixed", "plateau"))
    lp_steps: int = setting(100, "lp-ft: steps of the linear-probe phase", flag="--lp-steps", commands=FINETUNE, lo=1,
                            applies=_unless("transfer.strategy", ("lp-ft",), "only --strategy lp-ft has a "
                                                                             "linear-probe phase"))
    keep_head: bool | str = setting(False, "hybrid/supervised --pretrained run: fine-tune its own mask output: auto "
                                           "(when the classes match), 1 (required), 0 (a new head)",
                                    flag="--keep-head", commands=FINETUNE, choices=(False, True, "auto"),
                                    applies=_when_set("transfer.pretrained", "only a pretrained run has a head"))
    label_unit: str = setting("slices", "volume datasets: --labels counts slices, or volumes (every labeled slice of "
                                        "k training cases)", flag="--label-unit", commands=FINETUNE,
                              choices=("slices", "volumes"))
    synthetic: str | None = setting(None, "RUN:N: add N (image, mask) pairs sampled from the hybrid run RUN to the "
                                          "labeled images (cached in RUN/synthetic/)", flag="--synthetic",
                                    commands=FINETUNE, metavar="RUN:N")
    synthetic_fraction: float = setting(0.5, "with --synthetic: the share of each batch that is synthetic pairs",
                                        flag="--synthetic-fraction", commands=FINETUNE, lo=0, hi=1, lo_open=True,
                                        hi_open=True, applies=_when_set("transfer.synthetic", "it needs --synthetic"))


SECTIONS = {
    "model": ModelConfig,
    "corruption": CorruptionConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "transfer": TransferConfig,
}
KINDS = ("pretrain", "segmentation")  # RunConfig.kind: a pretraining run, or a transfer (fine-tuning, probe)


@dataclass
class RunConfig:
    """Everything needed to rebuild a run: what ``config.json`` in a run folder holds."""

    kind: str = "pretrain"  # pretrain | segmentation
    model: ModelConfig = field(default_factory=ModelConfig)
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    num_classes: int | None = None
    # records of how the run came about (not settings; never compared on resume, never hashed by studies):
    # a transfer's pretrained run and the geometry values given that differ from it
    # ({"from": RUN, "changed": {"data.scale": {"pretrained", "used"}}}),
    inherited: dict[str, Any] | None = None
    # each extension by a resume with more train.steps ({"at_step", "from_steps", "to_steps"}),
    extended: list[dict[str, Any]] | None = None
    # and where each value that differs from the defaults came from ({"train.lr": "command line", ...})
    sources: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in SECTIONS:
                kwargs[key] = _section(SECTIONS[key], value)
            elif key in {f.name for f in fields(cls)}:
                kwargs[key] = value
            else:
                raise ConfigError(f"unknown config key {key!r}; known: {[f.name for f in fields(cls)]}")
        return cls(**kwargs)

    def save(self, path: Path) -> None:
        from labeldiff.fs import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        """A run folder's ``config.json``; a torn, edited or foreign file is a :class:`RunFolderError` of
        one line naming it (with what is wrong)."""
        path = Path(path)
        fix = "restore it (labeldiff writes it whole, in one rename) or train the run again with --overwrite"
        try:
            raw = json.loads(path.read_text())
        except ValueError as e:
            raise RunFolderError(f"{path}: not valid JSON ({e}); {fix}") from None
        if not isinstance(raw, dict):
            raise RunFolderError(f"{path}: not a run configuration (a JSON object); {fix}")
        try:
            cfg = cls.from_dict(raw)
            check_types(cfg)
        except (ValueError, TypeError) as e:
            raise RunFolderError(f"{path}: {e}; {fix}") from None
        return cfg


RECORDS = ("inherited", "extended", "sources")  # RunConfig fields that record, not set


def _section(kind: type, value: dict[str, Any]) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{kind.__name__} must be a mapping of its fields, not {value!r}")
    known = {f.name: f for f in fields(kind)}
    unknown = set(value) - set(known)
    if unknown:
        raise ConfigError(f"unknown {kind.__name__} field(s) {sorted(unknown)}; known: {sorted(known)}")
    out = {}
    for k, v in value.items():
        out[k] = tuple(v) if isinstance(v, list) else v
    return kind(**out)


# --- the declarations, read -------------------------------------------------------------------------------------

def declared() -> list[tuple[str, dataclasses.Field, Setting]]:
    """``(dotted name, field, Setting)`` of every setting, in declaration order."""
    return [(f"{section}.{f.name}", f, f.metadata["setting"]) for section, kind in SECTIONS.items()
            for f in fields(kind)]


def declaration(dotted: str) -> Setting:
    section, _, name = dotted.partition(".")
    if section not in SECTIONS or name not in {f.name for f in fields(SECTIONS[section])}:
        raise ConfigError(f"unknown setting {dotted!r}; settings are section.field with section one of "
                          f"{', '.join(SECTIONS)} (see docs/reference/settings.md)")
    return next(f for f in fields(SECTIONS[section]) if f.name == name).metadata["setting"]


@functools.lru_cache(maxsize=None)
def _hints(section: str) -> dict[str, Any]:
    return typing.get_type_hints(SECTIONS[section])


def annotation(dotted: str) -> Any:
    section, name = dotted.split(".")
    return _hints(section)[name]


def default_value(dotted: str, kind: str = "pretrain") -> Any:
    """The default of a setting for a run of ``kind``."""
    section, name = dotted.split(".")
    f = next(f for f in fields(SECTIONS[section]) if f.name == name)
    meta = f.metadata["setting"]
    if kind == "segmentation" and meta.finetune is not SAME:
        return meta.finetune
    return f.default if f.default is not MISSING else f.default_factory()


def geometry_fields() -> tuple[str, ...]:
    """The data fields a transfer takes from its pretrained run (declared ``geometry``)."""
    return tuple(name for name, _, meta in declared() if meta.geometry)


def not_result_fields() -> tuple[str, ...]:
    """The fields that change how a run is computed, not what (declared ``result=False``)."""
    return tuple(name for name, _, meta in declared() if not meta.result)


def resume_may_change() -> frozenset[str]:
    """What a resume may change: a run's length (an extension, recorded in ``extended``) and how and where
    the same computation runs. Any other difference from the stored config.json is refused."""
    return frozenset(name for name, _, meta in declared() if meta.resume or not meta.result)


def default_config(kind: str = "pretrain") -> RunConfig:
    """Every setting at its declared default for a run of ``kind`` (pretrain | segmentation)."""
    cfg = RunConfig(kind=kind)
    if kind == "segmentation":
        for name, _, meta in declared():
            if meta.finetune is not SAME:
                section, field_ = name.split(".")
                setattr(getattr(cfg, section), field_, meta.finetune)
    return cfg


def default_pretrain_config() -> RunConfig:
    """What ``labeldiff pretrain`` starts from before a recipe and flags."""
    return default_config("pretrain")


def default_finetune_config() -> RunConfig:
    """What ``labeldiff finetune`` (and a study's cells) start from: 300 steps, the CT paper's lr."""
    return default_config("segmentation")


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """``{"section.field": value}`` of every setting of ``cfg``."""
    return {name: getattr(getattr(cfg, name.split(".")[0]), name.split(".")[1]) for name, _, _ in declared()}


# --- checks, generated from the declarations -------------------------------------------------------------------

def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a JSON-loaded ``value`` fits the field annotation ``hint`` (int, float, str, bool, tuples,
    lists, dicts and their ``| None``)."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        item = args[0] if args else Any
        return isinstance(value, (tuple, list)) and all(_type_ok(v, item) for v in value)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check_types(cfg: RunConfig) -> None:
    """Every field has the type its declaration says (a config.json edited by hand with
    ``"num_classes": "three"``, a recipe with ``lr: fast``), naming the field."""
    hints = typing.get_type_hints(RunConfig)
    for name in ("kind", "num_classes", *RECORDS):
        if not _type_ok(getattr(cfg, name), hints[name]):
            raise ConfigError(f"{name} is {getattr(cfg, name)!r}, not {_type_name(hints[name])}")
    for name, value in flatten(cfg).items():
        if not _type_ok(value, annotation(name)):
            raise ConfigError(f"{name} is {value!r}, not {_type_name(annotation(name))}")


def _where(name: str, meta: Setting) -> str:
    return meta.flag or name


def check_ranges(cfg: RunConfig) -> None:
    """Every number within its declared range, finite and within float32's, and every choice one of its
    declared choices; else a one-line :class:`ConfigError` naming the flag (or the setting). Run before
    any data is read or any folder written."""
    spacing = cfg.data.spacing
    if spacing is not None and (len(spacing) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf for v in spacing)):
        raise ConfigError(f"--spacing must be three positive sizes in mm, x,y,z (got {spacing})")
    for name, value in flatten(cfg).items():
        meta = declaration(name)
        where = _where(name, meta)
        if meta.choices is not None and value not in meta.choices:
            shown = ", ".join(str(int(c)) if isinstance(c, bool) else str(c) for c in meta.choices)
            raise ConfigError(f"{where} {value!r} is not one of {shown}")
        if value is None and type(None) in typing.get_args(annotation(name)):
            continue
        if meta.lo is None and meta.hi is None:
            continue
        numbers = list(value) if isinstance(value, (tuple, list)) else [value]
        for v in numbers:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise ConfigError(f"{where} must be a number, not {v!r}")
            if not math.isfinite(v) or abs(v) > FLOAT32_MAX:
                raise ConfigError(f"{where} must be a finite number within float32's range, ±3.4e38 (got {v})")
            if meta.lo is not None and (v < meta.lo or (v == meta.lo and meta.lo_open)):
                raise ConfigError(f"{where} must be {'>' if meta.lo_open else '≥'} {meta.lo:g} (got {v:g})")
            if meta.hi is not None and (v > meta.hi or (v == meta.hi and meta.hi_open)):
                raise ConfigError(f"{where} must be {'<' if meta.hi_open else '≤'} {meta.hi:g} (got {v:g})")
    if cfg.transfer.t >= cfg.corruption.num_timesteps:
        raise ConfigError(f"--t must be below the diffusion steps T = {cfg.corruption.num_timesteps} "
                          f"(got {cfg.transfer.t})")
    if cfg.transfer.synthetic:
        parse_synthetic(cfg.transfer.synthetic)


def check(cfg: RunConfig) -> None:
    """Types, ranges and choices of every setting (:func:`check_types`, :func:`check_ranges`)."""
    check_types(cfg)
    check_ranges(cfg)


def check_transfer(t: TransferConfig) -> None:
    """The fine-tuning protocol's settings (its choices and ranges), with errors that list them."""
    cfg = RunConfig(kind="segmentation", transfer=t)
    check(cfg)


def parse_synthetic(spec: str) -> tuple[Path, int]:
    """``transfer.synthetic`` ``"RUN:N"`` → (hybrid run folder, N ≥ 1), with an error that shows the form."""
    run, sep, n = str(spec).rpartition(":")
    if not sep or not run or not n.strip().isdigit() or int(n) < 1:
        raise ConfigError(f"--synthetic {spec!r}: give RUN:N, a hybrid run folder and how many pairs to add, "
                          f"e.g. --synthetic runs/hybrid:100")
    return Path(run), int(n)


# --- values from text, files and other configs -----------------------------------------------------------------

def parse_value(dotted: str, text: str) -> Any:
    """The value of a setting from text (a flag's argument, ``--set name=value``): numbers, ``a,b,c``
    lists for tuple settings, 0/1/true/false for booleans, ``none`` for optional ones."""
    meta = declaration(dotted)
    hint = annotation(dotted)
    union = typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None))
    args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    text = str(text).strip()
    if type(None) in typing.get_args(hint) and text.lower() in ("none", "null", ""):
        return None
    if meta.choices is not None and any(c == "auto" for c in meta.choices) and text.lower() == "auto":
        return "auto"

    def one(kind: Any, s: str) -> Any:
        if kind is bool:
            low = s.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{meta.flag or dotted}: {s!r} is not 0/1 (or true/false)")
        if kind is int:
            try:
                return int(s)
            except ValueError:
                raise ConfigError(f"{meta.flag or dotted}: {s!r} is not an integer") from None
        if kind is float:
            try:
                return float(s)
            except ValueError:
                raise ConfigError(f"{meta.flag or dotted}: {s!r} is not a number") from None
        return s

    kind = args[0]
    origin = typing.get_origin(kind)
    if origin in (tuple, list):
        item = typing.get_args(kind)[0]
        values = [one(item, v) for v in text.split(",") if v.strip() != ""]
        if not values:
            raise ConfigError(f"{meta.flag or dotted}: give comma-separated values, e.g. {meta.metavar or '1,2'}")
        return tuple(values) if origin is tuple else values
    if hint == (bool | str):
        return one(bool, text)
    return one(kind, text)


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """A copy of ``cfg`` with ``{"section.field": value}`` overrides applied (None = keep)."""
    d = cfg.to_dict()
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, name = dotted.partition(".")
        if section not in SECTIONS or name not in d[section]:
            raise ConfigError(f"unknown setting {dotted}")
        d[section][name] = list(value) if isinstance(value, tuple) else value
    return RunConfig.from_dict(d)


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a syntax error is a ConfigError of one line with where it is."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(errors="replace"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where} ({what}); fix the syntax") from None


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML (sections as in :class:`RunConfig`) into a plain dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {p} does not exist; see recipes/ for the shipped ones")
    data = read_yaml(p) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{p}: a recipe maps sections ({', '.join(sorted(SECTIONS))}) to their settings")
    return data


def recipe_values(recipe: dict[str, Any], where: str = "recipe") -> dict[str, Any]:
    """A recipe's ``{section: {field: value}}`` as ``{"section.field": value}``, every name checked."""
    out = {}
    for section, values in recipe.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}: section {section!r} is unknown; use {', '.join(SECTIONS)}")
        for name, value in (values or {}).items():
            declaration(f"{section}.{name}")
            out[f"{section}.{name}"] = value
    return out


def merge_recipe(cfg: RunConfig, recipe: dict[str, Any]) -> RunConfig:
    return apply_overrides(cfg, recipe_values(recipe))


def replace(obj: Any, **changes: Any) -> Any:
    return dataclasses.replace(obj, **changes)


# --- comparing two configs -------------------------------------------------------------------------------------

PATH_FIELDS = ("data.path", "data.split_file", "transfer.pretrained", "model.encoder")  # compared as real paths


def _flat(cfg: RunConfig) -> dict[str, Any]:
    out = {k: v for k, v in cfg.to_dict().items() if k not in SECTIONS and k not in RECORDS}
    out.update(flatten(cfg))
    for key in PATH_FIELDS:
        value = out.get(key)
        if isinstance(value, str) and value and os.path.exists(value):
            out[key] = os.path.realpath(value)
    return out


def config_diff(a: RunConfig, b: RunConfig) -> list[tuple[str, Any, Any]]:
    """``[(dotted name, a's value, b's value)]`` of every setting that differs (paths compared as the
    folders they name, tuples and lists alike; the records ``inherited``, ``extended``, ``sources`` are no
    settings)."""
    fa, fb = _flat(a), _flat(b)

    def same(x: Any, y: Any) -> bool:
        return json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)

    return [(k, fa.get(k), fb.get(k)) for k in fa if not same(fa.get(k), fb.get(k))]


RESUME_MAY_CHANGE = resume_may_change()
AUGMENT_LEVELS = declaration("transfer.augment").choices  # labeldiff.data.augment
LABEL_UNITS = declaration("transfer.label_unit").choices


def check_augment(level: str, flips: str) -> None:
    """An augmentation level and mirrorings from their declared choices (for callers outside a config)."""
    for name, value in (("transfer.augment", level), ("transfer.flips", flips)):
        if value not in declaration(name).choices:
            raise ConfigError(f"{declaration(name).flag} {value!r} is not one of "
                              f"{', '.join(declaration(name).choices)}")
