"""Every setting is a field of a dataclass; a run folder stores the resolved config as JSON.

Names here end up in saved ``config.json`` files, so they are chosen once and kept.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from labeldiff.errors import ConfigError, RunFolderError


@dataclass
class ModelConfig:
    """The network.

    ``arch='unet'``: the timestep-conditioned UNet (MONAI ``DiffusionModelUNet``, 2D). The CPU default
    is the small network measured at ~0.1 s per training step (batch 8, 64²). The CT paper's GPU
    recipe (ResBlock widths 128/256, 256²) lives in ``recipes/ddpm.yaml``.

    ``arch='efficientnet-unet'``: DDeP's encoder–decoder (:mod:`labeldiff.models.effunet`), an
    EfficientNet-Lite0 encoder and a UNet decoder of widths ``decoder_channels × decoder_width``; no
    timestep input. ``encoder`` says how pretraining initialises the encoder: ``imagenet`` (the
    supervised ImageNet-1k weights), ``none`` (random) or the folder of a labeldiff run whose network
    has this encoder (e.g. supervised pretraining on a labeled source dataset). The ``channels``…
    ``num_head_channels`` fields are read by ``unet`` only.
    """

    arch: str = "unet"  # unet | efficientnet-unet
    in_channels: int = 3
    channels: tuple[int, ...] = (32, 64, 128)
    num_res_blocks: int = 1
    attention_levels: tuple[bool, ...] = (False, False, False)
    norm_num_groups: int = 8
    num_head_channels: int = 32
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)  # efficientnet-unet: the 1× decoder
    decoder_width: float = 1.0  # efficientnet-unet: width multiplier (DDeP §4.3: 1×, 2×, 3×)
    encoder: str = "imagenet"  # efficientnet-unet at pretraining: imagenet | none | RUN_DIR


@dataclass
class CorruptionConfig:
    """The pretext task.

    ``method='ddpm'``: ε-prediction (Ho et al.; the CT paper, Methods); uses ``schedule``, ``beta_*``,
    ``prediction``. ``method='mdm'``: masked diffusion (MDM paper §4.1), t ~ U{1..T} and floor(N·t/T)
    of the N patches zeroed. ``method='mae'``: the same masking at the fixed ``mask_ratio``, t = 0.
    ``patch_size``, ``mask_ratio`` and ``loss`` are read by mdm / mae only (ddpm always uses MSE);
    ``loss='auto'`` is stored resolved: 1 − SSIM for mdm (MDM Table 4), MSE on the masked patches
    only for mae (MAE §3; MDM Table 4 finds SSIM hurts MAE).

    ``method='ddep'`` / ``'dep'``: decoder denoising (Brempong et al. 2022, §3–4): one fixed noise level
    ``sigma``, ``noise='scaled'`` gives √γ·x + √(1−γ)·ε with γ = 1/(1+σ²), ``'additive'`` gives x + σ·ε;
    ``prediction`` ε (default) or x₀ ('sample'); no timestep. ddep freezes the supervised encoder, dep
    trains encoder and decoder from random weights. ``method='hybrid'`` (Sauvalle & Salzmann 2024):
    labeled images, the UNet sees x_t and t and outputs C image + K mask channels, loss
    MSE(image) + ``mask_weight``·MSE(mask). ``method='supervised'``: plain segmentation training of the
    same network on labeled images (Dice + CE, t = 0), the baseline of the hybrid paper.
    """

    method: str = "ddpm"  # ddpm | mdm | mae | ddep | dep | hybrid | supervised
    num_timesteps: int = 1000
    schedule: str = "linear"  # "linear" (β 1e-4 → 0.02) or "cosine" (Nichol & Dhariwal)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "epsilon"
    patch_size: int = 8  # side of the square masked patches in pixels (MDM App. A.2; Table 7: 4, 8, 16)
    mask_ratio: float = 0.75  # mae: fraction of patches masked (MAE, He et al. 2022)
    loss: str = "auto"  # mdm / mae: "ssim" (1 − SSIM), "mse", "masked-mse" (masked patches only); auto: mdm ssim, mae masked-mse
    sigma: float = 0.22  # ddep / dep noise level (DDeP §4.1, Fig. 5: best for scaled additive noise)
    noise: str = "scaled"  # ddep / dep: "scaled" (√γ·x + √(1−γ)·ε) or "additive" (x + σ·ε)
    mask_weight: float = 1e-4  # hybrid: λ of MSE(image) + λ·MSE(mask) (hybrid paper, Sec. 4)


@dataclass
class DataConfig:
    """How images become network inputs.

    ``mode='crop'``: scale the image by ``scale`` then take random ``size``² crops (training) or
    slide a ``size``² window over it (inference). ``mode='resize'``: resize the whole image to
    ``size``². Masks are always resized with nearest neighbour.
    """

    path: str = ""
    size: int = 64
    mode: str = "crop"
    scale: float = 1.0
    channels: int = 3
    train_split: str = "train"
    test_split: str = "test"
    split_file: str | None = None  # a split JSON to use instead of ROOT/split.json (see `labeldiff split`)
    include_test: bool = False  # unlabeled pretraining also reads the test split (MDM's transductive protocol)
    num_classes: int | None = None
    cache_mb: int = 512
    num_workers: int = 0
    axis: int = 2  # volume datasets (nnU-Net raw): the axis slices are cut along (2 = axial)
    # a mask value meaning "not labeled" (255 in Pascal VOC / Cityscapes): left out of every loss, metric
    # and probe sample; None: every value is a class
    ignore_index: int | None = None
    intensity: dict | None = None  # volume datasets: labeldiff.data.nnunet.Intensity as a dict (None: percentile)
    # volume datasets: resample every volume to this voxel size (mm along x, y, z of the RAS frame) before
    # slicing, predictions going back to the input's grid; None (the default): each volume's own grid
    spacing: list[float] | None = None


@dataclass
class TrainConfig:
    """Optimisation. Defaults are sized for the 2-core CPU; recipes hold the papers' settings."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 5e-4
    lr_final_ratio: float = 0.1  # linear decay to lr·ratio (CT paper: 2e-4 → 2e-5)
    warmup_steps: int = 50
    weight_decay: float = 0.0
    ema_decay: float = 0.999  # CT paper: 0.9999 over 300k steps; 0 disables EMA
    grad_clip: float = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (with a gradient scaler)
    channels_last: bool = False  # NHWC weights and inputs (faster convolutions on recent GPUs)
    compile: bool = False  # torch.compile the network for training (minutes of compile; gains on GPUs)
    checkpoint_every: int = 200
    # the batch of a step is computed in this many micro-batches (gradients accumulated): the same update
    # as one pass over batch_size images, in 1/grad_accum of the activation memory
    grad_accum: int = 1
    log_every: int = 10
    seed: int = 0
    device: str = "auto"


