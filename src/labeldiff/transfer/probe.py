"""Pixel-MLP ensemble probe on frozen diffusion-UNet features, with a memory-bounded trainer.

The transfer of Baranchuk et al. ("Label-efficient semantic segmentation with diffusion models",
ICLR 2022; code: yandex-research/ddpm-segmentation) as used by the MDM paper
(../shared/papers/masked-diffusion-mdm.txt, §4.2, App. A.2 and B):

1. feed the (noised) labeled image and a timestep t to the frozen pretrained UNet, take the
   activations of a few decoder blocks, upsample them bilinearly to the image size and
   concatenate them: one feature vector ``[F]`` per pixel (:class:`FeatureExtractor`);
2. train an ensemble of small MLPs that classify single pixels (:class:`PixelEnsemble`);
3. predict with the mean of the members' probabilities; its entropy is the uncertainty.

The reference implementation keeps the ``[N_pixels, F]`` float32 features of every labeled image in
RAM (~210 GB for 50 images of 256², per its README). :func:`train_probe` instead writes each
image's features to an on-disk float16 cache as soon as they are computed and streams shuffled
minibatches back with plain file reads, so peak RSS does not grow with the number of labeled
images; :func:`materialized_train_probe` is the reference approach, kept for ``labeldiff.bench``.
"""
from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from labeldiff.checkpoint import atomic_write_text, load_weights, save_weights

# MDM App. B: decoder blocks 8 and 12 of guided-diffusion's 18 (6 levels × 3 blocks, 0-based)
REFERENCE_BLOCKS, REFERENCE_N_BLOCKS = (8, 12), 18
# streaming shuffle: groups of SHUFFLE_CHUNKS chunks of CHUNK_ROWS pixel rows, each chunk from a random
# (image, offset), mixed in one buffer; a 1024-pixel batch then draws on up to 64 images
SHUFFLE_CHUNKS, CHUNK_ROWS = 64, 256


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


