"""The pixel-MLP probe as a network: per-pixel UNet features, the MLP ensemble, the segmenter.

Baranchuk et al. ("Label-efficient semantic segmentation with diffusion models", ICLR 2022; code:
yandex-research/ddpm-segmentation) as used by the MDM paper (../shared/papers/masked-diffusion-mdm.txt,
§4.2, App. A.2 and B): the (noised) image and a timestep t go through the frozen pretrained UNet,
the activations of a few decoder blocks are upsampled to the image size and concatenated into one
feature vector per pixel (:class:`FeatureExtractor`); an ensemble of small MLPs classifies pixels
(:class:`PixelEnsemble`); :class:`ProbeSegmenter` puts both behind ``model(x) -> scores``.
How the ensemble is trained is :mod:`labeldiff.transfer.probe`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from labeldiff.checkpoint import atomic_write_text, load_weights, save_weights
from labeldiff.errors import ConfigError, RunFolderError

# MDM App. B: decoder blocks 8 and 12 of guided-diffusion's 18 (6 levels × 3 blocks, 0-based)
REFERENCE_BLOCKS, REFERENCE_N_BLOCKS = (8, 12), 18
PROBE_METHODS = ("ddpm", "mdm", "mae", "hybrid", "supervised")  # runs whose network is the diffusion UNet


@dataclass(frozen=True)
class FeatureSpec:
    """Which activations make a pixel's feature vector.

    blocks:    indices into MONAI ``DiffusionModelUNet.up_blocks`` (decoder, 0 = coarsest)
    timesteps: diffusion steps t fed to the UNet; the features of all t are concatenated
    """

    blocks: tuple[int, ...]
    timesteps: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"blocks": list(self.blocks), "timesteps": list(self.timesteps)}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        return cls(blocks=tuple(int(b) for b in d["blocks"]), timesteps=tuple(int(t) for t in d["timesteps"]))


def default_blocks(n_up_blocks: int) -> tuple[int, ...]:
    """The middle decoder blocks, mapped from the MDM paper's choice onto ``n_up_blocks`` blocks.

    Baranchuk et al. (§4) and MDM (App. B, Fig. 6) find that deep decoder blocks give coarse but
    semantic features and shallow ones fine but less semantic ones, and take *middle* blocks: MDM
    uses blocks 8 and 12 of guided-diffusion's 18 decoder blocks. Our UNets are much shallower
    (MONAI has one up block per level), so we keep the relative depths 8/17 and 12/17 and round
    towards the finer block: ``ceil(8·(n−1)/17)`` and ``ceil(12·(n−1)/17)``. This gives back (8, 12)
    for 18 blocks, and (1, 2) for our 3-level UNet: the middle block (already at full resolution
    after its upsampler) and the last one, dropping only the coarsest block (half resolution);
    for 2 blocks it gives (1,), the full-resolution block.
    """
    if n_up_blocks < 1:
        raise ValueError(f"the UNet has {n_up_blocks} up blocks; need at least 1")
    picks = [-(-b * (n_up_blocks - 1) // (REFERENCE_N_BLOCKS - 1)) for b in REFERENCE_BLOCKS]  # integer ceil
    return tuple(sorted(set(picks)))


def default_spec(method: str, n_up_blocks: int, medical: bool = False) -> FeatureSpec:
    """Blocks from :func:`default_blocks`; timesteps by pretext method.

    - ``mdm``: t = 50 (MDM App. A.2/B, Table 6: "we set t to 50 across all four datasets").
    - ``ddpm``: t = 50, 150, 250 (Baranchuk's official setting, used by MDM for FFHQ/CelebA; on
      GlaS/MoNuSeg MDM uses a single t = 250, App. B: ``medical``).
    - ``mae`` and anything else (hybrid, supervised, …): t = 0. Our MAE-style pretext always feeds
      t = 0 (``corruption/masking.py``), so its time embedding has never seen another value (the
      MDM paper's MAE is a ViT without any t).
    - ``medical``: the MDM paper's choice on GlaS and MoNuSeg (App. B): ddpm t = 250 alone; mdm stays t = 50.
    """
    timesteps = {"mdm": (50,), "ddpm": (250,) if medical else (50, 150, 250)}.get(method, (0,))
    return FeatureSpec(blocks=default_blocks(n_up_blocks), timesteps=timesteps)


@contextmanager
def capture_outputs(modules: Sequence[nn.Module]) -> Iterator[list]:
    """Record the output of each module in ``modules`` during the ``with`` body; hooks removed after."""
    outputs: list = [None] * len(modules)

    def hook_for(i: int):
        def hook(module, args, output):
            outputs[i] = output
        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


class FeatureExtractor:
    """Per-pixel features of a frozen ``DiffusionModelUNet``: ``images [B, C, H, W] -> [B, F, H, W]``.

    For each t in ``spec.timesteps`` the image is noised with ``scheduler.add_noise`` (DDPM runs;
    Baranchuk §3) or fed clean (``scheduler=None``: MDM feeds the unmasked image with t, §4.2),
    the UNet runs with t, and the outputs of ``up_blocks[spec.blocks]`` are upsampled bilinearly
    to H×W and concatenated along channels (block order within t, then t order).
    The noise is drawn from a generator seeded with ``noise_seed`` with the shape ``[C, H, W]`` of
    one image, as in the reference (one fixed noise tensor): the same image always gets the same
    noise, at training and at test time and at every position in a batch. The UNet is put in eval
    mode with gradients off (frozen); features are computed and returned on its device.
    """

    def __init__(self, unet: nn.Module, spec: FeatureSpec, scheduler=None, noise_seed: int = 0):
        if not hasattr(unet, "up_blocks"):
            raise ConfigError(f"the pixel probe reads the decoder blocks (up_blocks) of MONAI's DiffusionModelUNet; "
                             f"{type(unet).__name__} has none (pretrain with the unet arch)")
        n = len(unet.up_blocks)
        bad = [b for b in spec.blocks if not 0 <= b < n]
        if bad or not spec.blocks or not spec.timesteps:
            raise ConfigError(f"feature spec {spec} does not fit this UNet: blocks must be in 0..{n - 1} "
                             f"(it has {n} up blocks) and at least one block and one timestep are needed")
        if scheduler is not None and max(spec.timesteps) >= scheduler.num_train_timesteps:
            raise ConfigError(f"timestep {max(spec.timesteps)} is outside the scheduler's 0.."
                             f"{scheduler.num_train_timesteps - 1}")
        self.unet = unet.eval().requires_grad_(False)
        self.spec, self.scheduler, self.noise_seed = spec, scheduler, int(noise_seed)
        widths = tuple(reversed(unet.block_out_channels))  # up_blocks[i] outputs channels[::-1][i]
        self.block_channels = tuple(widths[b] for b in spec.blocks)
        self.size_multiple = 2 ** (len(unet.down_blocks) - 1)

    @property
    def num_features(self) -> int:
        return sum(self.block_channels) * len(self.spec.timesteps)

    def noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The fixed noise ``[C, H, W]`` for images of this shape."""
        return torch.randn(shape, generator=torch.Generator().manual_seed(self.noise_seed))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``images [B, C, H, W]`` → features ``[B, F, H, W]`` in ``dtype`` on the UNet's device (the
        disk-cache trainer asks for float16, what it stores, so one image's features cost half)."""
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        b, _, h, w = images.shape
        m = self.size_multiple
        if h % m or w % m:
            raise ValueError(f"image size {h}×{w} is not a multiple of {m} (the UNet halves the resolution "
                             f"{len(self.unet.down_blocks) - 1} times); resize or crop it to a multiple of {m}")
        device = next(self.unet.parameters()).device
        x0 = images.float().to(device)
        noise = self.noise(tuple(images.shape[1:])).to(device).expand_as(x0)
        blocks = [self.unet.up_blocks[i] for i in self.spec.blocks]
        feats = torch.empty(b, self.num_features, h, w, dtype=dtype, device=device)  # block by block: no cat
        c = 0
        with capture_outputs(blocks) as outputs:
            for t in self.spec.timesteps:
                tt = torch.full((b,), t, dtype=torch.long, device=device)
                x = x0 if self.scheduler is None else self.scheduler.add_noise(x0, noise, tt)
                self.unet(x, tt)
                for o in outputs:
                    feats[:, c:c + o.shape[1]] = F.interpolate(o.float(), size=(h, w), mode="bilinear",
                                                               align_corners=False)
                    c += o.shape[1]
        return feats


def make_extractor(unet: nn.Module, run_cfg, spec: FeatureSpec | None = None, noise_seed: int = 0) -> FeatureExtractor:
    """An extractor for a pretraining run: noising with the run's own schedule for Gaussian-noise runs (ddpm, hybrid)."""
    from labeldiff.corruption.gaussian import make_scheduler

    method = run_cfg.corruption.method
    spec = spec or default_spec(method, len(unet.up_blocks))
    scheduler = make_scheduler(run_cfg.corruption) if method in ("ddpm", "hybrid") else None  # Gaussian-noise runs
    return FeatureExtractor(unet, spec, scheduler, noise_seed)


def hidden_sizes(num_classes: int) -> tuple[int, int]:
    """Baranchuk's pixel classifier: hidden 256→128 for ≥ 30 classes, else 128→32."""
    return (256, 128) if num_classes >= 30 else (128, 32)


class PixelMLP(nn.Module):
    """``[N, F] -> logits [N, K]``: Linear→ReLU→BN→Linear→ReLU→BN→Linear (ddpm-segmentation
    ``pixel_classifier``), initialised as there: Linear weights N(0, 0.02), BN weights N(1, 0.02),
    biases 0, drawn from a generator seeded with ``seed``."""

    def __init__(self, num_features: int, num_classes: int, hidden: tuple[int, int], seed: int):
        super().__init__()
        h1, h2 = hidden
        self.layers = nn.Sequential(
            nn.Linear(num_features, h1), nn.ReLU(), nn.BatchNorm1d(h1),
            nn.Linear(h1, h2), nn.ReLU(), nn.BatchNorm1d(h2),
            nn.Linear(h2, num_classes),
        )
        g = torch.Generator().manual_seed(seed)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.BatchNorm1d)):
                nn.init.normal_(m.weight, 1.0 if isinstance(m, nn.BatchNorm1d) else 0.0, 0.02, generator=g)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def member_seed(seed: int, m: int) -> int:
    """Seed of ensemble member ``m`` of a probe trained with ``seed`` (init and pixel shuffling)."""
    return 1000 * seed + m


