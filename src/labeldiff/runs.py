"""One door into a run folder: :class:`RunFolder` opens any run and rebuilds what it holds.

Every command that needs a trained run (fine-tune, probe, evaluate, predict, sample, study, bench)
opens it here, from ``config.json`` and the safetensors beside it, with no flags. It sits below
``pretrain``, ``transfer``, ``evaluate``, ``sample`` and ``study`` and imports none of them.

Kinds of run folder::

    pretrain   `labeldiff pretrain`: model.safetensors (EMA weights) of the pretext network
    finetune   `labeldiff finetune --strategy linear|decoder|full|scratch`: model.safetensors of a
               SegmentationNet
    probe      `labeldiff finetune --strategy probe`: backbone.safetensors (the frozen UNet without
               its output layer) + probe.safetensors / probe.json (the pixel-MLP ensemble)

:meth:`RunFolder.segmenter` is the one registry of segmenters: a fine-tuned SegmentationNet, the
probe, or a hybrid / supervised pretraining run used as it is (its mask channels at t = 0).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from labeldiff.checkpoint import load_weights, verify_weights
from labeldiff.config import RunConfig, replace
from labeldiff.corruption import build_corruption
from labeldiff.data.io import DataError

BACKBONE_FILE = "backbone.safetensors"  # a probe run's frozen UNet
DIRECT_SEGMENTERS = ("hybrid", "supervised")  # pretraining runs that segment without fine-tuning
KINDS = ("pretrain", "finetune", "probe")
# a hybrid run's cache of sampled (image, mask) pairs: RUN/synthetic/ddim50/chunk_XXXX.safetensors,
# SYNTHETIC_CHUNK pairs each, chunk c drawn with seed c (labeldiff.sample.synthetic writes them)
SYNTHETIC_CHUNK = 16
SYNTHETIC_SAMPLER, SYNTHETIC_STEPS = "ddim", 50  # the `labeldiff sample` default


class RunFolder:
    """A labeldiff run folder: ``kind``, ``config`` and the networks its weights make."""

    def __init__(self, path: Path, config: RunConfig):
        self.path, self.config = Path(path), config

    @classmethod
    def open(cls, path: str | Path, flag: str = "--model") -> "RunFolder":
        """Read ``path/config.json``; errors name ``flag`` and say what to point it at."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{flag} {path}: no config.json there; point it at a run folder written by "
                                    f"`labeldiff pretrain` or `labeldiff finetune`")
        return cls(path, RunConfig.load(path / "config.json"))

    # ---- what it is ----------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        if self.config.kind == "pretrain":
            return "pretrain"
        return "probe" if self.config.transfer.strategy == "probe" else "finetune"

    @property
    def method(self) -> str:
        """The pretext method of a pretraining run (of the pretrained backbone for a probe)."""
        return self.config.corruption.method

    def describe(self) -> str:
        if self.kind == "pretrain":
            return f"a {self.method!r} pretraining run"
        return f"a {self.config.transfer.strategy!r} fine-tuning run" if self.kind == "finetune" else "a probe run"

    def trained_on(self) -> list[tuple[str, dict]]:
        """What this run, and the run it was pretrained from, read (``trained_on.json``,
        :mod:`labeldiff.data.provenance`): ``[(how, record)]``, how = "was trained on" or "was pretrained on";
        runs written before the record have none."""
        import json

        from labeldiff.data.provenance import TRAINED_ON

        out = []
        sources = [("was trained on", self.path)]
        if self.kind != "pretrain" and self.config.transfer.pretrained:
            sources.append(("was pretrained on", Path(self.config.transfer.pretrained)))
        for how, folder in sources:
            try:
                out.append((how, json.loads((folder / TRAINED_ON).read_text())))
            except (OSError, ValueError):
                continue
        return out

    def require_pretrain(self, flag: str = "--pretrained") -> "RunFolder":
        if self.kind != "pretrain":
            raise ValueError(f"{flag} {self.path} is {self.describe()}; this needs a `labeldiff pretrain` run folder")
        return self

    # ---- weights and networks ------------------------------------------------------------------

    def weights(self, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
        return load_weights(self.path / name)

    def verify(self, name: str = "model.safetensors") -> "RunFolder":
        """Check a weights file of the run (digest, header) before anything is written that needs it."""
        verify_weights(self.path / name)
        return self

    def pretext_network(self, device: torch.device | str = "cpu", flag: str = "--model") -> nn.Module:
        """A pretraining run's network with its pretext output layer, EMA weights, strict, in eval."""
        from labeldiff.models.unet import build_network

        self.require_pretrain(flag)
        cfg = self.config
        out = build_corruption(cfg.corruption).out_channels(cfg.model.in_channels, cfg.num_classes)
        net = build_network(cfg.model, out_channels=out)
        net.load_state_dict(self.weights(), strict=True)
        return net.to(device).eval()

    def backbone(self, device: torch.device | str = "cpu") -> nn.Module:
        """The pretrained diffusion UNet without its output layer (``out`` = identity), frozen:
        what the probe and diverse selection read the decoder blocks of."""
        net = self.pretext_network(device, flag="--pretrained")
        net.out = nn.Identity()
        return net.eval().requires_grad_(False)

    def encoder_state(self, flag: str = "--encoder") -> dict[str, torch.Tensor]:
        """The EfficientNet encoder weights of a run whose network has one (``encoder.*`` in a
        pretraining run, ``backbone.encoder.*`` in a fine-tuned one), without the prefix."""
        from labeldiff.models.effunet import ENCODER_PREFIX

        if not (self.path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{flag} {self.path}: no model.safetensors there; give 'imagenet', 'none' or "
                                    f"the folder of a labeldiff run with --arch efficientnet-unet")
        weights = self.weights()
        for prefix in (ENCODER_PREFIX, "backbone." + ENCODER_PREFIX):
            state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
            if state:
                return state
        raise ValueError(f"{flag} {self.path}: that run's network has no EfficientNet encoder (no encoder.* "
                         f"weights); pretrain it with --arch efficientnet-unet (e.g. --method supervised)")

    def segmenter(self, device: torch.device | str = "cpu") -> nn.Module:
        """``model(x [B, C, H, W]) -> class scores [B, K, H, W]`` of any run that segments, in eval."""
        return SEGMENTERS[self.kind](self).to(device).eval()

    # ---- synthetic (image, mask) pairs of a hybrid run ----------------------------------------

    def require_hybrid(self, flag: str = "--synthetic") -> "RunFolder":
        self.require_pretrain(flag)
        if self.method != "hybrid":
            raise ValueError(f"{flag} {self.path}: only hybrid runs sample (image, mask) pairs; this run was pretrained "
                             f"with {self.method!r} (pretrain one with --method hybrid on a labeled set)")
        return self

    def synthetic_chunks(self, n: int) -> list[Path]:
        """The cache files that hold the first ``n`` sampled pairs, present or not."""
        cache = self.path / "synthetic" / f"{SYNTHETIC_SAMPLER}{SYNTHETIC_STEPS}"
        return [cache / f"chunk_{c:04d}.safetensors" for c in range((n + SYNTHETIC_CHUNK - 1) // SYNTHETIC_CHUNK)]

    def synthetic_pairs(self, n: int, target: RunConfig, num_classes: int, flag: str = "--synthetic"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` cached pairs: images ``[n, C, S, S]`` float32 in [-1, 1], masks ``[n, S, S]``
        int64. The run must generate what ``target`` trains on (size, channels, classes), and the pairs
        must have been sampled (:func:`labeldiff.sample.synthetic.ensure_synthetic`)."""
        self.require_hybrid(flag)
        got = (self.config.data.size, self.config.model.in_channels, self.config.num_classes)
        want = (target.data.size, target.data.channels, num_classes)
        if got != want:
            raise DataError(f"{flag} {self.path} samples {got[0]}² images with {got[1]} channels and {got[2]} classes, "
                            f"but this fine-tuning trains on {want[0]}² with {want[1]} channels and {want[2]} classes; "
                            f"pretrain the hybrid run with the target's --size, --channels and classes")
        chunks = self.synthetic_chunks(n)
        missing = [p.name for p in chunks if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{flag} {self.path}:{n}: {len(missing)} of {len(chunks)} cache files are not "
                                    f"sampled yet ({missing[0]} …); `labeldiff finetune --synthetic` and studies sample "
                                    f"them first, from Python call labeldiff.sample.synthetic.ensure_synthetic")
        parts = [load_weights(p) for p in chunks]
        return torch.cat([p["images"] for p in parts])[:n].float(), torch.cat([p["masks"] for p in parts])[:n].long()


def _finetuned(run: RunFolder) -> nn.Module:
    from labeldiff.models.unet import SegmentationNet

    cfg = run.config
    model = SegmentationNet(cfg.model, cfg.num_classes, t=cfg.transfer.t, head_hidden=cfg.transfer.head_hidden,
                            keep_out_norm=cfg.transfer.keep_out_norm,
                            keep_head=cfg.corruption.method if cfg.transfer.keep_head else None)
    model.load_state_dict(run.weights(), strict=True)
    return model


def _probe(run: RunFolder) -> nn.Module:
    from labeldiff.models.probe import ProbeSegmenter, load_probe
    from labeldiff.models.unet import build_network

    cfg = run.config
    unet = build_network(cfg.model, out_channels=cfg.model.in_channels)
    unet.out = nn.Identity()
    unet.load_state_dict(run.weights(BACKBONE_FILE), strict=True)
    ensemble, spec, meta = load_probe(run.path)
    return ProbeSegmenter(unet.eval().requires_grad_(False), ensemble, cfg, spec, meta.get("noise_seed", 0))


def _direct(run: RunFolder) -> nn.Module:
    from labeldiff.models.unet import DirectSegmenter

    if run.method not in DIRECT_SEGMENTERS:
        raise ValueError(f"--model {run.path} is a {run.method!r} pretraining run, which does not predict masks; "
                         f"fine-tune it first (`labeldiff finetune --pretrained {run.path}`)")
    first = run.config.model.in_channels if run.method == "hybrid" else 0
    return DirectSegmenter(run.pretext_network(), first_channel=first, t=0)


SEGMENTERS = {"pretrain": _direct, "finetune": _finetuned, "probe": _probe}


def open_segmenter(path: Path, device: str = "auto") -> tuple[nn.Module, RunConfig]:
    """``(segmenter, config)`` of a run that segments, on ``device`` (auto: CUDA if present)."""
    from labeldiff.runtime import resolve_device

    run = RunFolder.open(Path(path))
    return run.segmenter(resolve_device(device)), run.config
