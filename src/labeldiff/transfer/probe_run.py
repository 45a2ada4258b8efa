"""``labeldiff finetune --strategy probe``: a pixel-MLP ensemble on a frozen pretrained UNet.

The run folder is self-contained: ``config.json`` (with the resolved feature spec), the frozen UNet
without its pretext output layer (``backbone.safetensors``), the ensemble (``probe.safetensors`` +
``probe.json``) and ``labeled.json`` (the chosen images, and the feature selection table when
``--features auto``). :class:`ProbeSegmenter` turns it back into a ``model(x) -> scores`` module,
so ``evaluate`` and ``predict`` treat it like any other segmenter.

Training images are the labeled images brought to the network's scale (``--scale`` in crop mode,
``--size``² in resize mode), whole, reflect-padded to a multiple of the UNet's downsampling factor;
prediction sees whole images the same way (no sliding window: the features of a window would differ
from those of the whole image the probe was trained on).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from labeldiff.checkpoint import atomic_write_text, load_weights, prepare_run_dir, save_weights
from labeldiff.config import RunConfig
from labeldiff.data.datasets import LabeledFolder, ScaledImages, select_subset, validate_samples
from labeldiff.models.unet import PRETEXT_OUTPUT, build_network
from labeldiff.transfer.probe import (FeatureExtractor, FeatureSpec, PixelEnsemble, default_spec, load_probe,
                                      make_extractor, save_probe, train_probe)

BACKBONE_FILE = "backbone.safetensors"
PROBE_METHODS = ("ddpm", "mdm", "mae", "hybrid", "supervised")  # runs whose network is the diffusion UNet


def parse_spec(text: str) -> FeatureSpec:
    """``"blocks=1,2;t=50,150"`` → FeatureSpec((1, 2), (50, 150))."""
    m = re.fullmatch(r"\s*blocks\s*=\s*([\d,\s]+);\s*t\s*=\s*([\d,\s]+)", text)
    if not m:
        raise ValueError(f"--features {text!r}: use 'default', 'auto' or e.g. 'blocks=1,2;t=50,150'")
    ints = [tuple(int(v) for v in g.split(",") if v.strip()) for g in m.groups()]
    return FeatureSpec(blocks=ints[0], timesteps=ints[1])


def format_spec(spec: FeatureSpec) -> str:
    return f"blocks={','.join(map(str, spec.blocks))};t={','.join(map(str, spec.timesteps))}"


class PaddedExtractor:
    """A :class:`FeatureExtractor` for any image size: reflect-pad to a multiple, crop the features back."""

    def __init__(self, extractor: FeatureExtractor):
        self.extractor = extractor

    @property
    def num_features(self) -> int:
        return self.extractor.num_features

    def __call__(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        m = self.extractor.size_multiple
        h, w = images.shape[-2:]
        ph, pw = -h % m, -w % m
        x = F.pad(images, (0, pw, 0, ph), mode="reflect") if ph or pw else images
        return self.extractor(x, dtype)[..., :h, :w]


class ProbeSegmenter(nn.Module):
    """``forward(x [B, C, H, W]) -> log of the ensemble's mean probability [B, K, H, W]``.

    The argmax is the probe's prediction and ``softmax`` of the output gives back the mean
    probability, so the entropy of that softmax is the ensemble's uncertainty.
    ``whole_image = True`` tells the predictor not to slide a window.
    """

    whole_image = True

    def __init__(self, unet: nn.Module, ensemble: PixelEnsemble, run_cfg: RunConfig, spec: FeatureSpec,
                 noise_seed: int = 0):
        super().__init__()
        self.unet, self.ensemble = unet, ensemble
        self.extractor = PaddedExtractor(make_extractor(unet, run_cfg, spec, noise_seed))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        feats = self.extractor(x.float())  # [B, F, H, W]
        rows = feats.movedim(1, -1).reshape(-1, feats.shape[1])
        probs = torch.cat([self.ensemble.predict_proba(rows[s:s + 65536]) for s in range(0, len(rows), 65536)])
        return probs.clamp_min(1e-8).log().reshape(b, h, w, -1).movedim(-1, 1).to(x.device)


def load_frozen_unet(pre_dir: Path, pre: RunConfig) -> nn.Module:
    """The pretrained UNet with its pretext output layer removed (``out`` = identity), frozen."""
    from labeldiff.sample.diffusion import load_pretrained

    net, _ = load_pretrained(pre_dir)
    net.out = nn.Identity()
    return net.eval().requires_grad_(False)


def run_probe(cfg: RunConfig, out: Path, overwrite: bool = False) -> dict:
    import time

    from labeldiff.config import load_run_config

    t0 = time.time()
    cfg.kind = "segmentation"
    t = cfg.transfer
    if not t.pretrained:
        raise ValueError("strategy 'probe' reads the features of a pretrained UNet: give --pretrained RUN_DIR")
    pre = load_run_config(t.pretrained, "pretrain", flag="--pretrained")
    if pre.model.arch != "unet" or pre.corruption.method not in PROBE_METHODS:
        raise ValueError(f"--pretrained {t.pretrained} is a {pre.corruption.method!r} run of arch {pre.model.arch!r}; "
                         f"the probe reads the decoder blocks of the diffusion UNet (methods {', '.join(PROBE_METHODS)}); "
                         f"for this run use --strategy linear, decoder or full")
    cfg.model, cfg.corruption = pre.model, pre.corruption
    cfg.data.channels = pre.data.channels
    ds = LabeledFolder(Path(cfg.data.path), cfg.data.split_file)
    train_stems = ds.stems(cfg.data.train_split)
    chosen = select_subset(train_stems, t.labels, cfg.train.seed, cfg.data.train_split)
    num_classes = validate_samples(ds.samples(train_stems), cfg.data.num_classes)
    cfg.num_classes = num_classes
    unet = load_frozen_unet(Path(t.pretrained), pre)
    n_up = len(unet.up_blocks)
    requested = t.features
    if requested not in ("default", "auto"):
        parse_spec(requested)  # validate before the run folder is written
    out = prepare_run_dir(Path(out), overwrite=overwrite, resume=False)
    loader = ScaledImages(cfg.data)
    samples = ds.samples(chosen)
    images = [loader.image(s) for s in samples]
    masks = [loader.mask(s, num_classes) for s in samples]
    selection = None
    if requested == "default":
        spec = default_spec(pre.corruption.method, n_up)
    elif requested == "auto":
        from labeldiff.transfer.select_features import format_selection, select_spec

        m = 2 ** (len(unet.down_blocks) - 1)  # selection reads raw extractors: crop to a multiple of m
        crop = [(im.shape[-2] // m * m, im.shape[-1] // m * m) for im in images]
        spec, selection = select_spec(unet, pre, [im[:, :h, :w] for im, (h, w) in zip(images, crop)],
                                      [mk[:h, :w] for mk, (h, w) in zip(masks, crop)], num_classes,
                                      seed=cfg.train.seed, noise_seed=cfg.train.seed)
        print(format_selection(selection))
    else:
        spec = parse_spec(requested)
    t.features = format_spec(spec)
    cfg.save(out / "config.json")
    extractor = PaddedExtractor(make_extractor(unet, pre, spec, noise_seed=cfg.train.seed))
    print(f"probe: {len(chosen)} labeled images {chosen}, K={num_classes}, features {t.features} "
          f"({extractor.num_features} per pixel, features {'chosen by validation' if selection else requested}), "
          f"{t.members} MLPs")
    ensemble = train_probe(extractor, images, masks, num_classes, members=t.members, seed=cfg.train.seed)
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith(PRETEXT_OUTPUT)}
    save_weights(state, out / BACKBONE_FILE)
    save_probe(out, ensemble, spec, noise_seed=cfg.train.seed)
    atomic_write_text(out / "labeled.json", json.dumps({
        "split": cfg.data.train_split, "stems": chosen, "seed": cfg.train.seed, "features_requested": requested,
        "features": t.features, "selection": selection,
        "member_epochs": [len(h) for h in ensemble.history]}, indent=2))
    atomic_write_text(out / "log.jsonl", "".join(json.dumps({"member": m, "epoch": e + 1, "loss": loss}) + "\n"
                                                 for m, h in enumerate(ensemble.history) for e, loss in enumerate(h)))
    last = [h[-1] for h in ensemble.history if h]
    return {"step": sum(len(h) for h in ensemble.history), "loss": sum(last) / max(len(last), 1),
            "seconds": time.time() - t0}


def load_probe_segmenter(run_dir: Path, cfg: RunConfig, device: torch.device | str = "cpu") -> ProbeSegmenter:
    """Rebuild a probe run's segmenter from its folder alone, strictly."""
    run_dir = Path(run_dir)
    unet = build_network(cfg.model, out_channels=cfg.model.in_channels)
    unet.out = nn.Identity()
    unet.load_state_dict(load_weights(run_dir / BACKBONE_FILE), strict=True)
    ensemble, spec, meta = load_probe(run_dir)
    model = ProbeSegmenter(unet.eval().requires_grad_(False), ensemble, cfg, spec, meta.get("noise_seed", 0))
    return model.to(device).eval()
