"""What every transfer strategy starts from: the pretrained run, the labeled images and K.

:func:`prepare_transfer` is shared by fine-tuning and the probe, so both read the same labeled
images, take the same data geometry from the pretrained run (:meth:`RunFolder.inherit`) and
check everything before a run folder is written.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from labeldiff.config import RunConfig
from labeldiff.data.datasets import LabeledFolder, VolumeFolder, open_labeled, select_subset, validate_samples
from labeldiff.data.io import DataError
from labeldiff.runs import RunFolder


@dataclass
class Transfer:
    pre: RunFolder | None  # the pretrained run (None: scratch without --pretrained)
    ds: LabeledFolder | VolumeFolder
    stems: list[str]  # the labeled images this run trains on
    num_classes: int


def prepare_transfer(cfg: RunConfig, stems: Sequence[str] | None = None, explicit: Iterable[str] = ()) -> Transfer:
    """Resolve ``cfg`` in place (network and geometry from the pretrained run, K) and pick the labeled images.

    ``stems``: the labeled images, given explicitly (a study's cell); they must belong to the
    ``train_split``. Without them ``transfer.labels`` images of it are drawn with ``train.seed``
    (:func:`labeldiff.data.datasets.select_subset`). ``explicit``: the dotted config names the user
    set (command line, recipe, study), see :meth:`RunFolder.inherit`.
    """
    cfg.kind = "segmentation"
    t = cfg.transfer
    pre = None
    if t.pretrained:
        pre = RunFolder.open(t.pretrained, flag="--pretrained").require_pretrain()
        pre.inherit(cfg, explicit)
    elif t.strategy != "scratch":
        raise ValueError(f"strategy {t.strategy!r} needs --pretrained RUN_DIR (or use --from-scratch)")
    cfg.model.in_channels = cfg.data.channels
    ds = open_labeled(cfg.data, split_file=cfg.data.split_file)
    pool = ds.stems(cfg.data.train_split)
    if stems is None:
        chosen = select_subset(pool, t.labels, cfg.train.seed, cfg.data.train_split)
    else:
        chosen = sorted(stems)
        outside = sorted(set(chosen) - set(pool))
        if not chosen or outside:
            raise DataError(f"labeled images must be a non-empty subset of the {cfg.data.train_split!r} split; "
                            f"{outside[:3] or 'none'} are not in it")
        t.labels = len(chosen)
    cfg.num_classes = validate_samples(ds.samples(pool), cfg.data.num_classes)
    return Transfer(pre, ds, chosen, cfg.num_classes)