def default_spec(method: str, n_up_blocks: int) -> FeatureSpec:
    """Blocks from :func:`default_blocks`; timesteps by pretext method.

    - ``mdm``: t = 50 (MDM App. A.2/B, Table 6: "we set t to 50 across all four datasets").
    - ``ddpm``: t = 50, 150, 250 (Baranchuk's official setting, used by MDM for FFHQ/CelebA; on
      GlaS/MoNuSeg MDM uses a single t = 250, App. B — pass a FeatureSpec for that).
    - ``mae`` and anything else (hybrid, supervised, …): t = 0. Our MAE-style pretext always feeds
      t = 0 (``corruption/masking.py``), so its time embedding has never seen another value (the
      MDM paper's MAE is a ViT without any t).
    """
    timesteps = {"mdm": (50,), "ddpm": (50, 150, 250)}.get(method, (0,))
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
    noise, at training and at test time and at every position in a batch. Features are float32 on
    the CPU; the UNet runs on its own device and is put in eval mode with gradients off (frozen).
    """

    def __init__(self, unet: nn.Module, spec: FeatureSpec, scheduler=None, noise_seed: int = 0):
        if not hasattr(unet, "up_blocks"):
            raise ValueError(f"the pixel probe reads the decoder blocks (up_blocks) of MONAI's DiffusionModelUNet; "
                             f"{type(unet).__name__} has none (pretrain with the unet arch)")
        n = len(unet.up_blocks)
        bad = [b for b in spec.blocks if not 0 <= b < n]
        if bad or not spec.blocks or not spec.timesteps:
            raise ValueError(f"feature spec {spec} does not fit this UNet: blocks must be in 0..{n - 1} "
                             f"(it has {n} up blocks) and at least one block and one timestep are needed")
        if scheduler is not None and max(spec.timesteps) >= scheduler.num_train_timesteps:
            raise ValueError(f"timestep {max(spec.timesteps)} is outside the scheduler's 0.."
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
        """``images [B, C, H, W]`` → features ``[B, F, H, W]`` on the CPU in ``dtype`` (the disk-cache
        trainer asks for float16, what it stores, so one image's features cost half)."""
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
        feats = torch.empty(b, self.num_features, h, w, dtype=dtype)  # filled block by block: no list + cat
        c = 0
        with capture_outputs(blocks) as outputs:
            for t in self.spec.timesteps:
                tt = torch.full((b,), t, dtype=torch.long, device=device)
                x = x0 if self.scheduler is None else self.scheduler.add_noise(x0, noise, tt)
                self.unet(x, tt)
                for o in outputs:
                    feats[:, c:c + o.shape[1]] = F.interpolate(o.float(), size=(h, w), mode="bilinear",
                                                               align_corners=False).cpu()
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


# ---- training ------------------------------------------------------------------------------------

BatchSource = Callable[[torch.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def train_members(batches: BatchSource, num_features: int, num_classes: int, members: int, lr: float,
                  max_epochs: int, patience: int, seed: int, progress: bool) -> PixelEnsemble:
    """Train each member in turn on the epochs ``batches(generator)`` yields (``x [b, F]``, ``y [b]``).

    Adam(lr), cross-entropy; a member stops when its mean epoch training loss has not improved for
    ``patience`` epochs (Baranchuk / MDM App. A.2 stop on the training loss) or after ``max_epochs``.
    The per-member epoch losses are kept in ``ensemble.history``.
    """
    ensemble = PixelEnsemble(num_features, num_classes, members, seed)
    for m, net in enumerate(ensemble.members):
        g = torch.Generator().manual_seed(member_seed(seed, m))
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        net.train()
        losses: list[float] = []
        best, stale = math.inf, 0
        bar = tqdm(range(max_epochs), desc=f"probe member {m + 1}/{members}", disable=not progress, leave=False)
        for _ in bar:
            total, count = 0.0, 0
            for x, y in batches(g):
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, count = total + loss.item() * len(y), count + len(y)
            losses.append(total / max(count, 1))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if losses[-1] < best:
                best, stale = losses[-1], 0
            else:
                stale += 1
            if stale >= patience:
                break
        bar.close()
        net.eval()
        ensemble.history.append(losses)
    return ensemble


def tensor_batches(features: torch.Tensor, labels: torch.Tensor, batch_pixels: int) -> BatchSource:
    """Batches of an in-RAM ``[N, F]`` matrix in a fresh random order per epoch (the reference)."""
    def epoch(g: torch.Generator):
        order = torch.randperm(len(labels), generator=g)
        for s in range(0, len(order), batch_pixels):
            idx = order[s:s + batch_pixels]
            if len(idx) > 1:  # BatchNorm needs two samples
                yield features[idx].float(), labels[idx]
    return epoch


def fit_pixels(features: torch.Tensor, labels: torch.Tensor, num_classes: int, members: int = 10, lr: float = 1e-3,
               batch_pixels: int = 1024, max_epochs: int = 50, patience: int = 3, seed: int = 0,
               progress: bool = True) -> PixelEnsemble:
    """Train an ensemble on in-memory pixels: ``features [N, F]``, ``labels [N]`` (long)."""
    return train_members(tensor_batches(features, labels.long(), batch_pixels), features.shape[1], num_classes,
                         members, lr, max_epochs, patience, seed, progress)


class PixelCache:
    """On-disk features of labeled images: per image a float16 ``[P, F]`` file and an int16 ``[P]``
    label file, its pixels in a random order (so any contiguous chunk is a random sample of them).

    ``batches(g)`` is one epoch: the chunks of ``CHUNK_ROWS`` rows of all files in random order,
    read ``SHUFFLE_CHUNKS`` at a time into one preallocated buffer with plain file reads (pages of
    a memmap would count in RSS), shuffled together and cut into batches; the rows left over roll
    into the next group. RAM use is that buffer, ``(SHUFFLE_CHUNKS · CHUNK_ROWS + batch_pixels) ·
    (2F + 2)`` bytes, whatever the number of images; nothing else of size is allocated while streaming.
    """

    def __init__(self, folder: Path, num_features: int, batch_pixels: int):
        self.folder, self.num_features, self.batch_pixels = Path(folder), num_features, batch_pixels
        self.folder.mkdir(parents=True, exist_ok=True)
        self.sizes: list[int] = []

    def paths(self, i: int) -> tuple[Path, Path]:
        return self.folder / f"{i:06d}.features.f16", self.folder / f"{i:06d}.labels.i16"

    def add(self, features: torch.Tensor, mask: torch.Tensor, g: torch.Generator) -> None:
        """Append one image: ``features [F, H, W]``, ``mask [H, W]``."""
        order = torch.randperm(mask.numel(), generator=g)
        rows = features.to(torch.float16).reshape(self.num_features, -1).T[order]  # one float16 copy
        fpath, lpath = self.paths(len(self.sizes))
        rows.numpy().tofile(fpath)
        mask.reshape(-1)[order].to(torch.int16).numpy().tofile(lpath)
        self.sizes.append(mask.numel())

    @property
    def nbytes(self) -> int:
        return sum(self.sizes) * (2 * self.num_features + 2)

    def read_into(self, i: int, start: int, x: np.ndarray, y: np.ndarray) -> None:
        """Rows ``start : start + len(y)`` of image ``i`` into ``x [n, F]`` and ``y [n]`` (contiguous views)."""
        for path, out in zip(self.paths(i), (x, y)):
            view = memoryview(out).cast("B")
            with open(path, "rb") as f:
                f.seek(start * out.strides[0])  # bytes per row
                if f.readinto(view) != view.nbytes:
                    raise OSError(f"{path}: the probe cache file is shorter than expected; was it modified?")

    def batches(self, g: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bp, c = self.batch_pixels, CHUNK_ROWS
        chunks = [(i, s, min(s + c, n)) for i, n in enumerate(self.sizes) for s in range(0, n, c)]
        order = torch.randperm(len(chunks), generator=g).tolist()
        rows = min(SHUFFLE_CHUNKS, len(chunks)) * c + bp
        buf_x, buf_y = np.empty((rows, self.num_features), dtype=np.float16), np.empty(rows, dtype=np.int16)
        kept = 0  # rows left over from the previous group, at the front of the buffer
        for first in range(0, len(order), SHUFFLE_CHUNKS):
            n = kept
            for k in order[first:first + SHUFFLE_CHUNKS]:
                i, start, stop = chunks[k]
                self.read_into(i, start, buf_x[n:n + stop - start], buf_y[n:n + stop - start])
                n += stop - start
            perm = torch.randperm(n, generator=g).numpy()
            full = n // bp * bp
            for s in range(0, full, bp):
                idx = perm[s:s + bp]  # fancy indexing copies: the batch owns its rows
                yield torch.from_numpy(buf_x[idx]).float(), torch.from_numpy(buf_y[idx]).long()
            kept = n - full
            buf_x[:kept], buf_y[:kept] = buf_x[perm[full:]], buf_y[perm[full:]]
        if kept > 1:  # BatchNorm needs two samples
            yield torch.from_numpy(buf_x[:kept]).float(), torch.from_numpy(buf_y[:kept]).long()


def _check_pairs(images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], num_classes: int) -> None:
    if len(images) != len(masks) or not len(images):
        raise ValueError(f"need the same, non-zero number of images and masks (got {len(images)} and {len(masks)})")
    if num_classes > 2**15:
        raise ValueError(f"num_classes={num_classes} does not fit the int16 label cache")


def _image_features(extractor: FeatureExtractor, image: torch.Tensor, mask: torch.Tensor, i: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if tuple(mask.shape) != tuple(image.shape[-2:]):
        raise ValueError(f"mask {i} is {tuple(mask.shape)} but image {i} is {tuple(image.shape[-2:])}; "
                         f"masks must have the image's size")
    return extractor(image[None], dtype)[0]  # [F, H, W]


def train_probe(extractor: FeatureExtractor, images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                num_classes: int, members: int = 10, lr: float = 1e-3, batch_pixels: int = 1024,
                max_epochs: int = 50, patience: int = 3, seed: int = 0, cache_dir: Path | None = None,
                progress: bool = True) -> PixelEnsemble:
    """Train the probe without ever holding more than one image's features in RAM.

    images: ``C×H×W`` tensors in [-1, 1]; masks: ``H×W`` long (any sequence: a lazy one keeps the
    raw images out of RAM too). Each image's features are computed, written to a float16 cache
    (``cache_dir``, kept; default a temporary folder removed at the end) and dropped; every member
    then streams its epochs from that cache (:class:`PixelCache`). Disk use: N_pixels·(2F + 2) bytes.
    Defaults: Adam lr 1e-3 (MDM App. A.2); batch 1024 pixels, at most 50 epochs, patience 3 are
    ours for CPU (MDM: batch 65536 on GPU; Baranchuk: 64).
    """
    _check_pairs(images, masks, num_classes)
    with tempfile.TemporaryDirectory(prefix="labeldiff-probe-") as tmp:
        cache = PixelCache(Path(cache_dir) if cache_dir else Path(tmp), extractor.num_features, batch_pixels)
        g = torch.Generator().manual_seed(seed)
        for i in tqdm(range(len(images)), desc="probe features → disk", disable=not progress, leave=False):
            cache.add(_image_features(extractor, images[i], masks[i], i, torch.float16), masks[i], g)
        return train_members(cache.batches, extractor.num_features, num_classes, members, lr, max_epochs,
                             patience, seed, progress)


def materialized_train_probe(extractor: FeatureExtractor, images: Sequence[torch.Tensor],
                             masks: Sequence[torch.Tensor], num_classes: int, members: int = 10, lr: float = 1e-3,
                             batch_pixels: int = 1024, max_epochs: int = 50, patience: int = 3, seed: int = 0,
                             progress: bool = True) -> PixelEnsemble:
    """The reference approach (ddpm-segmentation ``prepare_data``): the full float32 ``[N_pixels, F]``
    matrix of all labeled images in RAM, then the same members, seeds and stopping rule.
    RAM grows with N_pixels·F·4 bytes; used by ``labeldiff.bench`` to measure that."""
    _check_pairs(images, masks, num_classes)
    sizes = [m.numel() for m in masks]
    features = torch.empty(sum(sizes), extractor.num_features, dtype=torch.float32)
    labels = torch.empty(sum(sizes), dtype=torch.long)
    start = 0
    for i in tqdm(range(len(images)), desc="probe features → RAM", disable=not progress, leave=False):
        feats = _image_features(extractor, images[i], masks[i], i)
        features[start:start + sizes[i]] = feats.reshape(extractor.num_features, -1).T
        labels[start:start + sizes[i]] = masks[i].reshape(-1)
        start += sizes[i]
    return fit_pixels(features, labels, num_classes, members, lr, batch_pixels, max_epochs, patience, seed, progress)


# ---- prediction, saving --------------------------------------------------------------------------

@torch.no_grad()
def predict_probe(extractor: FeatureExtractor, ensemble: PixelEnsemble, image: torch.Tensor,
                  chunk_pixels: int = 65536) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``image [C, H, W]`` → ``labels [H, W]`` long, ``probs [K, H, W]``, ``uncertainty [H, W]`` (entropy
    of the mean probability, nats). The whole image goes through the UNet once (bring it to the
    size the probe was trained at first); the MLPs then run on ``chunk_pixels`` pixels at a time."""
    if extractor.num_features != ensemble.num_features:
        raise ValueError(f"the extractor gives {extractor.num_features} features per pixel but the probe "
                         f"was trained on {ensemble.num_features}; use the probe's own feature spec")
    h, w = image.shape[-2:]
    rows = extractor(image[None])[0].reshape(extractor.num_features, -1).T  # [H·W, F]
    probs = torch.cat([ensemble.predict_proba(rows[s:s + chunk_pixels]) for s in range(0, len(rows), chunk_pixels)])
    probs = probs.T.reshape(-1, h, w)
    return probs.argmax(0), probs, entropy(probs.movedim(0, -1))


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


def load_probe(folder: Path) -> tuple[PixelEnsemble, FeatureSpec, dict]:
    """Rebuild a probe from its folder alone; every tensor must be present with its shape.

    Returns ``(ensemble in eval mode, spec, the probe.json dict)``."""
    folder = Path(folder)
    if not (folder / PROBE_JSON).is_file():
        raise FileNotFoundError(f"{folder / PROBE_JSON} does not exist: is {folder} a saved probe?")
    meta = json.loads((folder / PROBE_JSON).read_text())
    ensemble = PixelEnsemble(meta["num_features"], meta["num_classes"], meta["members"], meta["seed"],
                             tuple(meta["hidden"]))
    state, own = load_weights(folder / PROBE_WEIGHTS), ensemble.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
           if k in state and state[k].shape != v.shape]
    if missing or unexpected or bad:
        raise ValueError(f"{folder / PROBE_WEIGHTS} does not match {PROBE_JSON}: {len(missing)} missing "
                         f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
                         f"{len(bad)} of the wrong shape (e.g. {bad[:2]})")
    ensemble.load_state_dict(state, strict=True)
    return ensemble.eval(), FeatureSpec.from_dict(meta["spec"]), meta


__all__ = ["FeatureSpec", "FeatureExtractor", "PixelMLP", "PixelEnsemble", "PixelCache", "capture_outputs",
           "default_spec", "default_blocks", "make_extractor", "hidden_sizes", "member_seed", "entropy",
           "train_members", "fit_pixels", "train_probe", "materialized_train_probe", "predict_probe",
           "save_probe", "load_probe"]
