"""``labeldiff finetune``: k labeled images, a pretrained backbone (or none), one loop.

Settings from the CT paper (Huang et al. 2025, Methods, "fine-tuning settings"): Adam, head
learning rate 10× the base, weight decay 1e-3 for the head and 1e-4 for the rest, loss
0.5·CE + 0.5·Dice, fixed timestep embedding t = 0.

Strategies (:data:`FROZEN`, the one mapping from strategy to frozen submodules):

- ``linear``: the whole backbone frozen, only the head trains (the CT paper's "linear classification");
- ``decoder``: the encoder half frozen (:data:`labeldiff.models.unet.ENCODER_PARTS`), decoder and head
  train (the CT paper's best strategy);
- ``full``: everything trains (vanilla fine-tuning of the hybrid and DDeP papers);
- ``lp-ft``: ``transfer.lp_steps`` steps of ``linear`` (into ``OUT/lp/``), then ``full`` for
  ``train.steps`` from that head (Kumar et al. 2022: a trained head distorts the features less
  than a random one);
- ``scratch``: the identical network from random initialisation with the identical schedule;
- ``probe``: pixel-MLP ensemble on frozen features (:mod:`labeldiff.transfer.probe_run`), not this loop;
  :func:`labeldiff.transfer.run.run_transfer` dispatches every strategy.

The new head reads the last decoder features; with ``transfer.keep_out_norm`` the pretrained final
GroupNorm + SiLU of the diffusion UNet (``out.0``) stay in front of it. With ``transfer.keep_head`` a
hybrid or supervised source run keeps its own mask output instead of getting a new head (the classes
must match). Every strategy, scratch included, trains on batches augmented by ``transfer.augment``
and ``transfer.flips`` (:mod:`labeldiff.data.augment`) for the length ``transfer.steps_rule`` gives;
with ``transfer.synthetic`` (``RUN:N``) those batches also draw from N pairs sampled from a hybrid run
(:mod:`labeldiff.sample.synthetic` samples them into the run's cache before; this reads the cache).

Frozen modules have ``requires_grad=False``, are left out of the optimiser and are kept in
``eval()`` (BatchNorm statistics do not move).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from monai.losses import DiceCELoss, MaskedDiceLoss

from labeldiff import distributed
from labeldiff.checkpoint import atomic_write_text, prepare_run_dir, release_run_dir
from labeldiff.config import RunConfig, parse_synthetic, replace
from labeldiff.data import provenance
from labeldiff.data.augment import Augment
from labeldiff.data.datasets import StepBatches
from labeldiff.models.unet import (ENCODER_PARTS, SegmentationNet, check_input_size, check_step_memory,
                                   load_backbone_strict)
from labeldiff.pretrain.loop import train
from labeldiff.pretrain.run import micro_batch
from labeldiff.resolve import describe
from labeldiff.runs import DIRECT_SEGMENTERS, RunFolder
from labeldiff.pretrain.cost import calibrate
from labeldiff.runtime import compute_summary, generator, resolve_device, resolve_precision
from labeldiff.transfer.labeled import prepare_transfer
from labeldiff.errors import ConfigError

STRATEGIES = ("linear", "decoder", "full", "lp-ft", "scratch")  # + "probe" (labeldiff.transfer.probe_run)
LP_DIR = "lp"  # lp-ft: the linear-probe phase's run folder inside the run
PLATEAU_WINDOW, PLATEAU_TOL = 50, 0.02  # plateau: compare 50-step means; stop below a 2 % improvement


def frozen_parts(strategy: str, arch: str) -> tuple[str, ...]:
    """Submodule names of a :class:`SegmentationNet` that ``strategy`` keeps frozen (lp-ft: its
    second phase; the first is ``linear``)."""
    if strategy == "linear":
        return ("backbone",)
    if strategy == "decoder":
        return tuple(f"backbone.{name}" for name in ENCODER_PARTS[arch])
    if strategy in ("full", "lp-ft", "scratch"):
        return ()
    raise ConfigError(f"strategy {strategy!r} is unknown; available: {', '.join(STRATEGIES)}, probe")


def freeze(model: torch.nn.Module, parts: tuple[str, ...]) -> list[torch.nn.Module]:
    """``requires_grad_(False)`` on the named submodules; returns them (the loop keeps them in eval())."""
    modules = [model.get_submodule(name) for name in parts]
    for m in modules:
        m.requires_grad_(False)
    return modules


def segmentation_loss(ce_weight: float, ignore_index: int | None = None):
    """0.5·CE + 0.5·Dice (softmax over K classes, background included) via MONAI's DiceCELoss; with
    ``ignore_index``, CE skips those pixels and the Dice term is MONAI's MaskedDiceLoss over the rest."""
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=ce_weight, lambda_dice=1.0 - ce_weight)
    masked_dice = MaskedDiceLoss(to_onehot_y=True, softmax=True)

    def loss_fn(model: torch.nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
        logits = model(batch["image"]).float()
        target = batch["mask"]
        if ignore_index is None:
            return dice_ce(logits, target[:, None])
        labeled = target != ignore_index
        if not bool(labeled.any()):  # a batch of crops with no labeled pixel teaches nothing
            return logits.sum() * 0.0
        ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index)
        dice = masked_dice(logits, torch.where(labeled, target, 0)[:, None], mask=labeled[:, None].float())
        return ce_weight * ce + (1.0 - ce_weight) * dice

    return loss_fn