class PixelEnsemble(nn.Module):
    """M independently seeded :class:`PixelMLP` members (Baranchuk: M = 10).

    ``predict_proba(features [N, F]) -> [N, K]`` is the mean of the members' softmax.
    ``uncertainty(features) -> [N]`` is the entropy of that mean, in [0, log K];
    ``disagreement(features) -> [N]`` the fraction of members whose argmax differs from the
    ensemble's. (The reference labels pixels by majority vote and scores images by the
    Jensen–Shannon divergence; we take the argmax of the mean probability.)
    """

    def __init__(self, num_features: int, num_classes: int, members: int = 10, seed: int = 0,
                 hidden: tuple[int, int] | None = None):
        super().__init__()
        if members < 1:
            raise ValueError(f"an ensemble needs at least 1 member, got {members}")
        self.num_features, self.num_classes, self.seed = num_features, num_classes, seed
        self.hidden = tuple(hidden or hidden_sizes(num_classes))
        self.members = nn.ModuleList(PixelMLP(num_features, num_classes, self.hidden, member_seed(seed, m))
                                     for m in range(members))
        self.history: list[list[float]] = []  # per member: mean training loss of each epoch (not saved)

    @torch.no_grad()
    def member_probs(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, F] -> [M, N, K]`` softmax of every member (eval mode)."""
        self.eval()
        return torch.stack([net(features.float()).softmax(-1) for net in self.members])

    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        return self.member_probs(features).mean(0)

    def uncertainty(self, features: torch.Tensor) -> torch.Tensor:
        return entropy(self.predict_proba(features))

    def disagreement(self, features: torch.Tensor) -> torch.Tensor:
        probs = self.member_probs(features)
        return (probs.argmax(-1) != probs.mean(0).argmax(-1)).float().mean(0)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) along the last axis: ``[..., K] -> [...]``."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def parse_spec(text: str) -> FeatureSpec:
    """``"blocks=1,2;t=50,150"`` → FeatureSpec((1, 2), (50, 150))."""
    m = re.fullmatch(r"\s*blocks\s*=\s*([\d,\s]+);\s*t\s*=\s*([\d,\s]+)", text)
    if not m:
        raise ConfigError(f"--features {text!r}: use 'default', 'auto' or e.g. 'blocks=1,2;t=50,150'")
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
    probability, so the entropy of that softmax is the ensemble's uncertainty. Features, MLPs and
    output stay on the module's device. ``whole_image = True`` tells the predictor not to slide a
    window (the features of a window would differ from those of the whole image).
    """

    whole_image = True

    def __init__(self, unet: nn.Module, ensemble: PixelEnsemble, run_cfg, spec: FeatureSpec, noise_seed: int = 0):
        super().__init__()
        self.unet, self.ensemble = unet, ensemble
        self.extractor = PaddedExtractor(make_extractor(unet, run_cfg, spec, noise_seed))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        feats = self.extractor(x.float())  # [B, F, H, W] on the UNet's device
        rows = feats.movedim(1, -1).reshape(-1, feats.shape[1])
        probs = torch.cat([self.ensemble.predict_proba(rows[s:s + 65536]) for s in range(0, len(rows), 65536)])
        return probs.clamp_min(1e-8).log().reshape(b, h, w, -1).movedim(-1, 1)


