"""``labeldiff finetune --strategy probe``: a pixel-MLP ensemble on a frozen pretrained UNet.

The run folder is self-contained: ``config.json`` (with the resolved feature spec), the frozen UNet
without its pretext output layer (``backbone.safetensors``), the ensemble (``probe.safetensors`` +
``probe.json``) and ``labeled.json`` (the chosen images, and the feature selection table when
``--features auto``). :meth:`labeldiff.runs.RunFolder.segmenter` turns it back into a
:class:`~labeldiff.models.probe.ProbeSegmenter`, a ``model(x) -> scores`` module,
so ``evaluate`` and ``predict`` treat it like any other segmenter.

Training images are the labeled images brought to the network's scale (``--scale`` in crop mode,
``--size``² in resize mode), whole, reflect-padded to a multiple of the UNet's downsampling factor;
prediction sees whole images the same way (no sliding window: the features of a window would differ
from those of the whole image the probe was trained on).

Under ``torchrun --nproc-per-node N`` rank r computes the features of images r, r + N, … and trains
members r, r + N, …; they meet in the run folder's ``probe-cache/`` and rank 0 writes the run. Each
member is trained exactly as one process trains it (its seed, its batches), so the ensemble is the
one-process ensemble.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from labeldiff import distributed
from labeldiff.checkpoint import atomic_write_text, prepare_run_dir, release_run_dir, save_weights
from labeldiff.config import RunConfig
from labeldiff.errors import ConfigError
from labeldiff.resolve import describe
from labeldiff.data import provenance
from labeldiff.data.datasets import ScaledImages
from labeldiff.models.probe import (PROBE_METHODS, PaddedExtractor, default_spec, format_spec, make_extractor,
                                    parse_spec, save_probe)
from labeldiff.models.unet import PRETEXT_OUTPUT
from labeldiff.runs import BACKBONE_FILE
from labeldiff.runtime import resolve_device, threads_summary
from labeldiff.transfer.labeled import prepare_transfer
from labeldiff.transfer.probe import train_probe

NAMED_FEATURES = ("default", "mdm-medical", "auto")  # transfer.features besides 'blocks=…;t=…'
PROBE_CACHE = "probe-cache"  # under torchrun: the features and members the ranks share, removed at the end


def run_probe(cfg: RunConfig, out: Path, stems: list[str] | None = None, overwrite: bool = False) -> dict:
    """Train the probe on ``stems`` or ``transfer.labels`` drawn images into the run folder ``out``."""
    t0 = time.time()
    if not cfg.transfer.pretrained:
        raise ConfigError("--strategy probe reads the features of a pretrained UNet: give --pretrained RUN")
    job = prepare_transfer(cfg, stems)
    cfg, t, pre = job.cfg, job.cfg.transfer, job.pre
    for line in describe(cfg):
        print(line)
    if pre.config.model.arch != "unet" or pre.method not in PROBE_METHODS:
        raise ConfigError(f"--pretrained {t.pretrained} is a {pre.method!r} run of arch {pre.config.model.arch!r}; "
                         f"the probe reads the decoder blocks of the diffusion UNet (methods {', '.join(PROBE_METHODS)}); "
                         f"for this run use --strategy linear, decoder or full")
    cfg.corruption = pre.config.corruption
    requested = t.features
    if requested not in NAMED_FEATURES:
        parse_spec(requested)  # validate before the run folder is written
    if requested == "auto" and cfg.data.ignore_index is not None:
        raise ConfigError("--features auto scores its candidates on every pixel; with --ignore-index give the "
                         "features (--features default, or 'blocks=…;t=…')")
    device = distributed.setup(resolve_device(cfg.train.device))  # torchrun: join the process group
    unet = pre.backbone(device)
    out = prepare_run_dir(Path(out), overwrite=overwrite, resume=False,
                          reads=(cfg.data.path, cfg.data.split_file, t.pretrained))
    try:
        return _probe(cfg, out, job, unet, t0)
    finally:
        release_run_dir(out)


def _probe(cfg: RunConfig, out: Path, job, unet, t0: float) -> dict:
    """The part of :func:`run_probe` that writes the run folder (locked by the caller)."""
    t, pre = cfg.transfer, job.pre
    requested = t.features
    main = distributed.is_main()
    loader = ScaledImages(cfg.data)
    samples = job.ds.samples(job.stems)
    images = [loader.image(s) for s in samples]
    masks = [loader.mask(s, job.num_classes) for s in samples]
    selection = None
    if requested in ("default", "mdm-medical"):
        spec = default_spec(pre.method, len(unet.up_blocks), medical=requested == "mdm-medical")
    elif requested == "auto":
        from labeldiff.transfer.select_features import format_selection, select_spec

        m = 2 ** (len(unet.down_blocks) - 1)  # selection reads raw extractors: crop to a multiple of m
        crop = [(im.shape[-2] // m * m, im.shape[-1] // m * m) for im in images]
        spec, selection = select_spec(unet, pre.config, [im[:, :h, :w] for im, (h, w) in zip(images, crop)],
                                      [mk[:h, :w] for mk, (h, w) in zip(masks, crop)], job.num_classes,
                                      seed=cfg.train.seed, noise_seed=cfg.train.seed)
        print(format_selection(selection))
    else:
        spec = parse_spec(requested)
    t.features = format_spec(spec)
    if main:
        cfg.save(out / "config.json")
    extractor = PaddedExtractor(make_extractor(unet, pre.config, spec, noise_seed=cfg.train.seed))
    print(f"probe: {len(job.stems)} labeled images {job.stems}, K={job.num_classes}, features {t.features} "
          f"({extractor.num_features} per pixel, features {'chosen by validation' if selection else requested}), "
          f"{t.members} MLPs; the UNet on {next(unet.parameters()).device} and the MLPs on the CPU, in fp32, with "
          f"{threads_summary()}")
    # under torchrun the ranks split the images (features) and the members, and share them through a
    # folder in the run folder; one process uses a temporary folder
    cache = out / PROBE_CACHE if distributed.world_size() > 1 else None
    ensemble = train_probe(extractor, images, masks, job.num_classes, members=t.members, seed=cfg.train.seed,
                           batch_pixels=t.probe_batch, max_epochs=t.probe_max_epochs,
                           ignore_index=cfg.data.ignore_index, stop_iters=t.probe_stop_iters, cache_dir=cache,
                           progress=main)
    if cache is not None and main:
        shutil.rmtree(cache)
    if not main:  # rank 0 writes the run folder
        distributed.barrier()
        return {"step": sum(len(h) for h in ensemble.history), "loss": float("nan"), "seconds": time.time() - t0}
    provenance.write(out, provenance.record(job.ds.root, job.ds.split_file, job.stems, labeled=True))
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith(PRETEXT_OUTPUT)}
    save_weights(state, out / BACKBONE_FILE)
    save_probe(out, ensemble, spec, noise_seed=cfg.train.seed)
    atomic_write_text(out / "labeled.json", json.dumps({
        "split": cfg.data.train_split, "stems": job.stems, "seed": cfg.train.seed, "features_requested": requested,
        "features": t.features, "selection": selection,
        "member_epochs": [len(h) for h in ensemble.history]}, indent=2))
    atomic_write_text(out / "log.jsonl", "".join(json.dumps({"member": m, "epoch": e + 1, "loss": loss}) + "\n"
                                                 for m, h in enumerate(ensemble.history) for e, loss in enumerate(h)))
    distributed.barrier()
    last = [h[-1] for h in ensemble.history if h]
    return {"step": sum(len(h) for h in ensemble.history), "loss": sum(last) / max(len(last), 1),
            "seconds": time.time() - t0}
