"""Training the pixel-MLP probe on frozen diffusion-UNet features, with a memory-bounded trainer.

The network side (features, MLPs, the segmenter) is :mod:`labeldiff.models.probe`. The reference
implementation (yandex-research/ddpm-segmentation) keeps the ``[N_pixels, F]`` float32 features of
every labeled image in RAM (~210 GB for 50 images of 256², per its README). :func:`train_probe`
instead writes each image's features to an on-disk float16 cache as soon as they are computed and
streams shuffled minibatches back with plain file reads, so peak RSS does not grow with the number
of labeled images; :func:`materialized_train_probe` is the reference approach, kept for
``labeldiff.bench.probe_memory``. The ensemble trains on the CPU, where the cache is.
"""
from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from labeldiff import distributed
from labeldiff.pretrain.cost import duration, first_item
from labeldiff.models.probe import FeatureExtractor, PixelEnsemble, entropy, load_members, member_seed, save_members

# streaming shuffle: groups of SHUFFLE_CHUNKS chunks of CHUNK_ROWS pixel rows, each chunk from a random
# (image, offset), mixed in one buffer; a 1024-pixel batch then draws on up to 64 images
SHUFFLE_CHUNKS, CHUNK_ROWS = 64, 256


# ---- training ------------------------------------------------------------------------------------

BatchSource = Callable[[torch.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]]


# the reference's stopping rule (ddpm-segmentation train_interpreter.py): after REF_WARMUP_EPOCHS epochs,
# a member stops once `stop_iters` consecutive batches have not lowered its best batch loss
REF_WARMUP_EPOCHS = 4


def train_members(batches: BatchSource, num_features: int, num_classes: int, members: int, lr: float,
                  max_epochs: int, patience: int, seed: int, progress: bool, stop_iters: int = 0,
                  which: Sequence[int] | None = None) -> PixelEnsemble:
    """Train each member in turn on the epochs ``batches(generator)`` yields (``x [b, F]``, ``y [b]``);
    ``which``: only these member indices (a torchrun rank's share; the others keep their init and an
    empty history).

    Adam(lr), cross-entropy; a member stops when its mean epoch training loss has not improved for
    ``patience`` epochs (Baranchuk / MDM App. A.2 stop on the training loss) or after ``max_epochs``.
    ``stop_iters > 0`` adds the reference's per-iteration rule: from epoch ``REF_WARMUP_EPOCHS + 1`` on,
    stop once ``stop_iters`` batches in a row did not lower the best batch loss (on a few large images an
    epoch is hundreds of batches, so the epoch rule alone runs to ``max_epochs``).
    The per-member epoch losses (a stopped epoch: its mean so far) are kept in ``ensemble.history``.
    With ``progress``, the time of the first member trained is printed with what the others will take.
    """
    ensemble = PixelEnsemble(num_features, num_classes, members, seed)
    ensemble.history = [[] for _ in range(members)]
    mine = [m for m in range(members) if which is None or m in which]
    for m, net in enumerate(ensemble.members):
        if m not in mine:
            continue
        began = time.perf_counter()
        g = torch.Generator().manual_seed(member_seed(seed, m))
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        net.train()
        losses: list[float] = []
        best, stale = math.inf, 0
        best_batch, stale_batches, stopped = math.inf, 0, False
        bar = tqdm(range(max_epochs), desc=f"probe member {m + 1}/{members}", disable=not progress, leave=False)
        for epoch in bar:
            total, count = 0.0, 0
            for x, y in batches(g):
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                value = loss.item()
                total, count = total + value * len(y), count + len(y)
                if stop_iters > 0 and epoch >= REF_WARMUP_EPOCHS:
                    if value < best_batch:
                        best_batch, stale_batches = value, 0
                    else:
                        stale_batches += 1
                    if stale_batches >= stop_iters:
                        stopped = True
                        break
            losses.append(total / max(count, 1))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if losses[-1] < best:
                best, stale = losses[-1], 0
            else:
                stale += 1
            if stopped or stale >= patience:
                break
        bar.close()
        net.eval()
        ensemble.history[m] = losses
        if progress and m == mine[0] and len(mine) > 1:
            took, rest = time.perf_counter() - began, len(mine) - 1
            tqdm.write(f"probe: member {m + 1} took {duration(took)} ({len(losses)} epochs) → "
                       f"≈ {duration(took * rest)} for the other {rest} (its time × {rest}; each stops on its own "
                       f"loss, at most {max_epochs} epochs: ≤ {duration(took / len(losses) * max_epochs * rest)})")
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
               progress: bool = True, stop_iters: int = 0) -> PixelEnsemble:
    """Train an ensemble on in-memory pixels: ``features [N, F]``, ``labels [N]`` (long)."""
    return train_members(tensor_batches(features, labels.long(), batch_pixels), features.shape[1], num_classes,
                         members, lr, max_epochs, patience, seed, progress, stop_iters)


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

    def add(self, features: torch.Tensor | None, mask: torch.Tensor, g: torch.Generator,
            ignore_index: int | None = None) -> None:
        """Append one image: ``features [F, H, W]``, ``mask [H, W]``; pixels whose mask is
        ``ignore_index`` are no training sample. ``features=None`` draws the image's pixel order and
        records its size without writing it (another torchrun rank writes that image)."""
        order = torch.randperm(mask.numel(), generator=g)
        labels = mask.cpu().reshape(-1)[order]
        if ignore_index is not None:
            keep = labels != ignore_index
            order, labels = order[keep], labels[keep]
        if features is not None:
            rows = features.to("cpu", torch.float16).reshape(self.num_features, -1).T[order]  # one float16 copy
            fpath, lpath = self.paths(len(self.sizes))
            rows.numpy().tofile(fpath)
            labels.to(torch.int16).numpy().tofile(lpath)
        self.sizes.append(int(labels.numel()))

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
                progress: bool = True, ignore_index: int | None = None, stop_iters: int = 0) -> PixelEnsemble:
    """Train the probe without ever holding more than one image's features in RAM; pixels whose mask is
    ``ignore_index`` are not sampled.

    images: ``C×H×W`` tensors in [-1, 1]; masks: ``H×W`` long (any sequence: a lazy one keeps the
    raw images out of RAM too). Each image's features are computed, written to a float16 cache
    (``cache_dir``, kept; default a temporary folder removed at the end) and dropped; every member
    then streams its epochs from that cache (:class:`PixelCache`). Disk use: N_pixels·(2F + 2) bytes.
    Defaults: Adam lr 1e-3 (MDM App. A.2); batch 1024 pixels, at most 50 epochs, patience 3 are
    ours for CPU (MDM: batch 65536 on GPU; Baranchuk: 64); ``stop_iters``: see :func:`train_members`.
    """
    _check_pairs(images, masks, num_classes)
    rank, world = distributed.rank(), distributed.world_size()
    if world > 1 and cache_dir is None:
        raise ValueError("under torchrun the probe's ranks share their features through cache_dir: give a folder "
                         "every rank can read (run_probe uses the run folder)")
    with tempfile.TemporaryDirectory(prefix="labeldiff-probe-") as tmp:
        cache = PixelCache(Path(cache_dir) if cache_dir else Path(tmp), extractor.num_features, batch_pixels)
        g = torch.Generator().manual_seed(seed)  # pixel orders drawn in image order on every rank
        began = time.perf_counter()
        for i in tqdm(range(len(images)), desc="probe features → disk", disable=not progress, leave=False):
            mine = i % world == rank  # torchrun: rank r computes images r, r + N, …
            feats = _image_features(extractor, images[i], masks[i], i, torch.float16) if mine else None
            cache.add(feats, masks[i], g, ignore_index)
            if progress and i == 0 and len(images) > 1:
                took = time.perf_counter() - began
                tqdm.write(first_item("probe", took, len(images),
                                      f"the {len(images)} images (the first image's time × {len(images)})"))
        distributed.barrier()  # every image's features are on disk
        which = range(rank, members, world)  # and rank r trains members r, r + N, …
        ensemble = train_members(cache.batches, extractor.num_features, num_classes, members, lr, max_epochs,
                                 patience, seed, progress and rank == 0, stop_iters, which=which)
        if world > 1:
            ensemble = gather_members(ensemble, cache.folder, world)
        return ensemble