def keep_head_possible(cfg: RunConfig, num_classes: int, pre: RunFolder | None) -> str | None:
    """Why the source's mask output cannot be kept, with how to fix it (None: it can): a hybrid /
    supervised source run with the target's K, and a strategy that trains it."""
    t = cfg.transfer
    if pre is None or t.strategy == "scratch":
        return "scratch has no source head (give --pretrained a hybrid or supervised run)"
    if pre.method not in DIRECT_SEGMENTERS:
        return (f"{pre.path} is a {pre.method!r} run, whose output is an image, not a mask; it needs a hybrid or "
                f"supervised run")
    if t.strategy in ("linear", "lp-ft"):
        return (f"with --strategy {t.strategy} the kept head is the network's own output layer, so there is no "
                f"separate head to train first; use --strategy full or decoder")
    if pre.config.num_classes != num_classes:
        return (f"{pre.path} predicts {pre.config.num_classes} classes but the target data has {num_classes}; "
                f"relabel the target to the source's classes")
    return None


def check_keep_head(cfg: RunConfig, num_classes: int, pre: RunFolder | None) -> None:
    """Resolve ``transfer.keep_head`` to True / False in ``cfg`` (what the run folder stores).

    ``auto`` keeps the source's head whenever :func:`keep_head_possible` allows, else prints why and
    trains a new one; True requires it and refuses with the reason; False (default) never keeps it.
    A kept head copies the source's ``corruption`` section into ``cfg``: which pretext made the kept
    output layer, so the run folder rebuilds its network with no flags."""
    t = cfg.transfer
    if t.keep_head is False:
        return
    why = keep_head_possible(cfg, num_classes, pre)
    if why is not None:
        if t.keep_head is True:
            raise ConfigError(f"--keep-head: {why} (or drop --keep-head to train a new head)")
        if pre is not None and pre.method in DIRECT_SEGMENTERS:
            print(f"keep-head auto: a new head ({why})")
        t.keep_head = False
        return
    t.keep_head = True
    cfg.corruption = replace(pre.config.corruption)


def build_segmenter(cfg: RunConfig, num_classes: int, pre: RunFolder | None) -> tuple[SegmentationNet, dict | None]:
    """The SegmentationNet of ``cfg``, its backbone loaded strictly from ``pre`` unless scratch."""
    t = cfg.transfer
    head = cfg.corruption.method if t.keep_head else None
    model = SegmentationNet(cfg.model, num_classes, t=t.t, head_hidden=t.head_hidden, keep_out_norm=t.keep_out_norm,
                            keep_head=head)
    if t.strategy == "scratch":
        return model, None
    return model, load_backbone_strict(model, pre.weights())


class PlateauStop:
    """``stop(step, loss) -> bool`` of ``steps_rule: plateau``: True once the mean training loss of the
    last ``window`` steps is less than ``tol`` (relative) below the mean of the ``window`` before.

    Its loss history is part of a checkpoint (:meth:`state` / :meth:`load`), so a resumed run stops
    where the uninterrupted one would."""

    def __init__(self, window: int = PLATEAU_WINDOW, tol: float = PLATEAU_TOL):
        self.window, self.tol = window, tol
        self.losses: list[float] = []

    def __call__(self, step: int, loss: float) -> bool:
        self.losses.append(loss)
        w = self.window
        if len(self.losses) < 2 * w or len(self.losses) % w:
            return False
        last, before = sum(self.losses[-w:]) / w, sum(self.losses[-2 * w:-w]) / w
        return last > before * (1 - self.tol)

    def state(self) -> dict:
        return {"losses": self.losses[-2 * self.window:], "seen": len(self.losses)}

    def load(self, state: dict) -> None:
        """Restore :meth:`state`; the history is padded back to its length (only the last two windows
        are ever read, and only their position modulo the window matters)."""
        kept = list(state["losses"])
        self.losses = [math.nan] * (state["seen"] - len(kept)) + kept


def plateau_stop(window: int = PLATEAU_WINDOW, tol: float = PLATEAU_TOL) -> PlateauStop:
    return PlateauStop(window, tol)


