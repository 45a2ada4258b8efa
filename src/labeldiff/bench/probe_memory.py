"""Benchmarks. ``bench_probe_memory``: the pixel-MLP probe trained the reference way (every labeled
pixel's features in one float32 matrix in RAM, yandex-research/ddpm-segmentation) and the streamed way
(:func:`labeldiff.transfer.probe.train_probe`: float16 disk cache, plain file reads), each in its own
fresh process so that the memory of each is measured alone.

Memory is read from ``/proc/self/status`` in the child. ``VmHWM`` is the high-water RSS of the
child's own address space. ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is *not* used on Linux: a
freshly spawned Python child inherits the parent's peak there (``execve`` folds the pre-exec address
space — the parent's, after ``vfork`` — into ``ru_maxrss``), so a child started from a 1.5 GB parent
reports 1.5 GB even if it never uses more than 30 MB; it is the fallback where ``/proc`` is absent.
Two things make the numbers reproducible to about 1 MB (without them the same job's peak varies by
±15 MB from run to run): the child runs with a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``,
so freed large buffers go back to the system at once instead of staying in the heap under glibc's
sliding threshold), and it first warms up (one image through the extractor, a one-step probe, one
prediction), then resets its high-water mark (``/proc/self/clear_refs``) and measures the training
alone: ``train_rss_mb``.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from labeldiff.data.datasets import ScaledImages
from labeldiff.data.folders import Sample
from labeldiff.evaluate.metrics import confusion_stats, summarize
from labeldiff.models.probe import FeatureExtractor, FeatureSpec
from labeldiff.transfer.probe import fit_pixels, materialized_train_probe, predict_probe, train_probe

APPROACHES = ("materialized", "streamed")


def _status_mb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` in MB, or None without ``/proc``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (VmHWM; ``ru_maxrss`` without ``/proc``)."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, kB elsewhere


def reset_peak_rss() -> bool:
    """Set this process's high-water RSS to its current RSS (Linux ≥ 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class LazyImages(Sequence):
    """Images (or masks) of ``samples`` read on access through ``loader`` (build it with
    ``cache_mb=0`` so nothing is kept): the raw labeled images never sit in RAM together."""

    def __init__(self, samples: list[Sample], loader: ScaledImages, kind: str = "image",
                 num_classes: int | None = None):
        if kind not in ("image", "mask"):
            raise ValueError(f"kind must be 'image' or 'mask', got {kind!r}")
        self.samples, self.loader, self.kind, self.num_classes = samples, loader, kind, num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> torch.Tensor:
        s = self.samples[i]
        return self.loader.image(s) if self.kind == "image" else self.loader.mask(s, self.num_classes)


def _warm_up(extractor: FeatureExtractor, image: torch.Tensor, mask: torch.Tensor, num_classes: int) -> None:
    """Run every code path once on one image, so that lazily initialised state is not measured."""
    rows = extractor(image[None])[0].reshape(extractor.num_features, -1).T[:2048]
    ensemble = fit_pixels(rows, mask.reshape(-1)[:2048], num_classes, members=1, max_epochs=1, progress=False)
    predict_probe(extractor, ensemble, image)


