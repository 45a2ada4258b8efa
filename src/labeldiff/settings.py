"""Every setting of a run, declared once: the section dataclasses (``model``, ``corruption``, ``data``,
``train``, ``transfer``) whose fields are made by :func:`setting`.

A declaration carries everything about a setting: its type (the annotation), its default (and a second
one for fine-tuning where it differs from pretraining), the help line, the range or choices, the
command-line flag and the commands that show it, and its role: ``geometry`` (how images become network
inputs: a transfer takes it from its pretrained run), ``result`` (whether it changes what a run computes),
``resume`` (whether ``--resume`` may change it) and ``applies`` (why a flag typed on the command line
cannot apply to a run). :mod:`labeldiff.config` reads these declarations for everything else — the
parser, the checks, the reference pages, the validation of recipes and studies — so nothing about a
setting is written twice.

Names here end up in saved ``config.json`` files, so they are chosen once and kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

PRETRAIN, FINETUNE = ("pretrain",), ("finetune",)
BOTH = PRETRAIN + FINETUNE


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
    absent: Any = SAME  # what a saved config.json written before this setting existed meant (SAME: the default)


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
    beta_start: float = setting(1e-4, "first β of the linear schedule (cosine has none: another value is refused)",
                                lo=0, hi=1, lo_open=True, hi_open=True)
    beta_end: float = setting(0.02, "last β of the linear schedule (cosine has none: another value is refused)",
                              lo=0, hi=1, lo_open=True, hi_open=True)
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
    noise_range: str = setting("unit", "ddep/dep: the pixel range σ is measured on: unit (the image mapped to [0, 1], "
                                       "noised, mapped back: DDeP Fig. 4) or signed (noise added on [-1, 1], where "
                                       "the same σ is half the relative noise)", flag="--noise-range",
                               commands=PRETRAIN, choices=("unit", "signed"), absent="signed",
                               applies=_unless("corruption.method", ("ddep", "dep"), "only ddep and dep"))
    mask_weight: float = setting(1e-4, "hybrid: λ in MSE(image) + λ·MSE(mask) (hybrid paper, Sec. 4)",
                                 flag="--mask-weight", commands=PRETRAIN, lo=0,
                                 applies=_unless("corruption.method", ("hybrid",), "only hybrid weighs a mask loss"))
    image_weight: float = setting(1.0, "hybrid: the weight of MSE(image); 0 makes the mask-only twin (the same "
                                       "network, inputs x_t at the same t and mask loss, no image term): the "
                                       "supervised baseline on the hybrid's footing", flag="--image-weight",
                                  commands=PRETRAIN, lo=0,
                                  applies=_unless("corruption.method", ("hybrid",), "only hybrid has an image term"))


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
    lr_final_ratio: float = setting(0.1, "the learning rate decays to lr × this (CT paper: 2e-4 → 2e-5)", lo=0, hi=1)
    lr_schedule: str = setting("linear", "decay after the warm-up, to lr × lr_final_ratio: linear (CT paper) or cosine "
                                         "(DDeP §5.1)", flag="--lr-schedule", commands=BOTH,
                               choices=("linear", "cosine"))
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
    preview_samples: int = setting(0, "ddpm / hybrid pretraining: at each checkpoint and at the end, draw N images "
                                      "(DDIM, 50 steps, seed 0, the EMA weights) into RUN/previews/step-S.png; 0: none",
                                   flag="--preview-samples", commands=PRETRAIN, lo=0, result=False, resume=True)
    track: str = setting("none", "also stream log.jsonl's records to: none, tensorboard (RUN/tensorboard), mlflow or "
                                 "tensorboard,mlflow (labeldiff.tracking; pip install \"labeldiff[track]\")",
                         flag="--track", commands=BOTH, metavar="none|tensorboard|mlflow", result=False,
                         resume=True)
    tracking_uri: str | None = setting(None, "with --track mlflow: the MLflow tracking URI [file: ./mlruns]",
                                       flag="--tracking-uri", commands=BOTH, metavar="URI", result=False,
                                       resume=True)
    seed: int = setting(0, "random seed: the labeled images drawn, the initial weights, the batches", flag="--seed",
                        commands=BOTH, lo=0)
    device: str = setting("auto", "auto (CUDA if present), cpu or cuda[:N]", flag="--device", commands=BOTH,
                          resume=True)


STRATEGIES = ("probe", "linear", "decoder", "full", "lp-ft", "scratch")  # labeldiff.transfer: one enum
AUGMENT_NONE_UP_TO = 2  # transfer.augment auto: none for up to this many labeled images (slices), strong above


def auto_augment(labels: int, label_unit: str) -> str:
    """What ``transfer.augment: auto`` is for k labeled images: ``none`` up to :data:`AUGMENT_NONE_UP_TO`
    labeled images (or slices), ``strong`` above, and for whole labeled volumes (many slices each)."""
    return "none" if label_unit == "slices" and labels <= AUGMENT_NONE_UP_TO else "strong"
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
    labels: int = setting(3, "number of labeled training images k, drawn with --seed (with --labeled: their count)",
                          flag="--labels", commands=FINETUNE, lo=1)
    labeled: tuple[str, ...] | None = setting(None, "train on exactly these images of the train split: STEM,STEM,… or "
                                                    "a file of stems, one a line (`labeldiff select --out` writes "
                                                    "one); stored as the stems", flag="--labeled", commands=FINETUNE,
                                              metavar="STEMS|FILE")
    t: int = setting(0, "fixed timestep fed to the backbone's time embedding", flag="--t", commands=FINETUNE, lo=0)
    head_hidden: int = setting(128, "hidden channels of the segmentation head (two conv3×3 layers, CT paper Fig. 2); "
                                    "0: one conv3×3 from the features to the classes (TransUNet's head, DDeP)",
                               flag="--head-hidden", commands=FINETUNE, lo=0)
    head_lr_mult: float = setting(10.0, "the head's learning rate is lr × this (CT paper: 10)", lo=0, lo_open=True)
    head_weight_decay: float = setting(1e-3, "Adam weight decay of the head (CT paper)", lo=0)
    backbone_weight_decay: float = setting(1e-4, "Adam weight decay of the backbone (CT paper)", lo=0)
    ce_weight: float = setting(0.5, "loss = w·CE + (1 − w)·Dice", lo=0, hi=1)
    features: str = setting("default", "probe: default (per method: mdm t=50, ddpm t=50,150,250; middle decoder "
                                       "blocks), mdm-medical (the MDM paper on medical images: mdm t=50, ddpm "
                                       "t=250), auto (chosen by leave-one-image-out validation) or "
                                       "'blocks=1,2;t=50,150'", flag="--features", commands=FINETUNE,
                            applies=PROBE_ONLY)
    probe_batch: int = setting(1024, "probe: pixels per batch (MDM on medical images: 65536; Baranchuk: 64)",
                               flag="--probe-batch", commands=FINETUNE, lo=1, applies=PROBE_ONLY)
    probe_max_epochs: int = setting(50, "probe: at most this many epochs per member (with few labeled images and "
                                        "large batches an epoch is one or two batches: raise it so the loss rule "
                                        "stops a member)", flag="--probe-max-epochs", commands=FINETUNE, lo=1,
                                    applies=PROBE_ONLY)
    members: int = setting(10, "probe: MLPs in the ensemble (Baranchuk et al.: 10)", flag="--members",
                           commands=FINETUNE, lo=1, applies=PROBE_ONLY)
    probe_stop_iters: int = setting(0, "probe: after 4 epochs, stop a member once this many batches in a row did not "
                                       "lower its best batch loss (the reference's rule: 50); 0: epoch patience only",
                                    flag="--probe-stop-iters", commands=FINETUNE, lo=0, applies=PROBE_ONLY)
    keep_out_norm: bool = setting(False, "unet: keep the pretrained final GroupNorm + SiLU in front of the new head",
                                  flag="--keep-out-norm", commands=FINETUNE)
    augment: str = setting("auto", "image+mask augmentation: none (crop window only), light (small rotation/scale, "
                                   "brightness, gamma), strong (nnU-Net-like: rotation, scale, elastic, noise, blur, "
                                   "contrast), or auto: none for up to 2 labeled images, strong above (the guide "
                                   "on fine-tuning shows the studies behind it)", flag="--augment",
                           commands=FINETUNE, choices=("auto", "none", "light", "strong"))
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
