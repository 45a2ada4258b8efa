"""Which k labeled images a cell trains on: random, diverse or typical, optionally covering every class.

- ``random``: :func:`labeldiff.data.splits.select_subset` (the subset ``labeldiff finetune --labels k
  --seed s`` would pick). With ``require_all_classes`` the subset is redrawn deterministically
  (attempt i > 0 uses seed ``s·1_000_003 + i``) until it contains every class 0..K-1, up to
  :data:`MAX_TRIES` attempts.
- ``diverse``: k-center greedy (Sener & Savarese 2018, "core-set") on one feature vector per train
  image: the first center is the image closest to the mean feature, then each next one is the image
  farthest (Euclidean) from the centers chosen so far. Features are the mean-pooled decoder features
  of the pretrained UNet (the probe's :class:`~labeldiff.models.probe.FeatureExtractor` with the
  method's default blocks and timesteps, :func:`unet_features`), or, for scratch and non-UNet runs,
  the image resized to 16² (:func:`pixel_features`). The seed draws the candidate pool: a random
  half of the train images (:data:`POOL_FRACTION`, at least k; with ``require_all_classes`` a pool
  that contains every class), so diverse picks vary with the seed as random ones do and
  diverse − random compares two ways of choosing with their variance included. With
  ``require_all_classes``, once the remaining picks are no more than the missing classes, only
  images that add a missing class are candidates.
- ``typical``: TypiClust (Hacohen, Dekel & Weinshall 2022, "Active learning on a budget"), made for
  budgets of a few labels, where k-center greedy's farthest points are the pool's outliers. The same
  features and the same seeded candidate pool as ``diverse``; k-means (seeded) splits the pool into k
  clusters, and each pick is the most *typical* image (highest 1 / mean distance to its nearest
  :data:`TYPICAL_NEIGHBOURS` cluster-mates, at most half the cluster) of the cluster with the fewest
  picks so far, the largest first; clusters under :data:`MIN_CLUSTER_SIZE` images (in a pool too
  small for that, under half the mean cluster size) are passed over while bigger ones remain. With
  ``require_all_classes`` the same rule as ``diverse`` applies: once the remaining picks are no more
  than the missing classes, only images that add one are candidates.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from labeldiff.data.folders import LabeledFolder, Sample
from labeldiff.data.io import DataError
from labeldiff.data.splits import select_subset
from labeldiff.pretrain.cost import first_item

MAX_TRIES = 1000
POOL_FRACTION = 0.5  # diverse: k-center greedy runs on a seeded random pool of this fraction of the images
PIXEL_SIDE = 16
TYPICAL_NEIGHBOURS = 20  # typical: TypiClust's K nearest neighbours for the density
MIN_CLUSTER_SIZE = 5  # typical: TypiClust passes over smaller clusters


def class_sets(ds: LabeledFolder, stems: list[str], num_classes: int) -> dict[str, frozenset[int]]:
    """The classes present in each image's mask (an ignored value is no class)."""
    return {s.stem: frozenset(int(c) for c in np.unique(s.read_mask(num_classes)) if c != s.ignore_index)
            for s in ds.samples(stems)}


def check_coverable(classes: dict[str, frozenset[int]], num_classes: int, split_name: str = "train") -> None:
    """Raise when some class appears in no image of the split (no subset can contain it)."""
    present = frozenset().union(*classes.values()) if classes else frozenset()
    missing = sorted(set(range(num_classes)) - present)
    if missing:
        raise DataError(f"require_all_classes: class {missing[0]} appears in no image of the {split_name!r} split "
                        f"({len(classes)} images, classes present: {sorted(present)}); move images with class "
                        f"{missing[0]} into {split_name!r}, set data.num_classes, or set require_all_classes: false")


def _covers(chosen: list[str], classes: dict[str, frozenset[int]], num_classes: int) -> bool:
    return frozenset().union(*(classes[s] for s in chosen)) >= frozenset(range(num_classes))


def random_subset(stems: list[str], k: int, seed: int, classes: dict[str, frozenset[int]] | None = None,
                  num_classes: int = 0, tries: int = MAX_TRIES) -> list[str]:
    """``select_subset(stems, k, seed)``; with ``classes``, redrawn until every class is in the subset."""
    if classes is None:
        return select_subset(stems, k, seed)
    check_coverable({s: classes[s] for s in stems}, num_classes)
    for i in range(tries):
        chosen = select_subset(stems, k, seed if i == 0 else seed * 1_000_003 + i)
        if _covers(chosen, classes, num_classes):
            return chosen
    raise DataError(f"require_all_classes: none of {tries} random draws of k={k} of the {len(stems)} train images "
                    f"(seed {seed}) contains every class 0..{num_classes - 1}; raise k or set require_all_classes: false")


def _as_rows(features: np.ndarray, k: int) -> np.ndarray:
    """``features`` as float64 rows ``[N, F]``, checking that k of them can be picked."""
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    if not 1 <= k <= len(x):
        raise DataError(f"labels k={k} must be between 1 and the {len(x)} train images")
    return x