def probe_job(approach: str, unet: torch.nn.Module, spec: FeatureSpec, scheduler, noise_seed: int,
              images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], test_images: Sequence[torch.Tensor],
              test_masks: Sequence[torch.Tensor], num_classes: int, seed: int, train: dict,
              threads: int = 1) -> dict:
    """Train and evaluate one probe in *this* process and report its memory (run it in a child).

    ``train``: keyword arguments of the trainer (members, batch_pixels, max_epochs, patience, …).
    Returns, in MB: ``peak_rss_mb`` (the whole process's peak up to the end of training),
    ``start_rss_mb`` (RSS after imports, the UNet and the warm-up) and ``train_rss_mb`` (peak RSS
    during training above ``start_rss_mb``: what the probe itself costs); ``train_seconds``
    (features + fitting); ``iou`` (foreground classes) and ``miou`` (all classes incl. background),
    per image then averaged (``evaluate.metrics``) on the test images.
    """
    if approach not in APPROACHES:
        raise ValueError(f"approach {approach!r} is unknown; use one of {APPROACHES}")
    torch.set_num_threads(threads)
    extractor = FeatureExtractor(unet, spec, scheduler, noise_seed)
    _warm_up(extractor, images[0], masks[0], num_classes)
    gc.collect()
    peak_before = peak_rss_mb()
    reset = reset_peak_rss()
    start = _status_mb("VmRSS") or peak_before
    trainer = train_probe if approach == "streamed" else materialized_train_probe
    t0 = time.perf_counter()
    ensemble = trainer(extractor, images, masks, num_classes, seed=seed, **train)
    train_seconds = time.perf_counter() - t0
    peak_train = peak_rss_mb()
    stats = [confusion_stats(predict_probe(extractor, ensemble, test_images[i])[0].numpy(),
                             test_masks[i].numpy(), num_classes) for i in range(len(test_images))]
    summary = summarize(np.stack(stats))
    return {"approach": approach, "peak_rss_mb": max(peak_before, peak_train), "start_rss_mb": start,
            "train_rss_mb": peak_train - start if reset else float("nan"),
            "train_seconds": train_seconds, "iou": summary["iou"]["mean"],
            "miou": summary["iou"]["mean_with_background"],
            "epochs": [len(h) for h in ensemble.history]}


CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}  # glibc: a fixed threshold (see the module docstring)


