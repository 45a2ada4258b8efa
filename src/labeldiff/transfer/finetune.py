"""``labeldiff finetune``: k labeled images, a pretrained backbone (or none), one loop.

Settings from the CT paper (Huang et al. 2025, Methods, "fine-tuning settings"): Adam, head
learning rate 10× the base, weight decay 1e-3 for the head and 1e-4 for the rest, loss
0.5·CE + 0.5·Dice, fixed timestep embedding t = 0.

Strategies (:data:`FROZEN`, the one mapping from strategy to frozen submodules):

- ``linear``: the whole backbone frozen, only the head trains (the CT paper's "linear classification");
- ``decoder``: the encoder half frozen (:data:`labeldiff.models.unet.ENCODER_PARTS`), decoder and head
  train (the CT paper's best strategy);
- ``full``: everything trains (vanilla fine-tuning of the hybrid and DDeP papers);
- ``scratch``: the identical network from random initialisation with the identical schedule;
- ``probe``: pixel-MLP ensemble on frozen features (:mod:`labeldiff.transfer.probe_run`), not this loop;
  :func:`labeldiff.transfer.run.run_transfer` dispatches every strategy.

The new head reads the last decoder features; with ``transfer.keep_out_norm`` the pretrained final
GroupNorm + SiLU of the diffusion UNet (``out.0``) stay in front of it.

Frozen modules have ``requires_grad=False``, are left out of the optimiser and are kept in
``eval()`` (BatchNorm statistics do not move).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from monai.losses import DiceCELoss

from labeldiff.checkpoint import atomic_write_text, prepare_run_dir
from labeldiff.config import RunConfig
from labeldiff.data.datasets import StepBatches
from labeldiff.models.unet import ENCODER_PARTS, SegmentationNet, check_input_size, load_backbone_strict
from labeldiff.pretrain.loop import train
from labeldiff.runs import RunFolder
from labeldiff.runtime import resolve_device
from labeldiff.transfer.labeled import prepare_transfer

STRATEGIES = ("linear", "decoder", "full", "scratch")  # + "probe" (labeldiff.transfer.probe_run)


def frozen_parts(strategy: str, arch: str) -> tuple[str, ...]:
    """Submodule names of a :class:`SegmentationNet` that ``strategy`` keeps frozen."""
    if strategy == "linear":
        return ("backbone",)
    if strategy == "decoder":
        return tuple(f"backbone.{name}" for name in ENCODER_PARTS[arch])
    if strategy in ("full", "scratch"):
        return ()
    raise ValueError(f"strategy {strategy!r} is unknown; available: {', '.join(STRATEGIES)}, probe")


def freeze(model: torch.nn.Module, parts: tuple[str, ...]) -> list[torch.nn.Module]:
    """``requires_grad_(False)`` on the named submodules; returns them (the loop keeps them in eval())."""
    modules = [model.get_submodule(name) for name in parts]
    for m in modules:
        m.requires_grad_(False)
    return modules


def segmentation_loss(ce_weight: float):
    """0.5·CE + 0.5·Dice (softmax over K classes, background included) via MONAI's DiceCELoss."""
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=ce_weight, lambda_dice=1.0 - ce_weight)

    def loss_fn(model: torch.nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
        logits = model(batch["image"]).float()
        return dice_ce(logits, batch["mask"][:, None])

    return loss_fn


def build_segmenter(cfg: RunConfig, num_classes: int, pre: RunFolder | None) -> tuple[SegmentationNet, dict | None]:
    """The SegmentationNet of ``cfg``, its backbone loaded strictly from ``pre`` unless scratch."""
    t = cfg.transfer
    model = SegmentationNet(cfg.model, num_classes, t=t.t, head_hidden=t.head_hidden, keep_out_norm=t.keep_out_norm)
    if t.strategy == "scratch":
        return model, None
    return model, load_backbone_strict(model, pre.weights())


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


def run_finetune(cfg: RunConfig, out: Path, stems: list[str] | None = None, resume: bool = False,
                 overwrite: bool = False, explicit: Iterable[str] = ()) -> dict:
    """Fine-tune (or train from scratch) on ``stems`` or ``transfer.labels`` drawn images (see
    :func:`labeldiff.transfer.labeled.prepare_transfer`); everything is written into ``out``."""
    t = cfg.transfer
    if t.strategy == "probe":
        raise ValueError("the probe trains pixel MLPs, not this network: use labeldiff.transfer.run.run_transfer "
                         "(`labeldiff finetune --strategy probe`)")
    if t.strategy not in STRATEGIES:
        raise ValueError(f"strategy {t.strategy!r} is unknown; available: {', '.join(STRATEGIES)}, probe")
    job = prepare_transfer(cfg, stems, explicit)
    check_input_size(cfg.model, cfg.data.size)
    out = prepare_run_dir(Path(out), overwrite=overwrite, resume=resume)
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    model, report = build_segmenter(cfg, job.num_classes, job.pre)
    frozen = freeze(model, frozen_parts(t.strategy, cfg.model.arch))
    model.to(device)
    if report is not None:
        print(f"loaded {len(report['loaded'])} backbone tensors from {t.pretrained}; "
              f"skipped (pretext output layer): {', '.join(report['skipped'])}; "
              f"new (random init): {', '.join(report['new'])}")
    atomic_write_text(out / "labeled.json", json.dumps({"split": cfg.data.train_split, "stems": job.stems,
                                                         "seed": cfg.train.seed, "load_report": report}, indent=2))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"finetune ({t.strategy}): {len(job.stems)} labeled images {job.stems}, K={job.num_classes}, "
          f"{cfg.train.steps} steps on {device}; training {n_train / 1e6:.3f}M of {n_all / 1e6:.3f}M parameters"
          + (f" (frozen: {', '.join(frozen_parts(t.strategy, cfg.model.arch))})" if frozen else ""))
    optimizer = torch.optim.Adam(param_groups(model, cfg))
    batches = StepBatches(job.ds.samples(job.stems), cfg.data, cfg.train.batch_size, cfg.train.seed,
                          labeled=True, num_classes=job.num_classes)
    return train(out, cfg, model, optimizer, segmentation_loss(t.ce_weight), batches, resume=resume,
                 desc=f"finetune {t.strategy}", frozen=frozen)
