"""Reverse diffusion with MONAI's schedulers: ancestral DDPM (T steps) or DDIM (fewer steps).

Works for any pretraining run whose corruption is Gaussian noise (``ddpm``), with ε or x₀
targets, and for hybrid runs, which are generative models of (image, mask) pairs (Sauvalle &
Salzmann 2024, Proposition 1): the reverse process runs on the image channels, and the mask of the
final image is the mask channels' estimate at t = 0 (:func:`sample_masks`). The scheduler is built
from the run's own ``config.json`` (the network comes from :meth:`labeldiff.runs.RunFolder.pretext_network`).
Noise is drawn on the network's device by a generator on that device.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler
from tqdm.auto import tqdm

from labeldiff.config import RunConfig
from labeldiff.corruption import build_corruption
from labeldiff.corruption.gaussian import MONAI_SCHEDULES, GaussianNoise, make_scheduler
from labeldiff.corruption.labeled import HybridDiffusion
from labeldiff.runtime import INFERENCE_PRECISION, autocast, generator, randn, resolve_precision
from labeldiff.errors import ConfigError, RunFolderError


def make_sampler(cfg: RunConfig, sampler: str, steps: int | None):
    c = cfg.corruption
    if sampler == "ddpm":
        sched = make_scheduler(c)
        sched.set_timesteps(steps or c.num_timesteps)
        return sched
    if sampler == "ddim":
        kwargs = {"beta_start": c.beta_start, "beta_end": c.beta_end} if c.schedule == "linear" else {}
        sched = DDIMScheduler(num_train_timesteps=c.num_timesteps, schedule=MONAI_SCHEDULES[c.schedule],
                              prediction_type=c.prediction, **kwargs)
        sched.set_timesteps(steps or 50)
        return sched
    raise ConfigError(f"sampler {sampler!r} is unknown; use ddpm or ddim")


@torch.no_grad()
def sample(model: torch.nn.Module, cfg: RunConfig, n: int, sampler: str = "ddim", steps: int | None = None,
           seed: int = 0, batch_size: int = 16, precision: str = INFERENCE_PRECISION) -> torch.Tensor:
    """Draw ``n`` images ``[n, C, S, S]`` in [-1, 1] from pure noise by the reverse process, on the
    model's device."""
    corruption = build_corruption(cfg.corruption)
    if not isinstance(corruption, (GaussianNoise, HybridDiffusion)):
        raise RunFolderError(f"run was pretrained with {cfg.corruption.method!r}, which is not a diffusion model; "
                         f"sampling needs a ddpm or hybrid run")
    device = next(model.parameters()).device
    dtype = resolve_precision(precision, device)
    g = generator(seed, device)
    # MONAI's DDPM step draws its noise on the samples' device: it can take g only when g lives there
    step_g = g if g.device.type == device.type else None
    s, ch = cfg.data.size, cfg.model.in_channels
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        sched = make_sampler(cfg, sampler, steps)
        x = randn((b, ch, s, s), g, device)
        for t in tqdm(sched.timesteps, desc=f"{sampler} sampling {start + b}/{n}", leave=False):
            tt = torch.full((b,), int(t), dtype=torch.long, device=device)
            with autocast(device, dtype):
                pred = model(x, tt)[:, :ch].float()  # hybrid: the image channels
            x, _ = sched.step(pred, int(t), x, generator=step_g) if sampler == "ddpm" else sched.step(pred, int(t), x)
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


@torch.no_grad()
def sample_masks(model: torch.nn.Module, cfg: RunConfig, images: torch.Tensor, batch_size: int = 16,
                 precision: str = INFERENCE_PRECISION) -> torch.Tensor:
    """Masks ``[n, S, S]`` of sampled images from a hybrid run: argmax of the mask channels at t = 0,
    on the model's device."""
    if cfg.corruption.method != "hybrid":
        raise RunFolderError(f"only hybrid runs generate masks; this run is {cfg.corruption.method!r}")
    device = next(model.parameters()).device
    dtype = resolve_precision(precision, device)
    ch = cfg.model.in_channels
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        t = torch.zeros(len(x), dtype=torch.long, device=device)
        with autocast(device, dtype):
            logits = model(x, t)[:, ch:].float()
        out.append(logits.argmax(1))
    return torch.cat(out)


def save_samples(images: torch.Tensor, out: Path, title: str = "", masks: torch.Tensor | None = None,
                 num_classes: int | None = None) -> Path:
    """Write ``sample_XXX.png`` per image (and ``mask_XXX.png``, the class ids as a palette PNG of
    ``num_classes`` colours, :func:`~labeldiff.data.io.write_mask`) and ``grid.png``.

    With masks, each grid tile is the image next to its mask overlaid on it.
    """
    from labeldiff.data.io import write_mask
    from labeldiff.evaluate.report import overlay, save_png, to_rgb

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, masks = images.cpu(), masks.cpu() if masks is not None else None
    pics = [to_rgb(x.numpy()) for x in images]
    for i, p in enumerate(pics):
        save_png(p, out / f"sample_{i:03d}.png")
    if masks is not None:
        k = num_classes or int(masks.max()) + 1
        for i, m in enumerate(masks):
            write_mask(m.numpy(), out / f"mask_{i:03d}.png", k)
        pics = [np.concatenate([p, np.full((p.shape[0], 1, 3), 255, np.uint8), overlay(x.numpy(), m.numpy())], axis=1)
                for p, x, m in zip(pics, images, masks)]
    cols = int(np.ceil(np.sqrt(len(pics))))
    rows = int(np.ceil(len(pics) / cols))
    h, w = pics[0].shape[:2]
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, dtype=np.uint8)
    for i, p in enumerate(pics):
        r, c = divmod(i, cols)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = p
    save_png(grid, out / "grid.png")
    return out / "grid.png"


PREVIEW_STEPS = 50  # DDIM steps of a preview: a look at the samples, not their best quality


def preview_hook(out: Path, n: int):
    """``at_checkpoint`` of a generative pretraining (``--preview-samples N``): N images drawn with the weights
    just saved (DDIM, :data:`PREVIEW_STEPS` steps, seed 0: the same noise at every checkpoint, so the grids
    compare) into ``out/previews/step-S.png`` (hybrid: each image beside its mask). The network is rebuilt
    from ``out/config.json``, which the run writes before its first step."""
    import shutil
    import tempfile

    from labeldiff.models.unet import build_network
    from labeldiff.runs import RunFolder

    def draw(step: int, weights: dict) -> None:
        cfg = RunFolder.open(out).config
        corruption = build_corruption(cfg.corruption)
        net = build_network(cfg.model, out_channels=corruption.out_channels(cfg.model.in_channels, cfg.num_classes))
        net.load_state_dict(weights, strict=True)
        net = net.to(next(iter(weights.values())).device).eval()
        images = sample(net, cfg, n, "ddim", PREVIEW_STEPS, seed=0)
        masks = sample_masks(net, cfg, images) if cfg.corruption.method == "hybrid" else None
        with tempfile.TemporaryDirectory() as tmp:
            save_samples(images, Path(tmp), masks=masks, num_classes=cfg.num_classes)
            (Path(out) / "previews").mkdir(exist_ok=True)
            shutil.copy(Path(tmp) / "grid.png", Path(out) / "previews" / f"step-{step}.png")
    return draw
