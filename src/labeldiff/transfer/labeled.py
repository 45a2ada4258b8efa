"""What every transfer strategy starts from: the pretrained run, the labeled images and K.

:func:`prepare_transfer` is shared by fine-tuning and the probe, so both read the same labeled
images, resolve the same way (:mod:`labeldiff.resolve`: the network and data geometry from the
pretrained run) and check everything before a run folder is written.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from labeldiff.config import RunConfig, replace
from labeldiff.data.folders import LabeledFolder, VolumeFolder, open_labeled
from labeldiff.data.io import DataError
from labeldiff.data.nnunet import dataset_num_classes
from labeldiff.data.splits import select_subset
from labeldiff.data.validation import check_scaled_images, validate_samples
from labeldiff.errors import ConfigError
from labeldiff.runs import RunFolder


@dataclass
class Transfer:
    cfg: RunConfig  # the resolved config of the run (labeldiff.resolve), K recorded
    pre: RunFolder | None  # the pretrained run (None: scratch without --pretrained)
    ds: LabeledFolder | VolumeFolder
    stems: list[str]  # the labeled images this run trains on
    num_classes: int


def prepare_transfer(cfg: RunConfig, stems: Sequence[str] | None = None) -> Transfer:
    """The resolved config (:func:`labeldiff.resolve.resolved`: the network and data geometry from the
    pretrained run, unless ``cfg`` was resolved already), K, and the labeled images.

    ``stems``: the labeled images, given explicitly (a study's cell), else ``transfer.labeled`` (``--labeled``);
    they must belong to the ``train_split``. Without either, ``transfer.labels`` images of it are drawn with
    ``train.seed`` (:func:`labeldiff.data.splits.select_subset`), or with ``transfer.label_unit = volumes``
    that many training cases, whose labeled slices all train (:func:`select_volumes`).
    """
    from labeldiff.resolve import resolved

    if cfg.kind != "segmentation":
        cfg = replace(cfg, kind="segmentation")
    pre = None
    if cfg.transfer.pretrained:
        pre = RunFolder.open(cfg.transfer.pretrained, flag="--pretrained").require_pretrain().verify()
    elif cfg.transfer.strategy != "scratch":
        raise ConfigError(f"--strategy {cfg.transfer.strategy} needs --pretrained RUN (or use --strategy scratch)")
    cfg = resolved(cfg, pre.config if pre else None, str(pre.path) if pre else None)
    t = cfg.transfer
    ds = open_labeled(cfg.data, split_file=cfg.data.split_file)
    if ds.ignore_index != cfg.data.ignore_index:  # the dataset has roi/: what the run found, recorded
        cfg.data.ignore_index = ds.ignore_index
        print(f"{ds.root}/roi/: pixels outside each image's region of interest are left out of the loss, the "
              f"metrics and the probe's samples (as mask value {ds.ignore_index}, data.ignore_index)")
    pool = ds.stems(cfg.data.train_split)
    named = stems is None and bool(t.labeled)
    if named and t.label_unit == "volumes":
        raise ConfigError("--labeled names slices; drop --label-unit volumes (or drop --labeled and give --labels, "
                          "a number of volumes)")
    if named:
        stems = list(t.labeled)
    if stems is None and t.label_unit == "volumes":
        chosen = select_volumes(ds, pool, t.labels, cfg.train.seed, cfg.data.train_split)
    elif stems is None:
        chosen = select_subset(pool, t.labels, cfg.train.seed, cfg.data.train_split)
    else:
        chosen = sorted(set(stems))
        check_in_split(chosen, pool, ds, cfg.data.train_split, "--labeled" if named else "labeled images")
        t.labels = len(chosen)
        if named:
            t.labeled = tuple(chosen)
    cfg.num_classes = validate_samples(ds.samples(pool), cfg.data.num_classes or dataset_num_classes(ds.root))
    check_scaled_images(ds.samples(chosen), cfg.data)
    ignore = cfg.data.ignore_index
    if ignore is not None and ignore < cfg.num_classes:
        why = " (the value marking pixels outside roi/)" if getattr(ds, "has_roi", False) else ""
        raise DataError(f"--ignore-index {ignore}{why} is one of the {cfg.num_classes} classes 0..{cfg.num_classes - 1}; "
                        f"give the value that marks unlabeled pixels (e.g. 255)")
    return Transfer(cfg, pre, ds, chosen, cfg.num_classes)


def check_in_split(chosen: list[str], pool: list[str], ds: LabeledFolder | VolumeFolder, split: str,
                   what: str) -> None:
    """Refuse labeled images outside the ``split`` ``pool``, naming them and where they are instead."""
    inside = set(pool)
    outside = [s for s in chosen if s not in inside]
    if chosen and not outside:
        return
    if not chosen:
        raise DataError(f"{what}: no image named; name images of the {split!r} split")
    shown = ", ".join(outside[:5]) + (f", … ({len(outside)} in all)" if len(outside) > 5 else "")
    splits = getattr(ds, "splits", {}) or {}
    elsewhere = [f"{s} is in {name!r}" for s in outside[:3] for name, stems in splits.items()
                 if name != split and s in stems]
    where = f" ({'; '.join(elsewhere)})" if elsewhere else ""
    raise DataError(f"{what}: {shown} {'is' if len(outside) == 1 else 'are'} not in the {split!r} split of "
                    f"{ds.root}{where}; name images of that split (it has {len(pool)}: "
                    f"{', '.join(pool[:3])}{', …' if len(pool) > 3 else ''})")


def select_volumes(ds: LabeledFolder | VolumeFolder, pool: list[str], k: int, seed: int, split: str) -> list[str]:
    """Every slice of ``pool`` (a split's labeled slices) that belongs to one of ``k`` of its cases, the
    cases drawn with ``seed`` as :func:`select_subset` draws images."""
    if not isinstance(ds, VolumeFolder):
        raise DataError(f"--label-unit volumes counts whole volumes, but {ds.root} is a 2D image dataset; use "
                        f"--label-unit slices (k images) or an nnU-Net raw dataset")
    case_of = {s: ds.case_of(s) for s in pool}
    chosen = set(select_subset(sorted(set(case_of.values())), k, seed, split, unit="cases with labeled slices"))
    return [s for s in pool if case_of[s] in chosen]