def gather_members(ensemble: PixelEnsemble, folder: Path, world: int) -> PixelEnsemble:
    """Under torchrun: every rank writes the members it trained (and their histories) to ``folder`` and
    reads the others', so each rank ends with the ensemble one process would have trained."""
    rank = distributed.rank()
    save_members(ensemble, range(rank, len(ensemble.members), world), folder / f"members-rank{rank}")
    distributed.barrier()
    for r in range(world):
        load_members(ensemble, folder / f"members-rank{r}")
    distributed.barrier()  # every rank has read every file before rank 0 removes the folder
    return ensemble


def materialized_train_probe(extractor: FeatureExtractor, images: Sequence[torch.Tensor],
                             masks: Sequence[torch.Tensor], num_classes: int, members: int = 10, lr: float = 1e-3,
                             batch_pixels: int = 1024, max_epochs: int = 50, patience: int = 3, seed: int = 0,
                             progress: bool = True) -> PixelEnsemble:
    """The reference approach (ddpm-segmentation ``prepare_data``): the full float32 ``[N_pixels, F]``
    matrix of all labeled images in RAM, then the same members, seeds and stopping rule.
    RAM grows with N_pixels·F·4 bytes; used by ``labeldiff.bench.probe_memory`` to measure that."""
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


# ---- prediction ----------------------------------------------------------------------------------

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
    rows = extractor(image[None])[0].reshape(extractor.num_features, -1).T  # [H·W, F] on the UNet's device
    rows = rows.to(next(ensemble.parameters()).device)
    probs = torch.cat([ensemble.predict_proba(rows[s:s + chunk_pixels]) for s in range(0, len(rows), chunk_pixels)])
    probs = probs.T.reshape(-1, h, w)
    return probs.argmax(0), probs, entropy(probs.movedim(0, -1))
