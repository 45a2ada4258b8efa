"""Splits and subsets: which images train and which test, without a leak.

A group split keeps every group (a video, a patient) on one side (:func:`group_split`); a volume
dataset is split into slabs of each case (:func:`slab_split`); :func:`write_split` makes either and is
the one writer of split files (``labeldiff split`` and a study's ``data.split``). Pretraining leaves the
test split out (:func:`pretraining_exclusions`); fine-tuning draws its k labeled images reproducibly
(:func:`select_subset`).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch

from labeldiff.config import DataConfig
from labeldiff.data.folders import (LabeledFolder, Sample, VolumeFolder, dataset_root, read_splits, resolve_intensity,
                                    split_path, unlabeled_samples)
from labeldiff.data.io import DataError
from labeldiff.data.nnunet import is_nnunet_raw
from labeldiff.errors import ConfigError
from labeldiff.fs import atomic_write_text


def group_split(stems: list[str], groups: dict[str, object], test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Split ``stems`` into ``train`` / ``test`` so that no group (e.g. a video) is on both sides.

    Whole groups are drawn at random (``seed``) into ``test`` until it holds at least
    ``test_fraction`` of the images. Every stem must have a group.
    """
    missing = [s for s in stems if s not in groups]
    if missing:
        raise DataError(f"{len(missing)} images have no group (e.g. {missing[:3]}); the groups file must map "
                        f"every image stem to its group (video, patient, …)")
    if not 0 < test_fraction < 1:
        raise DataError(f"test fraction must be in (0, 1), got {test_fraction}")
    by_group: dict[str, list[str]] = {}
    for s in stems:
        by_group.setdefault(str(groups[s]), []).append(s)
    if len(by_group) < 2:
        raise DataError("all images are in one group; a group split needs at least two groups")
    order = sorted(by_group)
    perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
    test_groups: list[str] = []
    n_test = 0
    for i in perm:
        if n_test >= test_fraction * len(stems) or len(test_groups) == len(order) - 1:
            break
        test_groups.append(order[i])
        n_test += len(by_group[order[i]])
    test = sorted((s for g in test_groups for s in by_group[g]), key=_natural)
    train = sorted((s for s in stems if str(groups[s]) not in set(test_groups)), key=_natural)
    return {"train": train, "test": test,
            "train_groups": sorted(set(order) - set(test_groups), key=_natural),
            "test_groups": sorted(test_groups, key=_natural)}


def _natural(s: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s))


def slab_split(ds: VolumeFolder, train_fraction: float, gap: int = 4) -> dict:
    """Per labeled case, its lower slab (the first ``train_fraction`` of its labeled slices) to train and
    the slices after ``gap`` more to test: the CT paper's "label a few slices of one slab, predict a
    disjoint one"."""
    if not 0 < train_fraction < 1:
        raise DataError(f"slab_train must lie in (0, 1), got {train_fraction}")
    split: dict = {"train": [], "test": []}
    labeled = ds.stems("train")
    for case in ds.cases["train"]:
        part = slab_splits([s for s in labeled if ds.case_of(s) == case.name], train_frac=train_fraction, gap=gap)
        split["train"] += part["train"]
        split["test"] += part["test"]
    split["note"] = (f"slabs along axis {ds.axis}: per case the first {train_fraction:.0%} of the labeled slices "
                     f"train, the rest after a gap of {gap} test")
    return split


def slab_splits(stems: list[str], train_frac: float = 0.4, gap: int = 4) -> dict[str, list[str]]:
    """Two disjoint contiguous slabs of one case's slices (in order): the first ``train_frac`` of them for
    training, the rest (after ``gap`` slices left out so neighbours do not leak) for testing."""
    n_train = max(1, int(len(stems) * train_frac))
    return {"train": stems[:n_train], "test": stems[n_train + gap:], "all": list(stems)}


def write_split(data: Path, out: Path, *, groups: Path | None = None, test_fraction: float = 0.3, seed: int = 0,
                slab_train: float | None = None, gap: int = 4, axis: int = 2, spacing=None,
                overwrite: bool = False) -> tuple[dict, str]:
    """Split the labeled dataset at ``data`` into train and test, write the split to ``out``
    (:func:`save_split`) and return it with a line saying what it is.

    A 2D dataset is split by :func:`group_split` with the groups of ``groups`` (JSON: image stem →
    group), else of ``DATA/sequences.json`` when there is one, else every image its own group (a random
    split); ``test_fraction`` and ``seed`` as there. A volume dataset (nnU-Net raw) is split into slabs
    (:func:`slab_split`: ``slab_train``, ``gap``, slices along ``axis`` of the grid resampled to
    ``spacing``, as the runs will cut them). An existing ``out`` is refused before anything is read
    unless ``overwrite``."""
    data, out = Path(data), Path(out)
    refuse_replacing(out, overwrite)
    if is_nnunet_raw(data):
        if slab_train is None:
            raise ConfigError("a volume dataset is split into slabs: give --slab-train FRACTION (e.g. 0.5) and "
                              "optionally --gap N slices [4]")
        if groups is not None:
            raise ConfigError(f"{data} is a volume dataset, split into slabs of each case: --groups applies to 2D "
                              f"image datasets; leave it out")
        split = slab_split(VolumeFolder(data, axis=axis, spacing=spacing), slab_train, gap)
        what = f"train {len(split['train'])} slices, test {len(split['test'])} slices ({split['note']})"
    else:
        if slab_train is not None:
            raise ConfigError(f"{data} is a 2D image dataset: --slab-train (slab_train) splits a volume dataset "
                              f"(an nnU-Net raw folder); leave it out, or give --groups for a group split")
        ds = LabeledFolder(data)
        groups_file = Path(groups) if groups is not None else data / "sequences.json"
        if groups is not None and not groups_file.is_file():
            raise DataError(f"groups file {groups_file} does not exist; give --groups FILE (JSON: image stem → group)")
        grouped = groups_file.is_file()
        by = json.loads(groups_file.read_text()) if grouped else {stem: stem for stem in ds.images}
        split = group_split(sorted(ds.images), by, test_fraction, seed)
        if grouped:
            what = (f"train {len(split['train'])} images from groups {split['train_groups']}, test "
                    f"{len(split['test'])} images from groups {split['test_groups']}")
        else:
            what = (f"a random split (no --groups, no sequences.json; seed {seed}): train {len(split['train'])} "
                    f"images, test {len(split['test'])}; images of one patient or video belong on one side: give "
                    f"--groups FILE for that")
    save_split(out, split, overwrite)
    return split, what