PROBE_WEIGHTS, PROBE_JSON = "probe.safetensors", "probe.json"


def save_probe(folder: Path, ensemble: PixelEnsemble, spec: FeatureSpec, noise_seed: int = 0) -> Path:
    """Write ``probe.safetensors`` (all members) and ``probe.json`` (everything needed to rebuild it)."""
    folder = Path(folder)
    save_weights(ensemble.state_dict(), folder / PROBE_WEIGHTS)
    meta = {"spec": spec.to_dict(), "noise_seed": noise_seed, "num_classes": ensemble.num_classes,
            "members": len(ensemble.members), "hidden": list(ensemble.hidden),
            "num_features": ensemble.num_features, "seed": ensemble.seed}
    atomic_write_text(folder / PROBE_JSON, json.dumps(meta, indent=2))
    return folder


def save_members(ensemble: PixelEnsemble, members: Iterable[int], stem: Path) -> None:
    """Some members of an ensemble (weights and loss histories) as ``stem.safetensors`` + ``stem.json``:
    what a torchrun rank of the probe hands the others."""
    members = list(members)
    state = {k: v for k, v in ensemble.state_dict().items() if int(k.split(".")[1]) in members}
    save_weights(state, Path(f"{stem}.safetensors"))
    atomic_write_text(Path(f"{stem}.json"), json.dumps({str(m): ensemble.history[m] for m in members}))