def param_groups(model: SegmentationNet, cfg: RunConfig) -> list[dict]:
    """Adam groups of the trainable parameters: backbone at ``lr``, head at ``lr × head_lr_mult``."""
    t = cfg.transfer
    head = [p for p in model.head.parameters() if p.requires_grad]
    rest = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [
        {"params": rest, "lr": cfg.train.lr, "weight_decay": t.backbone_weight_decay, "name": "backbone"},
        {"params": head, "lr": cfg.train.lr * t.head_lr_mult, "weight_decay": t.head_weight_decay, "name": "head"},
    ]
    return [g for g in groups if g["params"]]


def calibrate_finetune(cfg: RunConfig, samples: list, num_classes: int, strategy: str | None = None) -> float:
    """Seconds of one fine-tuning step of the resolved ``cfg`` (``strategy``: another phase's, e.g. lp-ft's
    linear one) on this machine: real batches of the labeled ``samples``, augmented as the run augments
    them, through a network built for the measurement (random weights cost what pretrained ones do) and
    thrown away (:func:`labeldiff.pretrain.cost.calibrate`). Writes nothing."""
    t = cfg.transfer
    device = resolve_device(cfg.train.device)
    check_step_memory(cfg.model, cfg.data.size, micro_batch(cfg), cfg.data.channels, device)
    model = SegmentationNet(cfg.model, num_classes, t=t.t, head_hidden=t.head_hidden, keep_out_norm=t.keep_out_norm)
    freeze(model, frozen_parts(strategy or t.strategy, cfg.model.arch))
    model.to(device)
    batches = StepBatches(samples, cfg.data, cfg.train.batch_size, cfg.train.seed, labeled=True,
                          num_classes=num_classes, flips=t.flips,
                          augment=Augment(t.augment, cfg.data.size) if t.augment != "none" else None)
    loss_fn, drawn = segmentation_loss(t.ce_weight, cfg.data.ignore_index), iter(range(2))

    def draw() -> dict:
        i = next(drawn)
        return {"i": i, **{k: v.to(device) for k, v in batches[i].items()}}

    def step(net: torch.nn.Module, batch: dict) -> torch.Tensor:
        return loss_fn(net, batch, generator(batch.pop("i"), device))

    return calibrate(model, torch.optim.Adam(param_groups(model, cfg)), step, draw,
                     resolve_precision(cfg.train.precision, device))


def calibrate_evaluation(cfg: RunConfig, sample, num_classes: int) -> float:
    """Seconds to predict one test image (``sample``, read at its own size) with the network ``cfg`` trains,
    as evaluation predicts it (fp32, sliding window or whole image): the second of two predictions of a
    network with random weights. Writes nothing."""
    import time

    from labeldiff.evaluate.predict import predict_mask

    t = cfg.transfer
    model = SegmentationNet(cfg.model, num_classes, t=t.t, head_hidden=t.head_hidden, keep_out_norm=t.keep_out_norm)
    model.to(resolve_device(cfg.train.device)).eval()
    image = torch.from_numpy(sample.read_image(cfg.data.channels))
    took = []
    for _ in range(2):
        began = time.perf_counter()
        predict_mask(model, image, cfg.data)
        took.append(time.perf_counter() - began)
    return took[-1]


def run_finetune(cfg: RunConfig, out: Path, stems: list[str] | None = None, resume: bool = False,
                 overwrite: bool = False) -> dict:
    """Fine-tune (or train from scratch) on ``stems`` or ``transfer.labels`` drawn images (see
    :func:`labeldiff.transfer.labeled.prepare_transfer`); everything is written into ``out``."""
    if cfg.transfer.strategy == "probe":
        raise ValueError("the probe trains pixel MLPs, not this network: use labeldiff.transfer.run.run_transfer "
                         "(`labeldiff finetune --strategy probe`)")
    job = prepare_transfer(cfg, stems)
    cfg, t = job.cfg, job.cfg.transfer
    frozen_parts(t.strategy, cfg.model.arch)
    for line in describe(cfg):
        print(line)
    check_keep_head(cfg, job.num_classes, job.pre)
    check_input_size(cfg.model, cfg.data.size)
    device = distributed.setup(resolve_device(cfg.train.device))  # torchrun: join the process group
    distributed.check_batch(cfg.train.batch_size, cfg.train.grad_accum)  # before the run folder exists
    check_step_memory(cfg.model, cfg.data.size, micro_batch(cfg), cfg.data.channels, device)
    synthetic = None
    if t.synthetic:  # read from the hybrid run's cache (sampled by the caller) before the run folder exists
        run, n = parse_synthetic(t.synthetic)
        source = RunFolder.open(run, flag="--synthetic")
        synthetic, cache = source.synthetic_pairs(n, cfg, job.num_classes), source.synthetic_chunks(n)[0].parent
    synthetic_run = parse_synthetic(t.synthetic)[0] if t.synthetic else None
    reads = (cfg.data.path, cfg.data.split_file, t.pretrained, synthetic_run)
    out = prepare_run_dir(Path(out), overwrite=overwrite, resume=resume, reads=reads, config=cfg)
    try:
        return _finetune(cfg, out, job, device, synthetic, cache if synthetic is not None else None, resume)
    finally:
        release_run_dir(out)