def _allowed(n: int, chosen: list[int], k: int, classes: list[frozenset[int]] | None, missing: set[int]) -> np.ndarray:
    """Which of ``n`` rows may be the next pick: not chosen yet, and once the picks left are no more
    than the ``missing`` classes, only rows that add one of them."""
    ok = np.ones(n, dtype=bool)
    ok[chosen] = False
    if missing and k - len(chosen) <= len(missing):
        ok &= np.array([bool(classes[i] & missing) for i in range(n)])
    return ok


def _check_covered(need: set[int], covered: set[int], k: int, rule: str) -> None:
    if need - covered:
        raise DataError(f"require_all_classes: k={k} {rule} picks cannot cover classes "
                        f"{sorted(need - covered)}; raise k or set require_all_classes: false")


def k_center_greedy(features: np.ndarray, k: int, classes: list[frozenset[int]] | None = None,
                    num_classes: int = 0) -> list[int]:
    """Indices of ``k`` rows of ``features [N, F]`` in pick order (see the module docstring).

    Ties go to the lower index, so the result is deterministic.
    """
    x = _as_rows(features, k)
    n = len(x)
    chosen: list[int] = []
    covered: set[int] = set()
    need = set(range(num_classes)) if classes is not None else set()
    score = -np.linalg.norm(x - x.mean(0), axis=1)  # first pick: closest to the mean
    while len(chosen) < k:
        ok = _allowed(n, chosen, k, classes, need - covered)
        if not ok.any():
            break
        i = int(np.flatnonzero(ok)[np.argmax(score[ok])])
        chosen.append(i)
        if classes is not None:
            covered |= classes[i]
        dist = np.linalg.norm(x - x[i], axis=1)
        score = dist if len(chosen) == 1 else np.minimum(score, dist)
    _check_covered(need, covered, k, "diverse")
    return chosen


def candidate_pool(stems: list[str], k: int, seed: int, classes: dict[str, frozenset[int]] | None = None,
                   num_classes: int = 0) -> list[int]:
    """Indices into ``stems`` of the seed's candidate pool for ``diverse`` and ``typical``: a random
    :data:`POOL_FRACTION` of the images (at least k; with ``classes``, one containing every class)."""
    if classes is not None:
        check_coverable({s: classes[s] for s in stems}, num_classes)
    size = min(len(stems), max(k, math.ceil(len(stems) * POOL_FRACTION)))
    pool = set(random_subset(stems, size, seed, classes, num_classes))
    return [i for i, s in enumerate(stems) if s in pool]


def _from_pool(pick, stems: list[str], features: np.ndarray, k: int, seed: int,
               classes: dict[str, frozenset[int]] | None, num_classes: int) -> list[str]:
    """The stems ``pick(pool features, pool class sets)`` chooses from the seed's candidate pool,
    sorted like :func:`select_subset`; ``features`` has one row per stem."""
    index = candidate_pool(stems, k, seed, classes, num_classes)
    sets = [classes[stems[i]] for i in index] if classes is not None else None
    return sorted(stems[index[i]] for i in pick(np.asarray(features)[index], sets))


def diverse_subset(stems: list[str], features: np.ndarray, k: int, seed: int,
                   classes: dict[str, frozenset[int]] | None = None, num_classes: int = 0) -> list[str]:
    """The stems :func:`k_center_greedy` picks from the seed's candidate pool."""
    return _from_pool(lambda x, sets: k_center_greedy(x, k, sets, num_classes), stems, features, k, seed, classes,
                      num_classes)


def typicality(x: np.ndarray, neighbours: int) -> np.ndarray:
    """Per row of ``x [N, F]``: 1 / (mean Euclidean distance to its ``neighbours`` nearest other rows
    + 1e-5), TypiClust's density. A single row has typicality 1."""
    n = len(x)
    if n == 1:
        return np.ones(1)
    sq = (x * x).sum(1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * x @ x.T, 0))
    np.fill_diagonal(d, np.inf)
    m = max(1, min(neighbours, n - 1))
    return 1 / (np.sort(d, axis=1)[:, :m].mean(1) + 1e-5)