def load_members(ensemble: PixelEnsemble, stem: Path) -> None:
    """Put the members :func:`save_members` wrote into ``ensemble``; every tensor must be one of its own,
    with its shape, and every saved member whole."""
    state, own = load_weights(Path(f"{stem}.safetensors")), ensemble.state_dict()
    history = {int(m): losses for m, losses in json.loads(Path(f"{stem}.json").read_text()).items()}
    expected = {k for k in own if int(k.split(".")[1]) in history}
    bad = [k for k in state if k not in own or state[k].shape != own[k].shape]
    if bad or set(state) != expected:
        raise RunFolderError(f"{stem}.safetensors does not hold whole members {sorted(history)} of this ensemble "
                         f"(unknown or misshaped: {bad[:3]}, missing: {sorted(expected - set(state))[:3]})")
    ensemble.load_state_dict({**own, **state}, strict=True)
    for m, losses in history.items():
        ensemble.history[m] = losses


def load_probe(folder: Path) -> tuple[PixelEnsemble, FeatureSpec, dict]:
    """Rebuild a probe from its folder alone; every tensor must be present with its shape.

    Returns ``(ensemble in eval mode, spec, the probe.json dict)``."""
    folder = Path(folder)
    if not (folder / PROBE_JSON).is_file():
        raise RunFolderError(f"{folder / PROBE_JSON} does not exist: is {folder} a saved probe?")
    meta = json.loads((folder / PROBE_JSON).read_text())
    ensemble = PixelEnsemble(meta["num_features"], meta["num_classes"], meta["members"], meta["seed"],
                             tuple(meta["hidden"]))
    state, own = load_weights(folder / PROBE_WEIGHTS), ensemble.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
           if k in state and state[k].shape != v.shape]
    if missing or unexpected or bad:
        raise RunFolderError(f"{folder / PROBE_WEIGHTS} does not match {PROBE_JSON}: {len(missing)} missing "
                         f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
                         f"{len(bad)} of the wrong shape (e.g. {bad[:2]})")
    ensemble.load_state_dict(state, strict=True)
    return ensemble.eval(), FeatureSpec.from_dict(meta["spec"]), meta
