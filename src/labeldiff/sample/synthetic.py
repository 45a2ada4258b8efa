"""Synthetic (image, mask) pairs from a hybrid run, as extra training pairs for few-label fine-tuning.

``finetune --synthetic RUN:N`` adds N pairs sampled from the hybrid run ``RUN`` (Sauvalle & Salzmann
2024: the hybrid model is a generative model of image and mask together) to the k labeled images.

How they are mixed (:class:`labeldiff.data.datasets.StepBatches`): each slot of a training batch is
a synthetic pair with probability ``transfer.synthetic_fraction`` (default 0.5) and one of the k
real images otherwise, so the real images keep their share of every batch whatever N is (pooling
them uniformly would give one real image in 101 slots at k = 1, N = 100). Synthetic pairs go through
the same crop, flips and augmentation as real ones, and weigh the same in the loss.

Samples are cached in the hybrid run folder, ``RUN/synthetic/<sampler><steps>/chunk_XXXX.safetensors``
(16 pairs a chunk, chunk c drawn with seed c), so every study cell and every fine-tuning run that
asks for N pairs reads the same first N without resampling, and asking for more only samples the
chunks that are missing.
"""
from __future__ import annotations

from pathlib import Path

import torch

from labeldiff import distributed
from labeldiff.checkpoint import load_weights, save_weights
from labeldiff.config import RunConfig
from labeldiff.data.io import DataError

CHUNK = 16  # pairs per cache file (and per sampling batch)
SAMPLER, SAMPLER_STEPS = "ddim", 50  # DDIM with 50 steps: the `labeldiff sample` default


def parse_synthetic(spec: str) -> tuple[Path, int]:
    """``"RUN:N"`` → (run folder, N ≥ 1), with an error that shows the form."""
    run, sep, n = str(spec).rpartition(":")
    if not sep or not run or not n.strip().isdigit() or int(n) < 1:
        raise ValueError(f"--synthetic {spec!r}: give RUN:N, a hybrid run folder and how many pairs to add, "
                         f"e.g. --synthetic runs/hybrid:100")
    return Path(run), int(n)


def check_source(run_cfg: RunConfig, run: Path, target: RunConfig, num_classes: int) -> None:
    """The hybrid run must generate what the fine-tuning trains on: same side, channels and classes."""
    if run_cfg.corruption.method != "hybrid":
        raise ValueError(f"--synthetic {run}: only hybrid runs sample (image, mask) pairs; this run was pretrained "
                         f"with {run_cfg.corruption.method!r} (pretrain one with --method hybrid on a labeled set)")
    got = (run_cfg.data.size, run_cfg.model.in_channels, run_cfg.num_classes)
    want = (target.data.size, target.data.channels, num_classes)
    if got != want:
        raise DataError(f"--synthetic {run} samples {got[0]}² images with {got[1]} channels and {got[2]} classes, "
                        f"but this fine-tuning trains on {want[0]}² with {want[1]} channels and {want[2]} classes; "
                        f"pretrain the hybrid run with the target's --size, --channels and classes")


def synthetic_pairs(spec: str, target: RunConfig, num_classes: int, device: torch.device | str = "cpu"
                    ) -> tuple[torch.Tensor, torch.Tensor, Path]:
    """The first N pairs of the hybrid run of ``spec`` (``RUN:N``): images ``[N, C, S, S]`` float32 in
    [-1, 1], masks ``[N, S, S]`` int64, and the cache folder. Missing chunks are sampled (by rank 0
    under torchrun; the others wait and read them)."""
    from labeldiff.runs import RunFolder

    run, n = parse_synthetic(spec)
    source = RunFolder.open(run, flag="--synthetic").require_pretrain("--synthetic")
    check_source(source.config, run, target, num_classes)
    cache = Path(run) / "synthetic" / f"{SAMPLER}{SAMPLER_STEPS}"
    chunks = [cache / f"chunk_{c:04d}.safetensors" for c in range((n + CHUNK - 1) // CHUNK)]
    missing = [c for c, path in enumerate(chunks) if not path.is_file()]
    if missing and distributed.is_main():
        sample_chunks(source, missing, chunks, device)
    distributed.barrier()
    parts = [load_weights(path) for path in chunks]
    images = torch.cat([p["images"] for p in parts])[:n].float()
    masks = torch.cat([p["masks"] for p in parts])[:n].long()
    return images, masks, cache


def sample_chunks(source, which: list[int], paths: list[Path], device: torch.device | str) -> None:
    """Sample chunk c of ``which`` with seed c and write it to ``paths[c]`` (atomically)."""
    from labeldiff.sample.diffusion import sample, sample_masks

    model, cfg = source.pretext_network(device, flag="--synthetic"), source.config
    print(f"--synthetic: sampling {len(which) * CHUNK} (image, mask) pairs from {source.path} "
          f"({SAMPLER}, {SAMPLER_STEPS} steps; cached in {paths[0].parent})")
    for c in which:
        images = sample(model, cfg, n=CHUNK, sampler=SAMPLER, steps=SAMPLER_STEPS, seed=c, batch_size=CHUNK)
        masks = sample_masks(model, cfg, images, batch_size=CHUNK)
        save_weights({"images": images.cpu().half(), "masks": masks.cpu().to(torch.uint8)}, paths[c],
                     metadata={"run": str(source.path), "sampler": SAMPLER, "steps": str(SAMPLER_STEPS), "seed": str(c)})