def typical_picks(features: np.ndarray, k: int, seed: int, classes: list[frozenset[int]] | None = None,
                  num_classes: int = 0) -> list[int]:
    """Indices of ``k`` rows of ``features [N, F]`` in pick order, by TypiClust (module docstring)."""
    from sklearn.cluster import KMeans

    x = _as_rows(features, k)
    n = len(x)
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x) if k > 1 else np.zeros(n, int)
    members = [np.flatnonzero(labels == c) for c in range(k)]
    typical = np.zeros(n)
    for idx in members:
        typical[idx] = typicality(x[idx], min(TYPICAL_NEIGHBOURS, len(idx) // 2))
    big = min(MIN_CLUSTER_SIZE, max(1, n // (2 * k)))  # a tiny pool: half the mean cluster size
    chosen: list[int] = []
    covered: set[int] = set()
    need = set(range(num_classes)) if classes is not None else set()
    picks_in = [0] * k
    while len(chosen) < k:
        ok = _allowed(n, chosen, k, classes, need - covered)
        open_ = [c for c in range(k) if ok[members[c]].any()]
        if not open_:
            break
        sized = [c for c in open_ if len(members[c]) >= big] or open_
        c = min(sized, key=lambda c: (picks_in[c], -len(members[c]), c))
        idx = members[c][ok[members[c]]]
        i = int(idx[np.argmax(typical[idx])])
        chosen.append(i)
        picks_in[c] += 1
        if classes is not None:
            covered |= classes[i]
    _check_covered(need, covered, k, "typical")
    return chosen


def typical_subset(stems: list[str], features: np.ndarray, k: int, seed: int,
                   classes: dict[str, frozenset[int]] | None = None, num_classes: int = 0) -> list[str]:
    """The stems :func:`typical_picks` picks from the seed's candidate pool."""
    return _from_pool(lambda x, sets: typical_picks(x, k, seed, sets, num_classes), stems, features, k, seed,
                      classes, num_classes)


PICKERS = {"diverse": diverse_subset, "typical": typical_subset}  # the feature-based selections
RULES = {"diverse": "k-center greedy", "typical": "TypiClust"}  # what each is, for messages


def pixel_features(ds: LabeledFolder, stems: list[str], data_cfg) -> np.ndarray:
    """``[N, C·16·16]``: each image as the network would see it, resized to 16²."""
    from labeldiff.data.datasets import ScaledImages, resize_image

    loader = ScaledImages(data_cfg)
    return np.stack([resize_image(loader.image(s), (PIXEL_SIDE, PIXEL_SIDE)).flatten().numpy()
                     for s in ds.samples(stems)])


def unet_features(pre_dir: Path, samples: list[Sample], data_cfg) -> np.ndarray:
    """``[N, F]``: the probe's default decoder features of the pretrained UNet, mean-pooled per image
    (one row per sample).

    Images are brought to the network's scale (``data.scale`` in crop mode, ``size``² in resize mode)
    and fed whole, as the probe does.
    """
    import torch

    from labeldiff.config import replace
    from labeldiff.data.datasets import ScaledImages
    from labeldiff.models.probe import PaddedExtractor, make_extractor
    from labeldiff.runs import RunFolder

    run = RunFolder.open(pre_dir, flag="--pretrained").require_pretrain()
    pre = run.config
    extractor = PaddedExtractor(make_extractor(run.backbone(), pre, noise_seed=0))
    loader = ScaledImages(replace(data_cfg, channels=pre.data.channels))
    feats = []
    began = time.perf_counter()
    with torch.no_grad():
        for i, s in enumerate(tqdm(samples, desc="decoder features", unit="image", leave=False,
                                   disable=len(samples) < 50)):
            feats.append(extractor(loader.image(s)[None]).mean(dim=(2, 3))[0].cpu().numpy())
            if i == 0 and len(samples) > 1:
                took = time.perf_counter() - began
                tqdm.write(first_item("select", took, len(samples),
                                      f"the {len(samples)} candidates (fed whole, at the network's scale)"))
    return np.stack(feats)


def images_to_label(pre_dir: Path, images: Path, k: int, seed: int = 0, rule: str = "typical") -> list[Sample]:
    """The ``k`` images under ``images`` (a folder of images, a dataset root with ``images/``, or an
    nnU-Net raw dataset, whose slices along the run's axis are the candidates) to label first: the pick
    a study's ``select: diverse`` (k-center greedy) or ``select: typical`` (TypiClust) makes from a
    seeded random half, on the decoder features of the pretrained run ``pre_dir``. A dataset root's test split (the run's ``test_split`` of
    its ``split.json``, or the nnU-Net test cases) is left out, as pretraining leaves it out: an image
    scored later is never one to label. Returns the picked samples."""
    from dataclasses import replace

    from labeldiff.data.folders import dataset_root
    from labeldiff.data.nnunet import is_nnunet_raw
    from labeldiff.data.splits import pretraining_samples
    from labeldiff.runs import RunFolder

    pre = RunFolder.open(pre_dir, flag="--pretrained").require_pretrain().config
    root = dataset_root(Path(images))
    volumes = is_nnunet_raw(root)
    # the candidates are what pretraining on ``root`` would read: never its test split
    data = replace(pre.data, path=str(root), split_file=None, include_test=False)
    samples, excluded, _ = pretraining_samples(data)
    unit = "slices" if volumes else "images"
    left_out = (f"; the {len(excluded)} {unit} of split {data.test_split!r} are left out (scored later, never "
                f"labeled)" if excluded else "")
    print(f"candidates: {len(samples)} {unit}{left_out}")
    if not 1 <= k <= len(samples):
        raise DataError(f"--k {k}: {images} has {len(samples)} {unit}; choose k from 1 to {len(samples)}")
    stems = [s.stem for s in samples]
    if rule not in PICKERS:
        raise DataError(f"selection {rule!r}: choose one of {', '.join(PICKERS)}")
    picks = set(PICKERS[rule](stems, unet_features(pre_dir, samples, pre.data), k, seed))
    return [s for s in samples if s.stem in picks]