def refuse_replacing(path: Path, overwrite: bool) -> None:
    """Refuse to write a split file over an existing one without ``overwrite``, or over a folder."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise DataError(f"{path} exists; runs trained on it would be scored on another split if it changed: pass "
                        f"--overwrite to replace it (evaluate then refuses runs that trained on the new test images), "
                        f"or choose another --out")
    if path.is_dir():
        raise DataError(f"--out {path} is a folder; give the split file to write, e.g. {path / 'split.json'}")


def save_split(path: Path, split: dict, overwrite: bool = False) -> None:
    """Write ``split`` (``{"train": [stems], "test": [stems], ...}``) to the split file ``path``
    atomically. An existing file is replaced only with ``overwrite``; one that already holds this split
    is left as it is, so the record runs keep of the split they trained under stays true."""
    path = Path(path)
    refuse_replacing(path, overwrite)
    if path.is_file():
        try:
            if json.loads(path.read_text()) == split:
                return
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    atomic_write_text(path, json.dumps(split, indent=1))


def select_subset(stems: list[str], k: int, seed: int, split_name: str = "train", unit: str = "images") -> list[str]:
    """Pick ``k`` stems reproducibly for ``seed`` (order-independent of the input order)."""
    if k < 1:
        raise DataError(f"--labels must be at least 1 (got {k})")
    if k > len(stems):
        raise DataError(f"--labels {k} is larger than the {split_name!r} split ({len(stems)} {unit}); "
                        f"use --labels {len(stems)} or fewer")
    return sorted(random.Random(seed).sample(sorted(stems), k))


STEM_LIST_SUFFIXES = (".txt", ".tsv", ".csv", ".list")


def labeled_stems(values: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The stems ``--labeled`` names: ``STEM,STEM,…`` as given, or one file of stems, one a line (blank
    lines and ``#`` comments skipped; a line's text before a tab is its stem, so the ``stem<TAB>file`` lines
    ``labeldiff select --out`` writes are read as they are). Duplicates are dropped, order kept."""
    values = [str(v).strip() for v in values if str(v).strip()]
    if len(values) == 1 and (Path(values[0]).is_file() or Path(values[0]).suffix in STEM_LIST_SUFFIXES):
        path = Path(values[0])
        if not path.is_file():
            raise DataError(f"--labeled {path}: no such file; give STEM,STEM,… or a file of stems, one a line "
                            f"(`labeldiff select --out` writes one)")
        values = [line.split("\t")[0].strip() for line in path.read_text(errors="replace").splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
        if not values:
            raise DataError(f"--labeled {path}: the file names no image; write one stem a line")
    return tuple(dict.fromkeys(values))


def pretraining_exclusions(cfg: DataConfig) -> tuple[list[str], str]:
    """The stems that unlabeled pretraining must not read, and a sentence saying why.

    By default the test split (``cfg.test_split`` of ``cfg.split_file`` or the dataset's
    ``split.json``) is left out, so a model is never pretrained on the images it is scored on.
    ``cfg.include_test`` opts in to the transductive protocol of the MDM paper (Table 1 pretrains
    on all 44 MoNuSeg images, test included). A folder with no split file has nothing to exclude.
    """
    root = dataset_root(Path(cfg.path))
    if is_nnunet_raw(root):
        ds = VolumeFolder(root, cfg.split_file, cfg.axis, spacing=cfg.spacing)
        splits = {cfg.test_split: ds.stems(cfg.test_split)} if ds.has_split(cfg.test_split) else {}
    else:
        splits = read_splits(split_path(root, cfg.split_file))
    test = splits.get(cfg.test_split, [])
    if cfg.include_test:
        return [], (f"include_test: pretraining also reads the {len(test)} images of split "
                    f"{cfg.test_split!r} (the transductive protocol of the MDM paper)")
    if not test:
        where = "no split file" if not splits else f"no split {cfg.test_split!r} in the split file"
        return [], f"{where}: pretraining reads every image"
    return test, (f"pretraining leaves out the {len(test)} images of split {cfg.test_split!r} "
                  f"(--include-test, or include_test: true in a study, reads them too: the MDM paper's "
                  f"transductive protocol)")


def pretraining_samples(cfg: DataConfig) -> tuple[list[Sample], list[str], str]:
    """What unlabeled pretraining reads — every image (every slice of a volume dataset, normalised by its
    resolved intensity scheme) outside :func:`pretraining_exclusions` — the stems left out, and the
    sentence saying why."""
    excluded, why = pretraining_exclusions(cfg)
    root = Path(cfg.path)
    intensity = resolve_intensity(cfg, root) if is_nnunet_raw(root) else None
    return unlabeled_samples(root, set(excluded), intensity, cfg.axis, cfg.spacing), excluded, why