@contextmanager
def environment(**env: str):
    """Set environment variables for processes started inside the ``with`` body (restored after)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_in_child(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh spawned Python process with :data:`CHILD_ENV` (arguments
    and result are pickled between this process and its own child; nothing is read from disk)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as ex:
        with environment(**CHILD_ENV):
            future = ex.submit(fn, *args, **kwargs)  # the worker process starts here
        return future.result()


def bench_probe_memory(pretrained_unet: torch.nn.Module, images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                       test_images: Sequence[torch.Tensor], test_masks: Sequence[torch.Tensor], spec: FeatureSpec,
                       scheduler, num_classes: int, seed: int, members: int = 10, batch_pixels: int = 1024,
                       max_epochs: int = 50, patience: int = 3, noise_seed: int = 0, threads: int = 1,
                       approaches: tuple[str, ...] = APPROACHES) -> dict:
    """Run each approach in its own child process on the same images, features and seed.

    Returns ``{"materialized": {...}, "streamed": {...}, "rss_ratio", "train_rss_ratio", "n_images",
    "n_pixels", "num_features", "matrix_mb", "cache_mb"}``: per approach the dict of :func:`probe_job`;
    ``rss_ratio`` = materialized / streamed whole-process peak, ``train_rss_ratio`` the same for
    the memory used by training alone (``train_rss_mb``); ``matrix_mb`` the float32 feature matrix of
    the reference, ``cache_mb`` the float16 disk cache of the streamed trainer.
    """
    num_features = FeatureExtractor(pretrained_unet, spec, scheduler, noise_seed).num_features
    n_pixels = sum(int(masks[i].numel()) for i in range(len(masks)))
    train = {"members": members, "batch_pixels": batch_pixels, "max_epochs": max_epochs, "patience": patience,
             "progress": False}
    out: dict = {"n_images": len(images), "n_pixels": n_pixels, "num_features": num_features,
                 "matrix_mb": n_pixels * num_features * 4 / 2**20,
                 "cache_mb": n_pixels * (num_features * 2 + 2) / 2**20}
    for approach in approaches:
        out[approach] = run_in_child(probe_job, approach, pretrained_unet, spec, scheduler, noise_seed, images,
                                     masks, test_images, test_masks, num_classes, seed, train, threads)
    if all(a in out for a in APPROACHES):
        mat, streamed = out["materialized"], out["streamed"]
        out["rss_ratio"] = mat["peak_rss_mb"] / streamed["peak_rss_mb"]
        out["train_rss_ratio"] = mat["train_rss_mb"] / max(streamed["train_rss_mb"], 1.0)
    return out


def format_probe_memory(result: dict, title: str = "") -> str:
    """The result of :func:`bench_probe_memory` as a small text table."""
    lines = [title] if title else []
    lines.append(f"{result['n_images']} labeled images, {result['n_pixels']} pixels × {result['num_features']} "
                 f"features: float32 matrix {result['matrix_mb']:.1f} MB, float16 disk cache {result['cache_mb']:.1f} MB")
    lines.append(f"{'approach':<14}{'peak RSS MB':>12}{'training MB':>12}{'time s':>8}{'IoU fg':>8}{'mIoU':>7}"
                 f"  epochs")
    for a in APPROACHES:
        if a in result:
            r = result[a]
            lines.append(f"{a:<14}{r['peak_rss_mb']:>12.1f}{r['train_rss_mb']:>12.1f}{r['train_seconds']:>8.1f}"
                         f"{r['iou']:>8.3f}{r['miou']:>7.3f}  {r['epochs']}")
    lines.append("peak RSS: whole process; training MB: peak RSS while training above the RSS before it")
    if "rss_ratio" in result:
        lines.append(f"materialized / streamed: peak RSS {result['rss_ratio']:.2f}, "
                     f"training memory {result['train_rss_ratio']:.2f}")
    return "\n".join(lines)


def bench_probe_memory_cli(pretrained_run: str, data: str, labels: int, seed: int, size: int, members: int = 10,
                           batch_pixels: int = 1024, max_epochs: int = 50, patience: int = 3,
                           num_classes: int | None = None, train_split: str = "train", test_split: str = "test",
                           noise_seed: int = 0, threads: int = 1, approaches: tuple[str, ...] = APPROACHES) -> dict:
    """``labeldiff bench probe-memory``: a pretraining run folder + a labeled dataset → printed table.

    ``labels`` images of ``train_split`` are chosen by ``seed`` (as in fine-tuning); every image
    and mask is resized to ``size``² and read lazily; evaluation on ``test_split`` at ``size``².
    Features: :func:`labeldiff.models.probe.default_spec` for the run's pretext method.
    """
    from labeldiff.config import DataConfig
    from labeldiff.data.folders import LabeledFolder
    from labeldiff.data.splits import select_subset
    from labeldiff.data.validation import validate_samples
    from labeldiff.models.probe import make_extractor
    from labeldiff.models.unet import size_multiple
    from labeldiff.runs import RunFolder

    run = RunFolder.open(pretrained_run, flag="--pretrained").require_pretrain()
    unet, cfg = run.backbone(), run.config
    if size % size_multiple(cfg.model):
        raise ValueError(f"--size {size} is not a multiple of {size_multiple(cfg.model)} (the UNet's downsampling)")
    ds = LabeledFolder(Path(data))
    train_stems = ds.stems(train_split)
    chosen = ds.samples(select_subset(train_stems, labels, seed, train_split))
    tests = ds.samples(ds.stems(test_split))
    k = validate_samples(chosen + tests, num_classes)
    loader = ScaledImages(DataConfig(path=data, size=size, mode="resize", channels=cfg.data.channels, cache_mb=0))
    extractor = make_extractor(unet, cfg, noise_seed=noise_seed)
    result = bench_probe_memory(unet, LazyImages(chosen, loader), LazyImages(chosen, loader, "mask", k),
                                LazyImages(tests, loader), LazyImages(tests, loader, "mask", k), extractor.spec,
                                extractor.scheduler, k, seed, members=members, batch_pixels=batch_pixels,
                                max_epochs=max_epochs, patience=patience, noise_seed=noise_seed, threads=threads,
                                approaches=approaches)
    spec = extractor.spec
    print(format_probe_memory(result, f"probe memory: {pretrained_run} ({cfg.corruption.method}, up blocks "
                                      f"{list(spec.blocks)}, t {list(spec.timesteps)}) on {data}, {size}², "
                                      f"{members} members, seed {seed}, {len(tests)} test images"))
    return result
