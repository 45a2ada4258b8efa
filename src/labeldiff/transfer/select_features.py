"""Automatic choice of the probe's decoder blocks and timesteps from the k labeled images alone.

Baranchuk et al. and the MDM paper (App. B: Table 6 sweeps t, Fig. 6 looks at blocks) choose the
UNet blocks and the diffusion steps t of the pixel probe by hand; yandex-research/ddpm-segmentation
and MDM's code leave them as config fields to tune. Here the choice is made with the labeled images
only:

1. :func:`candidate_specs` lists a small grid of :class:`~labeldiff.transfer.probe.FeatureSpec`.
2. The frozen UNet runs **once per (image, t)** for the union of all candidates' timesteps, with hooks
   on all up blocks, and only ``pixels_per_image`` sampled pixels of each image are kept
   (class-balanced where the image allows, seeded): ``[P, F_all]`` rows per image.
3. Each candidate is a set of columns of those rows (:func:`feature_columns`), scored under
   cross-validation over images (:func:`fold_groups`): one :class:`~labeldiff.transfer.probe.PixelMLP`
   (``fit_pixels`` with ``members=1``, a few epochs) is trained on the other images' pixels and scored
   on the held-out image's pixels (:func:`foreground_iou`).
4. The best mean score wins; candidates within ``tie_tolerance`` of it count as tied and the one with
   the fewest features wins (then the earlier one in the grid, whose first entry is the default spec).

Selection is cheap next to the final probe: the features of every candidate come from the same UNet
passes, and each score costs one small MLP fitted on ``(k − 1) · pixels_per_image`` pixels.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from labeldiff.evaluate.metrics import iou_from_stats
from labeldiff.models.probe import FeatureExtractor, FeatureSpec, default_spec, make_extractor
from labeldiff.transfer.probe import fit_pixels
from labeldiff.errors import ConfigError, DataError

DIFFUSION_METHODS = ("ddpm", "mdm", "hybrid")  # time embedding trained over t = 0..T−1 (mdm: 1..T)
CLEAN_METHODS = ("mae", "supervised")  # time embedding only ever saw t = 0
SINGLE_TIMESTEPS = (0, 50, 150, 250)  # MDM App. B, Table 6 (it also tries 650, best for neither DDPM nor MDM)
MULTI_TIMESTEPS = default_spec("ddpm", 1).timesteps  # (50, 150, 250): Baranchuk's official setting
MAX_FOLDS = 5  # leave-one-image-out up to 5 images, 5-fold over images beyond

ExtractorFactory = Callable[[FeatureSpec], FeatureExtractor]


def candidate_specs(n_up_blocks: int, method: str, num_timesteps: int | None = None) -> list[FeatureSpec]:
    """The grid of feature specs that :func:`select_spec` scores, the default spec first.

    Block sets: the default pair ``D`` of :func:`default_blocks`, every single up block next to it
    (``|b − d| ≤ 1`` for some d in D: all blocks of the 2- and 3-level UNets we train; deeper UNets
    do not try their coarsest blocks alone, only within ``A``), and all blocks ``A``.
    Timesteps, for diffusion-trained methods (ddpm, mdm, hybrid): each single t in (0, 50, 150, 250)
    and Baranchuk's multi-t set (50, 150, 250); for mae and supervised (whose time embedding only
    ever saw t = 0) only (0,). These are MDM's Table 6 timesteps without 650. The grid is not the
    full product (25 specs for 3 blocks) but:

    - the default spec (``default_spec(method, n)``);
    - ``D`` at every timestep set: which noise level suits the paper's blocks;
    - every single block at every single t: what one block at one noise level carries;
    - ``A`` at the multi-t set and at the method's default timesteps: the richest features.

    That is 18 specs for ddpm and 19 for mdm / hybrid on a 3-level UNet, 5 for mae / supervised,
    22 for ddpm on the 6-level GPU recipes. Timesteps ≥ ``num_timesteps`` (the run's T) are dropped.
    """
    if n_up_blocks < 1:
        raise ValueError(f"the UNet has {n_up_blocks} up blocks; need at least 1")
    if method in DIFFUSION_METHODS:
        singles, multis = SINGLE_TIMESTEPS, [MULTI_TIMESTEPS]
    elif method in CLEAN_METHODS:
        singles, multis = (0,), []
    else:
        raise ConfigError(f"no feature grid for pretext method {method!r}: the pixel probe reads the UNet of "
                         f"{', '.join(DIFFUSION_METHODS + CLEAN_METHODS)} runs")
    limit = num_timesteps if num_timesteps is not None else math.inf
    fits = [(t,) for t in singles if t < limit]
    multis = [tuple(t for t in ts if t < limit) for ts in multis]
    t_sets = fits + [ts for ts in multis if len(ts) > 1]
    default = default_spec(method, n_up_blocks)
    d_t = tuple(t for t in default.timesteps if t < limit) or (0,)
    pair, every = default.blocks, tuple(range(n_up_blocks))
    near = [b for b in every if any(abs(b - d) <= 1 for d in pair)]
    grid = [FeatureSpec(pair, d_t)]
    grid += [FeatureSpec(pair, ts) for ts in t_sets]
    grid += [FeatureSpec((b,), ts) for b in near for ts in fits]
    grid += [FeatureSpec(every, ts) for ts in multis + [d_t] if ts]
    return list(dict.fromkeys(grid))  # drop repeats, keep the first


def feature_columns(full: FeatureSpec, block_channels: Sequence[int], spec: FeatureSpec) -> torch.Tensor:
    """Column indices ``[F_spec]`` of ``spec``'s features inside ``full``'s feature vector.

    Relies on :class:`FeatureExtractor`'s layout: for each t of ``spec.timesteps`` in order, the
    outputs of ``spec.blocks`` in order, block b contributing ``block_channels[b's position]``
    channels. So (t, b) starts at ``i_t · Σ widths + Σ widths of the blocks before b`` in ``full``,
    and the columns listed here, in ``spec``'s own order, are exactly an extractor for ``spec``.
    """
    width = dict(zip(full.blocks, block_channels))
    missing = [b for b in spec.blocks if b not in width] + [t for t in spec.timesteps if t not in full.timesteps]
    if missing:
        raise ValueError(f"{spec} is not part of the extracted features {full}: {missing} missing")
    start_b = dict(zip(full.blocks, np.cumsum([0, *block_channels[:-1]]).tolist()))
    per_t = sum(block_channels)
    cols = [torch.arange(full.timesteps.index(t) * per_t + start_b[b], full.timesteps.index(t) * per_t
                         + start_b[b] + width[b]) for t in spec.timesteps for b in spec.blocks]
    return torch.cat(cols)


def fold_groups(n_images: int, seed: int = 0) -> list[tuple[int, ...]]:
    """The held-out images of each fold: one per image up to ``MAX_FOLDS`` images (leave-one-out),
    else ``MAX_FOLDS`` near-equal groups of a seeded permutation. Every image is held out once."""
    if n_images < 2:
        raise DataError(f"cross-validation needs at least 2 (pseudo-)images, got {n_images}")
    if n_images <= MAX_FOLDS:
        return [(i,) for i in range(n_images)]
    perm = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed)).numpy()
    return [tuple(sorted(int(i) for i in g)) for g in np.array_split(perm, MAX_FOLDS)]


def balanced_pixels(labels: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample at most ``n`` of the pixels ``labels [N]``, as evenly over the classes as they allow.

    Each class present gets ``n / (number of classes)``; what a small class cannot use goes to the
    others. Returns ``(indices [P] sorted, weights [P])``: the weight of a sampled pixel of class c is
    ``N_c / P_c``, the number of the region's pixels it stands for (so weighted counts estimate the
    whole region's counts).
    """
    classes, counts = labels.unique(return_counts=True)
    order = counts.argsort().tolist()  # smallest class first: it gives up its unused share
    take, left = {}, n
    for rank, i in enumerate(order):
        take[i] = min(int(counts[i]), left // (len(order) - rank))
        left -= take[i]
    idx, wts = [], []
    for i, c in enumerate(classes.tolist()):
        where = (labels == c).nonzero().flatten()
        pick = where[torch.randperm(len(where), generator=g)[:take[i]]]
        idx.append(pick)
        wts.append(torch.full((len(pick),), float(counts[i]) / max(take[i], 1)))
    idx, wts = torch.cat(idx), torch.cat(wts)
    order = idx.argsort()
    return idx[order], wts[order]


def weighted_stats(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, num_classes: int) -> np.ndarray:
    """Per-class ``[K, 3]`` (tp, fp, fn) of ``pred [P]`` vs ``target [P]``, each pixel counted ``weights [P]``
    times (``confusion_stats`` with weights)."""
    idx = target.long().numpy() * num_classes + pred.long().numpy()
    cm = np.bincount(idx, weights=weights.double().numpy(), minlength=num_classes ** 2).reshape(num_classes, -1)
    tp = np.diag(cm)
    return np.stack([tp, cm.sum(0) - tp, cm.sum(1) - tp], axis=1)


def foreground_iou(stats: np.ndarray) -> float:
    """Mean IoU over the foreground classes 1..K−1 of ``stats [K, 3]``; a class absent from both the
    prediction and the ground truth is NaN and skipped (all absent: NaN). For K = 2: the foreground IoU."""
    fg = iou_from_stats(stats)[1:]
    return float(np.nanmean(fg)) if np.isfinite(fg).any() else math.nan


@dataclass
class PixelSample:
    """The sampled pixels of one (pseudo-)image: ``features [P, F_all]``, ``labels [P]``, ``weights [P]``
    (see :func:`balanced_pixels`) and ``pixels [P]``, their flat indices ``y · W + x`` in the image."""

    features: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    pixels: torch.Tensor


def check_labeled(images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], num_classes: int) -> None:
    """Stop with one line naming the image and the fix on inputs selection cannot use."""
    if len(images) != len(masks) or not len(images):
        raise DataError(f"need the same, non-zero number of images and masks (got {len(images)} and {len(masks)})")
    if num_classes < 2:
        raise DataError(f"num_classes={num_classes}: need at least 2 classes (background and one foreground)")
    for i, (x, m) in enumerate(zip(images, masks)):
        if x.dim() != 3 or m.dim() != 2 or tuple(m.shape) != tuple(x.shape[-2:]):
            raise DataError(f"mask {i} is {tuple(m.shape)} but image {i} is {tuple(x.shape)}; images must be "
                             f"[C, H, W] and masks [H, W] of the image's size")
        if m.numel() and (m.min() < 0 or m.max() >= num_classes):
            raise DataError(f"mask {i} has values {int(m.min())}..{int(m.max())} outside the classes "
                             f"0..{num_classes - 1}; fix the mask or pass the right num_classes")
    if not any(bool((m > 0).any()) for m in masks):
        raise DataError(f"no labeled foreground pixel in the {len(masks)} mask(s): every pixel is class 0, so "
                         f"there is nothing to choose features for; check that the masks were read correctly")


def sample_features(factory: ExtractorFactory, full: FeatureSpec, images: Sequence[torch.Tensor],
                    masks: Sequence[torch.Tensor], pixels_per_image: int, seed: int,
                    progress: bool = False) -> list[PixelSample]:
    """The sampled pixels' ``full`` features of every image (of the two halves of it when there is one image).

    The UNet runs once per (image, t): one extractor per t of ``full.timesteps``, all blocks each,
    so only one t's ``[F_t, H, W]`` map is in memory at a time; the rows are laid out as a single
    extractor for ``full`` would lay them out (t-major, then blocks).
    """
    g = torch.Generator().manual_seed(seed)
    extractors = [factory(FeatureSpec(full.blocks, (t,))) for t in full.timesteps]
    samples = []
    for i in tqdm(range(len(images)), desc="selection features", disable=not progress, leave=False):
        h, w = masks[i].shape
        flat = masks[i].reshape(-1).long()
        if len(images) == 1:  # two pseudo-images: columns < w // 2 and the rest
            left = (torch.arange(h * w) % w) < w // 2
            regions = [left.nonzero().flatten(), (~left).nonzero().flatten()]
        else:
            regions = [torch.arange(h * w)]
        picks = []
        for r in regions:
            idx, wts = balanced_pixels(flat[r], pixels_per_image, g)
            picks.append((r[idx], wts))
        rows: list[list[torch.Tensor]] = [[] for _ in picks]
        for ex in extractors:
            f = ex(images[i][None])[0].reshape(ex.num_features, -1).cpu()  # [F_t, H·W]: scored on the CPU
            for j, (idx, _) in enumerate(picks):
                rows[j].append(f[:, idx].T)
        samples += [PixelSample(torch.cat(r, 1), flat[idx], wts, idx) for r, (idx, wts) in zip(rows, picks)]
    return samples


def held_out_score(ensemble, sample: PixelSample, cols: torch.Tensor, num_classes: int) -> float:
    """Foreground mean IoU of ``ensemble`` on a held-out sample's columns ``cols``, each sampled pixel
    weighted by the pixels of its class it stands for: an estimate of the whole image's IoU."""
    pred = ensemble.predict_proba(sample.features[:, cols]).argmax(-1)
    return foreground_iou(weighted_stats(pred, sample.labels, sample.weights, num_classes))


def pick_best(table: Sequence[dict], tie_tolerance: float = 1e-3) -> int:
    """Index of the winning row: highest ``mean``; rows within ``tie_tolerance`` of it are tied and
    the fewest ``n_features`` wins, then the earliest row. NaN means never win unless all are NaN."""
    means = np.array([r["mean"] for r in table], dtype=float)
    if not np.isfinite(means).any():
        raise DataError("no candidate could be scored: every held-out image had an undefined IoU")
    top = np.nanmax(means)
    tied = [i for i, m in enumerate(means) if np.isfinite(m) and m >= top - tie_tolerance]
    return min(tied, key=lambda i: (table[i]["n_features"], i))


def select_spec(extractor_factory_or_unet: ExtractorFactory | nn.Module, run_cfg, images: Sequence[torch.Tensor],
                masks: Sequence[torch.Tensor], num_classes: int, seed: int = 0, pixels_per_image: int = 4096,
                max_epochs: int = 10, progress: bool = True, *, candidates: Sequence[FeatureSpec] | None = None,
                noise_seed: int = 0, patience: int = 3, lr: float = 1e-3, batch_pixels: int = 1024,
                tie_tolerance: float = 1e-3) -> tuple[FeatureSpec, list[dict]]:
    """Choose the probe's feature spec by cross-validation over the labeled images.

    extractor_factory_or_unet: the pretrained UNet (its extractors are ``make_extractor(unet,
        run_cfg, spec, noise_seed)``, the noise and scheduler the final probe uses: DDPM noise for
        ``ddpm`` runs, the clean image with t otherwise), or any ``spec -> FeatureExtractor``.
    run_cfg: the pretraining run's RunConfig: its method picks the grid (:func:`candidate_specs`)
        and its T drops timesteps beyond it. Only needed with a UNet or without ``candidates``.
    images: ``[C, H, W]`` tensors in [-1, 1] (sizes may differ); masks: ``[H, W]`` long in 0..K−1.

    Folds (:func:`fold_groups`): leave-one-image-out for k ≤ 5, 5-fold over images beyond. With
    k = 1 the image's left half (columns < W/2) and right half are two pseudo-images: features are
    computed on the whole image (as the final probe sees them) and the halves only split the pixels,
    so the score is optimistic near the cut (receptive fields cross it) and is only meaningful if
    both halves show the structure; prefer k ≥ 2.

    Score of a candidate on a fold: one PixelMLP (``fit_pixels``, members=1, ``max_epochs`` epochs at
    most, early stop after ``patience``, seed ``seed``) trained on the sampled pixels of the other
    images, then the foreground mean IoU (:func:`foreground_iou`) of each held-out image, from its
    sampled pixels weighted back to the image's class frequencies (an estimate of the whole-image IoU
    ``labeldiff evaluate`` reports); the fold's score is the mean over its held-out images, the
    candidate's ``mean`` the mean over folds (NaN folds skipped).

    Returns ``(best spec, table)``: per candidate in grid order ``{"spec", "scores" (per fold),
    "mean", "n_features", "seconds" (its probe fits), "best"}``, plain JSON-able values.
    """
    if pixels_per_image < 2:
        raise ValueError(f"pixels_per_image={pixels_per_image}: need at least 2 pixels per image")
    check_labeled(images, masks, num_classes)
    if isinstance(extractor_factory_or_unet, nn.Module):
        unet = extractor_factory_or_unet
        if run_cfg is None:
            raise ValueError("select_spec with a UNet needs the run's config (run_cfg) to noise as it was trained")

        def factory(spec: FeatureSpec) -> FeatureExtractor:
            return make_extractor(unet, run_cfg, spec, noise_seed)
    else:
        factory = extractor_factory_or_unet
    n_up = len(factory(FeatureSpec((0,), (0,))).unet.up_blocks)
    if candidates is None:
        if run_cfg is None:
            raise ValueError("pass run_cfg (its pretext method picks the candidate grid) or candidates")
        candidates = candidate_specs(n_up, run_cfg.corruption.method, run_cfg.corruption.num_timesteps)
    candidates = list(candidates)
    if not candidates:
        raise ValueError("no candidate feature specs to choose from")
    full = FeatureSpec(tuple(range(n_up)), tuple(sorted({t for c in candidates for t in c.timesteps})))
    widths = factory(full).block_channels

    samples = sample_features(factory, full, images, masks, pixels_per_image, seed, progress)
    folds = fold_groups(len(samples), seed)
    table = []
    bar = tqdm(total=len(candidates) * len(folds), desc="feature selection", disable=not progress, leave=False)
    for spec in candidates:
        cols = feature_columns(full, widths, spec)
        start, scores = time.perf_counter(), []
        for held in folds:
            train = [s for j, s in enumerate(samples) if j not in held]
            ens = fit_pixels(torch.cat([s.features[:, cols] for s in train]), torch.cat([s.labels for s in train]),
                             num_classes, members=1, lr=lr, batch_pixels=batch_pixels, max_epochs=max_epochs,
                             patience=patience, seed=seed, progress=False)
            per_image = [held_out_score(ens, samples[j], cols, num_classes) for j in held]
            scores.append(float(np.nanmean(per_image)) if np.isfinite(per_image).any() else math.nan)
            bar.update()
        finite = [x for x in scores if math.isfinite(x)]
        table.append({"spec": spec.to_dict(), "scores": scores, "mean": float(np.mean(finite)) if finite else math.nan,
                      "n_features": len(cols), "seconds": round(time.perf_counter() - start, 3), "best": False})
        bar.set_postfix(best=f"{max((r['mean'] for r in table if math.isfinite(r['mean'])), default=0):.3f}")
    bar.close()
    best = pick_best(table, tie_tolerance)
    table[best]["best"] = True
    return candidates[best], table


def format_selection(table: Sequence[dict]) -> str:
    """A markdown table of the candidates, best mean first, the chosen row marked ``→``."""
    def key(r):
        return (-r["mean"] if math.isfinite(r["mean"]) else math.inf, r["n_features"])

    def num(x):
        return f"{x:.3f}" if math.isfinite(x) else "nan"

    lines = ["| | blocks | timesteps | features | fg IoU (mean over folds) | per fold | s |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(table, key=key):
        spec = r["spec"]
        lines.append(f"| {'→' if r.get('best') else ''} | {','.join(map(str, spec['blocks']))} | "
                     f"{','.join(map(str, spec['timesteps']))} | {r['n_features']} | {num(r['mean'])} | "
                     f"{' '.join(num(x) for x in r['scores'])} | {r['seconds']:.2f} |")
    return "\n".join(lines)


__all__ = ["candidate_specs", "feature_columns", "fold_groups", "balanced_pixels", "weighted_stats",
           "foreground_iou", "PixelSample", "check_labeled", "sample_features", "held_out_score", "pick_best",
           "select_spec", "format_selection", "DIFFUSION_METHODS", "CLEAN_METHODS", "SINGLE_TIMESTEPS",
           "MULTI_TIMESTEPS"]