def _finetune(cfg: RunConfig, out: Path, job, device: torch.device, synthetic, cache: Path | None,
              resume: bool) -> dict:
    """The part of :func:`run_finetune` that writes the run folder (locked by the caller)."""
    t = cfg.transfer
    torch.manual_seed(cfg.train.seed)
    model, report = build_segmenter(cfg, job.num_classes, job.pre)
    model.to(device)
    if report is not None:
        print(f"loaded {len(report['loaded'])} backbone tensors from {t.pretrained}; "
              f"skipped (pretext output layer): {', '.join(report['skipped']) or 'none'}; "
              f"new (random init): {', '.join(report['new']) or 'none (--keep-head)'}")
    if distributed.is_main():
        provenance.write(out, provenance.record(job.ds.root, job.ds.split_file, job.stems, labeled=True))
        atomic_write_text(out / "labeled.json", json.dumps({"split": cfg.data.train_split, "stems": job.stems,
                                                             "seed": cfg.train.seed, "load_report": report,
                                                             "synthetic": None if synthetic is None else {
                                                                 "pairs": len(synthetic[0]), "cache": str(cache),
                                                                 "fraction": t.synthetic_fraction}}, indent=2))
    batches = StepBatches(job.ds.samples(job.stems), cfg.data, cfg.train.batch_size, cfg.train.seed,
                          labeled=True, num_classes=job.num_classes, flips=t.flips,
                          augment=Augment(t.augment, cfg.data.size) if t.augment != "none" else None,
                          extra=synthetic, extra_fraction=t.synthetic_fraction)
    extra = f" + {len(synthetic[0])} synthetic pairs ({t.synthetic_fraction:.0%} of each batch)" if synthetic else ""
    print(f"finetune ({t.strategy}): {len(job.stems)} labeled images {job.stems}{extra}, K={job.num_classes}, "
          f"augment {t.augment}, flips {t.flips}, {_length(cfg)} of batch {cfg.train.batch_size} on "
          f"{compute_summary(device, cfg.train.precision)}")
    if t.strategy == "lp-ft":
        lp = replace(cfg, transfer=replace(t, strategy="linear"), train=replace(cfg.train, steps=t.lp_steps))
        lp_dir = out / LP_DIR
        if distributed.is_main():
            lp_dir.mkdir(exist_ok=True)
        distributed.barrier()
        if not (lp_dir / "model.safetensors").is_file():
            lp_resume = (lp_dir / "latest.json").is_file()
            _phase(lp, model, lp_dir, batches, resume=lp_resume, desc="lp-ft: linear probe")
        model.load_state_dict(RunFolder(lp_dir, lp).weights(), strict=True)
        resume = resume and (out / "latest.json").is_file()  # the first phase may be all there is so far
    return _phase(cfg, model, out, batches, resume=resume, desc=f"finetune {t.strategy}")


def _length(cfg: RunConfig) -> str:
    t = cfg.transfer
    n = f"{cfg.train.steps} steps" if t.steps_rule == "fixed" else f"until the loss plateaus (≤ {cfg.train.steps} steps)"
    return f"{t.lp_steps} linear-probe steps, then {n}" if t.strategy == "lp-ft" else n


def _phase(cfg: RunConfig, model: SegmentationNet, out: Path, batches: StepBatches, resume: bool, desc: str) -> dict:
    """Freeze what ``cfg``'s strategy freezes (unfreezing the rest) and train with the one loop."""
    parts = frozen_parts(cfg.transfer.strategy, cfg.model.arch)
    model.requires_grad_(True)
    frozen = freeze(model, parts)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_train == 0:
        raise ConfigError(f"strategy {cfg.transfer.strategy!r} leaves nothing to train in this network")
    n_all = sum(p.numel() for p in model.parameters())
    print(f"{desc}: training {n_train / 1e6:.3f}M of {n_all / 1e6:.3f}M parameters"
          + (f" (frozen: {', '.join(parts)})" if parts else ""))
    optimizer = torch.optim.Adam(param_groups(model, cfg))
    stop = plateau_stop() if cfg.transfer.steps_rule == "plateau" else None
    return train(out, cfg, model, optimizer, segmentation_loss(cfg.transfer.ce_weight, cfg.data.ignore_index), batches, resume=resume,
                 desc=desc, frozen=frozen, stop=stop)
