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
- ``probe``: pixel-MLP ensemble on frozen features (:mod:`labeldiff.transfer.probe`), not this loop.

Frozen modules have ``requires_grad=False``, are left out of the optimiser and are kept in
``eval()`` (BatchNorm statistics do not move).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from monai.losses import DiceCELoss

from labeldiff.checkpoint import atomic_write_text, load_weights, prepare_run_dir
from labeldiff.config import RunConfig, load_run_config
from labeldiff.data.datasets import LabeledFolder, StepBatches, select_subset, validate_samples
from labeldiff.models.unet import ENCODER_PARTS, DirectSegmenter, SegmentationNet, load_backbone_strict
from labeldiff.pretrain.loop import resolve_device, train
from labeldiff.pretrain.run import check_size

STRATEGIES = ("linear", "decoder", "full", "scratch")  # + "probe" (labeldiff.transfer.probe)


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


def inherit_pretrained(cfg: RunConfig) -> RunConfig | None:
    """Copy the network and input settings of the pretrained run into ``cfg`` (network must match)."""
    if not cfg.transfer.pretrained:
        return None
    pre = load_run_config(cfg.transfer.pretrained, "pretrain", flag="--pretrained")
    cfg.model = pre.model
    cfg.data.channels = pre.data.channels
    return pre


def build_segmenter(cfg: RunConfig, num_classes: int) -> tuple[SegmentationNet, dict[str, list[str]] | None]:
    model = SegmentationNet(cfg.model, num_classes, t=cfg.transfer.t, head_hidden=cfg.transfer.head_hidden)
    report = None
    if cfg.transfer.strategy != "scratch":
        if not cfg.transfer.pretrained:
            raise ValueError(f"strategy {cfg.transfer.strategy!r} needs --pretrained RUN_DIR (or use --from-scratch)")
        state = load_weights(Path(cfg.transfer.pretrained) / "model.safetensors")
        report = load_backbone_strict(model, state)
    return model, report


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


def run_finetune(cfg: RunConfig, out: Path, resume: bool = False, overwrite: bool = False) -> dict:
    cfg.kind = "segmentation"
    t = cfg.transfer
    if t.strategy == "probe":
        raise ValueError("the probe strategy trains pixel MLPs, not this network: use `labeldiff finetune "
                         "--strategy probe` (the CLI routes it) or labeldiff.transfer.probe_run.run_probe")
    if t.strategy not in STRATEGIES:
        raise ValueError(f"strategy {t.strategy!r} is unknown; available: {', '.join(STRATEGIES)}, probe")
    inherit_pretrained(cfg)
    cfg.model.in_channels = cfg.data.channels
    check_size(cfg)
    ds = LabeledFolder(Path(cfg.data.path), cfg.data.split_file)
    train_stems = ds.stems(cfg.data.train_split)
    chosen = select_subset(train_stems, t.labels, cfg.train.seed, cfg.data.train_split)
    num_classes = validate_samples(ds.samples(train_stems), cfg.data.num_classes)
    cfg.num_classes = num_classes
    out = prepare_run_dir(Path(out), overwrite=overwrite, resume=resume)
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    model, report = build_segmenter(cfg, num_classes)
    frozen = freeze(model, frozen_parts(t.strategy, cfg.model.arch))
    model.to(device)
    if report is not None:
        print(f"loaded {len(report['loaded'])} backbone tensors from {t.pretrained}; "
              f"skipped (pretext output layer): {', '.join(report['skipped'])}; "
              f"new (random init): {', '.join(report['new'])}")
    atomic_write_text(out / "labeled.json", json.dumps({"split": cfg.data.train_split, "stems": chosen,
                                                         "seed": cfg.train.seed, "load_report": report}, indent=2))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"finetune ({t.strategy}): {len(chosen)} labeled images {chosen}, K={num_classes}, "
          f"{cfg.train.steps} steps on {device}; training {n_train / 1e6:.3f}M of {n_all / 1e6:.3f}M parameters"
          + (f" (frozen: {', '.join(frozen_parts(t.strategy, cfg.model.arch))})" if frozen else ""))
    optimizer = torch.optim.Adam(param_groups(model, cfg))
    batches = StepBatches(ds.samples(chosen), cfg.data, cfg.train.batch_size, cfg.train.seed,
                          labeled=True, num_classes=num_classes)
    return train(out, cfg, model, optimizer, segmentation_loss(t.ce_weight), batches, resume=resume,
                 desc=f"finetune {t.strategy}", frozen=frozen)


DIRECT_SEGMENTERS = ("hybrid", "supervised")  # pretraining runs that segment without fine-tuning


def load_segmenter(run_dir: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, RunConfig]:
    """Rebuild a segmenter from its run folder alone (config.json + model.safetensors).

    A fine-tuned run gives its :class:`SegmentationNet`; a hybrid or supervised *pretraining* run is a
    segmenter as it is (the mask channels at t = 0, :class:`DirectSegmenter`).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {run_dir}: no config.json there; point it at a `labeldiff finetune` run "
                                f"folder (or a hybrid / supervised `labeldiff pretrain` run)")
    cfg = RunConfig.load(run_dir / "config.json")
    if cfg.kind == "pretrain":
        if cfg.corruption.method not in DIRECT_SEGMENTERS:
            raise ValueError(f"--model {run_dir} is a {cfg.corruption.method!r} pretraining run, which does not "
                             f"predict masks; fine-tune it first (`labeldiff finetune --pretrained {run_dir}`)")
        from labeldiff.sample.diffusion import load_pretrained

        net, cfg = load_pretrained(run_dir, device)
        first = cfg.model.in_channels if cfg.corruption.method == "hybrid" else 0
        return DirectSegmenter(net, first_channel=first, t=0).to(device).eval(), cfg
    cfg = load_run_config(run_dir, "segmentation")
    if cfg.transfer.strategy == "probe":
        from labeldiff.transfer.probe_run import load_probe_segmenter

        return load_probe_segmenter(run_dir, cfg, device), cfg
    model = SegmentationNet(cfg.model, cfg.num_classes, t=cfg.transfer.t, head_hidden=cfg.transfer.head_hidden)
    model.load_state_dict(load_weights(run_dir / "model.safetensors"), strict=True)
    return model.to(device).eval(), cfg