@dataclass
class TransferConfig:
    """Segmentation transfer (the CT paper, Methods: fine-tuning settings).

    Adam; head learning rate ``head_lr_mult``× the base; weight decay 1e-3 for the head and 1e-4
    for the rest; loss = 0.5·CE + 0.5·Dice; fixed timestep embedding ``t`` (default 0).
    """

    pretrained: str | None = None
    strategy: str = "full"  # linear | decoder | full | lp-ft | scratch | probe
    labels: int = 3
    t: int = 0
    head_hidden: int = 128
    head_lr_mult: float = 10.0
    head_weight_decay: float = 1e-3
    backbone_weight_decay: float = 1e-4
    ce_weight: float = 0.5
    features: str = "default"  # probe: "default" (per method), "auto" (chosen by validation) or "blocks=1,2;t=50,150"
    members: int = 10  # probe: MLPs in the ensemble (Baranchuk et al.: 10)
    # probe: a member also stops once this many batches in a row (after 4 epochs) did not lower its best
    # batch loss, the reference's rule (Baranchuk et al.: 50); 0 (default): epoch patience only. Measured
    # (README, "The probe's time"): 50 is 4× faster at DRIVE size but lost 0.053 Dice on MoNuSeg k = 2
    probe_stop_iters: int = 0
    # unet: keep the pretrained final GroupNorm + SiLU (out.0, out.1) in front of the new head. Measured
    # against dropping them (README, "Keeping the UNet's output norm"): +0.010 Dice on MoNuSeg k = 3
    # (CI includes 0), −0.047 on the demo's brain slices (one seed collapsed); so they are dropped.
    keep_out_norm: bool = False
    # the fair few-label protocol (issue 11; README "Fine-tuning protocol"), the same for scratch:
    augment: str = "strong"  # none | light | strong (labeldiff.data.augment); strong: measured, README
    flips: str = "h"  # which mirrorings make sense for the data: none | h | v | hv
    steps_rule: str = "fixed"  # fixed: train.steps; plateau: stop when the training loss stops falling
    lp_steps: int = 100  # lp-ft: steps of the linear-probe phase (head only) before full fine-tuning
    # hybrid / supervised source: fine-tune its own mask output instead of a new head. True: required;
    # "auto": whenever the source's classes match the target's; False (default: on Kvasir → CVC, k = 4, it
    # gained +0.028 without augmentation but −0.001 with the default strong augmentation; README)
    keep_head: bool | str = False
    # what --labels k counts on a volume dataset: k labeled slices (the CT paper's 4 slices), or k whole
    # volumes (every labeled slice of k training cases); on a 2D dataset a slice is an image
    label_unit: str = "slices"
    # "RUN:N": N (image, mask) pairs sampled from the hybrid run RUN join the k labeled images
    # (sampled by labeldiff.sample.synthetic, read by RunFolder.synthetic_pairs); each batch slot is
    # a synthetic pair with probability synthetic_fraction
    synthetic: str | None = None
    synthetic_fraction: float = 0.5


