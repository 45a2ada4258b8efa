"""Synthetic (image, mask) pairs from a hybrid run, as extra training pairs for few-label fine-tuning.

``finetune --synthetic RUN:N`` adds N pairs sampled from the hybrid run ``RUN`` (Sauvalle & Salzmann
2024: the hybrid model is a generative model of image and mask together) to the k labeled images.

How they are mixed (:class:`labeldiff.data.datasets.StepBatches`): each slot of a training batch is
a synthetic pair with probability ``transfer.synthetic_fraction`` (default 0.5) and one of the k
real images otherwise, so the real images keep their share of every batch whatever N is (pooling
them uniformly would give one real image in 101 slots at k = 1, N = 100). Synthetic pairs go through
the same crop, flips and augmentation as real ones, and weigh the same in the loss.

Samples are cached in the hybrid run folder, ``RUN/synthetic/ddim50/chunk_XXXX.safetensors`` (16
pairs a chunk, chunk c drawn with seed c), so every study cell and every fine-tuning run that asks
for N pairs reads the same first N without resampling, and asking for more only samples the chunks
that are missing.

Who does what: :func:`ensure_synthetic` samples the missing chunks; the CLI's ``finetune`` and the
study call it before the fine-tuning, which reads the cache through
:meth:`labeldiff.runs.RunFolder.synthetic_pairs` (fine-tuning sits below sampling and does not draw).
"""
from __future__ import annotations

from pathlib import Path

import torch

from labeldiff.checkpoint import save_weights
from labeldiff.config import parse_synthetic
from labeldiff.distributed import launch_rank
from labeldiff.runs import SYNTHETIC_CHUNK, SYNTHETIC_SAMPLER, SYNTHETIC_STEPS, RunFolder


def ensure_synthetic(spec: str, device: torch.device | str = "cpu") -> Path:
    """Sample the chunks of ``spec`` (``RUN:N``) that are not cached yet; returns the cache folder.

    Under torchrun it is called before the process group exists: rank 0 samples, the other ranks
    return at once and wait for rank 0 when the fine-tuning joins the group, before reading."""
    run, n = parse_synthetic(spec)
    source = RunFolder.open(run, flag="--synthetic").require_hybrid("--synthetic")
    chunks = source.synthetic_chunks(n)
    missing = [c for c, path in enumerate(chunks) if not path.is_file()]
    if missing and launch_rank() == 0:
        sample_chunks(source, missing, chunks, device)
    return chunks[0].parent


def sample_chunks(source: RunFolder, which: list[int], paths: list[Path], device: torch.device | str) -> None:
    """Sample chunk c of ``which`` with seed c and write it to ``paths[c]`` (atomically)."""
    from labeldiff.sample.diffusion import sample, sample_masks

    model, cfg = source.pretext_network(device, flag="--synthetic"), source.config
    print(f"--synthetic: sampling {len(which) * SYNTHETIC_CHUNK} (image, mask) pairs from {source.path} "
          f"({SYNTHETIC_SAMPLER}, {SYNTHETIC_STEPS} steps; cached in {paths[0].parent})")
    for c in which:
        images = sample(model, cfg, n=SYNTHETIC_CHUNK, sampler=SYNTHETIC_SAMPLER, steps=SYNTHETIC_STEPS, seed=c,
                        batch_size=SYNTHETIC_CHUNK)
        masks = sample_masks(model, cfg, images, batch_size=SYNTHETIC_CHUNK)
        save_weights({"images": images.cpu().half(), "masks": masks.cpu().to(torch.uint8)}, paths[c],
                     metadata={"run": str(source.path), "sampler": SYNTHETIC_SAMPLER, "steps": str(SYNTHETIC_STEPS),
                               "seed": str(c)})
