"""``labeldiff pretrain``: a pretext task on unlabeled images, through the one loop."""
from __future__ import annotations

from pathlib import Path

import torch

from labeldiff.checkpoint import prepare_run_dir
from labeldiff.config import RunConfig
from labeldiff.corruption import Corruption, build_corruption
from labeldiff.data.datasets import StepBatches, unlabeled_samples
from labeldiff.models.unet import build_unet, check_model_config, size_multiple
from labeldiff.pretrain.loop import resolve_device, train


def pretext_loss(corruption: Corruption):
    """loss = f(model, corruption, batch): the network never knows which pretext task it serves."""

    def loss_fn(model: torch.nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
        c = corruption(batch["image"].cpu(), g)
        device = batch["image"].device
        c.input, c.t, c.target = c.input.to(device), c.t.to(device), c.target.to(device)
        if c.weight is not None:
            c.weight = c.weight.to(device)
        return corruption.loss(model(c.input, c.t), c)

    return loss_fn


def check_size(cfg: RunConfig) -> None:
    """Reject a network config or input size that cannot work, before any folder is written."""
    check_model_config(cfg.model)
    m = size_multiple(cfg.model)
    if cfg.data.size % m:
        raise ValueError(f"--size {cfg.data.size} is not a multiple of {m} (the UNet halves the resolution "
                         f"{len(cfg.model.channels) - 1} times); use --size {max(m, cfg.data.size // m * m)}")


def run_pretrain(cfg: RunConfig, out: Path, resume: bool = False, overwrite: bool = False) -> dict:
    cfg.kind = "pretrain"
    if cfg.model.in_channels != cfg.data.channels:
        cfg.model.in_channels = cfg.data.channels
    check_size(cfg)
    samples = unlabeled_samples(Path(cfg.data.path))  # validates before anything is written
    corruption = build_corruption(cfg.corruption)
    corruption.check_input_size(cfg.data.size)
    out = prepare_run_dir(Path(out), overwrite=overwrite, resume=resume)
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    model = build_unet(cfg.model, out_channels=corruption.out_channels(cfg.model.in_channels)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pretrain {cfg.corruption.method}: {len(samples)} images, UNet {n_params / 1e6:.2f}M parameters, "
          f"{cfg.train.steps} steps of batch {cfg.train.batch_size} at {cfg.data.size}² on {device}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    batches = StepBatches(samples, cfg.data, cfg.train.batch_size, cfg.train.seed, labeled=False)
    return train(out, cfg, model, optimizer, pretext_loss(corruption), batches, resume=resume,
                 desc=f"pretrain {cfg.corruption.method}")