LABEL_UNITS = ("slices", "volumes")  # transfer.label_unit
AUGMENT_LEVELS = ("none", "light", "strong")  # transfer.augment (labeldiff.data.augment)
FLIPS = ("none", "h", "v", "hv")  # transfer.flips
STEPS_RULES = ("fixed", "plateau")  # transfer.steps_rule


def check_augment(level: str, flips: str) -> None:
    if level not in AUGMENT_LEVELS:
        raise ValueError(f"augment {level!r} is unknown; choose one of {', '.join(AUGMENT_LEVELS)}")
    if flips not in FLIPS:
        raise ValueError(f"flips {flips!r} is unknown; choose one of {', '.join(FLIPS)} "
                         f"(h = left–right, v = up–down)")


# Range of every numeric setting, checked before a run reads data or writes a folder: config field →
# (command-line flag, lowest, highest, whether the lowest itself is allowed). None: no bound.
RANGES: dict[str, tuple[str, float | None, float | None, bool, bool]] = {
    "data.size": ("--size", 8, None, True, True),
    "data.scale": ("--scale", 0, None, False, True),
    "data.channels": ("--channels", 1, None, True, True),
    "data.num_workers": ("--num-workers", 0, None, True, True),
    "data.cache_mb": ("cache_mb", 0, None, True, True),
    "data.num_classes": ("--num-classes", 2, None, True, True),
    "data.ignore_index": ("--ignore-index", 0, None, True, True),
    "train.steps": ("--steps", 1, None, True, True),
    "train.batch_size": ("--batch-size", 1, None, True, True),
    "train.lr": ("--lr", 0, None, False, True),
    "train.lr_final_ratio": ("lr_final_ratio", 0, 1, True, True),
    "train.warmup_steps": ("--warmup-steps", 0, None, True, True),
    "train.weight_decay": ("weight_decay", 0, None, True, True),
    "train.ema_decay": ("--ema-decay", 0, 1, True, False),
    "train.grad_clip": ("--grad-clip", 0, None, True, True),
    "train.checkpoint_every": ("--checkpoint-every", 1, None, True, True),
    "train.grad_accum": ("--grad-accum", 1, None, True, True),
    "train.log_every": ("log_every", 1, None, True, True),
    "train.seed": ("--seed", 0, None, True, True),
    "model.num_res_blocks": ("--res-blocks", 1, None, True, True),
    "model.num_head_channels": ("--head-channels", 1, None, True, True),
    "model.norm_num_groups": ("norm_num_groups", 1, None, True, True),
    "model.decoder_width": ("--decoder-width", 0, None, False, True),
    "corruption.num_timesteps": ("--timesteps", 1, 100_000, True, True),  # the papers use 1000 (CT: 1000, MDM: 1000)
    "corruption.patch_size": ("--patch-size", 1, None, True, True),
    "corruption.mask_ratio": ("--mask-ratio", 0, 1, False, False),
    "corruption.sigma": ("--sigma", 0, None, False, True),
    "corruption.mask_weight": ("--mask-weight", 0, None, True, True),
    "transfer.labels": ("--labels", 1, None, True, True),
    "transfer.t": ("--t", 0, None, True, True),
    "transfer.head_hidden": ("--head-hidden", 1, None, True, True),
    "transfer.head_lr_mult": ("head_lr_mult", 0, None, False, True),
    "transfer.members": ("--members", 1, None, True, True),
    "transfer.probe_stop_iters": ("--probe-stop-iters", 0, None, True, True),
    "transfer.lp_steps": ("--lp-steps", 0, None, True, True),
    "transfer.ce_weight": ("ce_weight", 0, 1, True, True),
}


FLOAT32_MAX = 3.4028234663852886e38  # the network and optimiser compute in float32 at most


def check_ranges(cfg: "RunConfig") -> None:
    """Every numeric setting within its range (:data:`RANGES`), else a one-line error naming the flag:
    run before any data is read or any folder written."""
    for dotted, (flag, lo, hi, lo_ok, hi_ok) in RANGES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None and dotted in ("data.num_classes", "data.ignore_index"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ConfigError(f"{flag} must be a number, not {value!r}")
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
            raise ConfigError(f"{flag} must be a finite number within float32's range, ±3.4e38 (got {value})")
        if lo is not None and (value < lo or (value == lo and not lo_ok)):
            raise ConfigError(f"{flag} must be {'≥' if lo_ok else '>'} {lo:g} (got {value:g})")
        if hi is not None and (value > hi or (value == hi and not hi_ok)):
            raise ConfigError(f"{flag} must be {'≤' if hi_ok else '<'} {hi:g} (got {value:g})")
    if cfg.data.spacing is not None and (len(cfg.data.spacing) != 3 or any(
            isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf") for t in cfg.data.spacing)):
        raise ConfigError(f"--spacing must be three positive sizes in mm, x,y,z (got {cfg.data.spacing})")
    if any(not isinstance(c, int) or c < 1 for c in cfg.model.channels):
        raise ConfigError(f"--unet-channels must be positive integers (got {cfg.model.channels})")
    if cfg.transfer.t >= cfg.corruption.num_timesteps:
        raise ConfigError(f"--t must be below the diffusion steps T = {cfg.corruption.num_timesteps} (got {cfg.transfer.t})")
    for name in ("beta_start", "beta_end"):
        beta = getattr(cfg.corruption, name)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < 1:
            raise ConfigError(f"corruption.{name} must lie in (0, 1) (got {beta!r})")


def check_transfer(t: TransferConfig) -> None:
    """The fine-tuning protocol's choices (augment, flips, steps rule), with errors that list them."""
    check_augment(t.augment, t.flips)
    if t.steps_rule not in STEPS_RULES:
        raise ValueError(f"steps rule {t.steps_rule!r} is unknown; choose one of {', '.join(STEPS_RULES)}")
    if t.keep_head not in (True, False, "auto"):
        raise ValueError(f"keep_head {t.keep_head!r}: use auto, true or false")
    if t.lp_steps < 1:
        raise ValueError(f"lp_steps must be ≥ 1 (the linear-probe phase of lp-ft), got {t.lp_steps}")
    if not 0 < t.synthetic_fraction < 1:
        raise ValueError(f"--synthetic-fraction must lie in (0, 1): the share of each batch that is synthetic pairs "
                         f"(got {t.synthetic_fraction})")
    if t.synthetic:
        parse_synthetic(t.synthetic)


def parse_synthetic(spec: str) -> tuple[Path, int]:
    """``transfer.synthetic`` ``"RUN:N"`` → (hybrid run folder, N ≥ 1), with an error that shows the form."""
    run, sep, n = str(spec).rpartition(":")
    if not sep or not run or not n.strip().isdigit() or int(n) < 1:
        raise ValueError(f"--synthetic {spec!r}: give RUN:N, a hybrid run folder and how many pairs to add, "
                         f"e.g. --synthetic runs/hybrid:100")
    return Path(run), int(n)


SECTIONS = {
    "model": ModelConfig,
    "corruption": CorruptionConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "transfer": TransferConfig,
}


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
    # a transfer run: the pretrained run it inherited its network and data geometry from, and every
    # geometry value given that differs from the pretrained one ({"data.scale": {"pretrained", "used"}})
    inherited: dict[str, Any] | None = None
    # a run resumed with more ``train.steps`` than it was started with: one record per extension
    # ({"at_step", "from_steps", "to_steps"}); the learning-rate schedule is re-spread over the new length
    extended: list[dict[str, Any]] | None = None

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
                raise ValueError(f"unknown config key {key!r}; known: {[f.name for f in fields(cls)]}")
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


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a JSON-loaded ``value`` fits the field annotation ``hint`` (int, float, str, bool,
    tuples, lists, dicts and their ``| None``)."""
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


def check_types(cfg: RunConfig) -> None:
    """Every field of every section has the type its declaration says (a config.json edited by hand
    with ``"num_classes": "three"`` fails here, naming the field)."""
    checks = [(cfg, name) for name in ("kind", "num_classes", "inherited", "extended")]
    checks += [(getattr(cfg, section), f.name) for section in SECTIONS for f in fields(SECTIONS[section])]
    for obj, name in checks:
        hint = typing.get_type_hints(type(obj))[name]
        value = getattr(obj, name)
        if not _type_ok(value, hint):
            where = name if obj is cfg else f"{next(k for k, v in SECTIONS.items() if isinstance(obj, v))}.{name}"
            want = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise ConfigError(f"{where} is {value!r}, not {want}")


# What a resume may change: the run's length (an extension, recorded in ``extended``), and how the same
# computation is scheduled on this machine. Any other difference from the stored config.json is refused.
RESUME_MAY_CHANGE = frozenset({"train.steps", "train.device", "train.checkpoint_every", "train.log_every",
                               "data.num_workers", "data.cache_mb"})
PATH_FIELDS = ("data.path", "data.split_file", "transfer.pretrained", "model.encoder")  # compared as real paths
RECORDS = ("inherited", "extended")  # records of how a run came about, not settings


def _flat(cfg: RunConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    out = {k: v for k, v in d.items() if k not in SECTIONS and k not in RECORDS}
    for section in SECTIONS:
        out.update({f"{section}.{k}": v for k, v in d[section].items()})
    for key in PATH_FIELDS:
        value = out.get(key)
        if isinstance(value, str) and value and os.path.exists(value):
            out[key] = os.path.realpath(value)
    return out


def config_diff(a: RunConfig, b: RunConfig) -> list[tuple[str, Any, Any]]:
    """``[(dotted name, a's value, b's value)]`` of every setting that differs (paths compared as the
    folders they name, tuples and lists alike)."""
    fa, fb = _flat(a), _flat(b)
    same = lambda x, y: json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)  # noqa: E731
    return [(k, fa.get(k), fb.get(k)) for k in fa if not same(fa.get(k), fb.get(k))]


def default_pretrain_config() -> RunConfig:
    """What ``labeldiff pretrain`` starts from before a recipe and flags."""
    return RunConfig(kind="pretrain")


def default_finetune_config() -> RunConfig:
    """What ``labeldiff finetune`` (and a study's cells) start from: 300 steps, the CT paper's lr."""
    return RunConfig(kind="segmentation",
                     train=TrainConfig(steps=300, lr=2e-4, warmup_steps=20, ema_decay=0.0, checkpoint_every=100))


def _section(kind: type, value: dict[str, Any]) -> Any:
    known = {f.name: f for f in fields(kind)}
    unknown = set(value) - set(known)
    if unknown:
        raise ValueError(f"unknown {kind.__name__} field(s) {sorted(unknown)}; known: {sorted(known)}")
    out = {}
    for k, v in value.items():
        out[k] = tuple(v) if isinstance(v, list) else v
    return kind(**out)


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Return a copy of ``cfg`` with ``{"section.field": value}`` overrides applied (None = keep)."""
    d = cfg.to_dict()
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, name = dotted.split(".")
        if name not in d[section]:
            raise ValueError(f"unknown setting {dotted}")
        d[section][name] = list(value) if isinstance(value, tuple) else value
    return RunConfig.from_dict(d)


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a syntax error is a ValueError of one line with where it is."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(errors="replace"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{path}: not valid YAML{where} ({what}); fix the syntax") from None


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML (sections as in :class:`RunConfig`) into a plain dict; ``path`` is a shipped
    name (``ddpm-cpu``) or a file (:func:`labeldiff.recipes.find`)."""
    from labeldiff.recipes import find

    p = find(path)
    data = read_yaml(p) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{p}: a recipe maps sections ({', '.join(sorted(SECTIONS))}) to their settings")
    return data


def merge_recipe(cfg: RunConfig, recipe: dict[str, Any]) -> RunConfig:
    d = cfg.to_dict()
    for section, values in recipe.items():
        if section not in SECTIONS:
            raise ValueError(f"recipe section {section!r} is unknown; use {sorted(SECTIONS)}")
        d[section].update(values)
    return RunConfig.from_dict(d)


def replace(obj: Any, **changes: Any) -> Any:
    return dataclasses.replace(obj, **changes)
