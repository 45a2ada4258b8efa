"""Where outputs may go: never into a dataset's image or mask folders, never into the folder being read.

``predict``, ``evaluate`` and ``sample`` write files with names of their own choosing (a mask per input
stem, ``grid.png``, ``metrics.json``). Pointed at ``ROOT/masks`` they would replace ground truth; pointed at
``ROOT/images`` they would add generated pictures to a dataset. :func:`check_output_folder` refuses both
before anything is written.
"""
from __future__ import annotations

import os
from pathlib import Path

from labeldiff.errors import DataError

DATASET_FOLDERS = ("images", "masks")  # a 2D dataset: ROOT/images + ROOT/masks
NNUNET_FOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "imagesUnlabeled")  # ROOT/dataset.json beside them


def dataset_folder(path: Path) -> Path | None:
    """The dataset image or label folder that ``path`` is or lies inside, or None."""
    path = Path(os.path.realpath(path))
    for folder in (path, *path.parents):
        parent = folder.parent
        if folder.name in DATASET_FOLDERS and any((parent / f).is_dir() for f in DATASET_FOLDERS if f != folder.name):
            return folder
        if folder.name in NNUNET_FOLDERS and (parent / "dataset.json").is_file():
            return folder
    return None


def check_output_folder(out: Path, reads: tuple[Path | str, ...] = (), flag: str = "--out") -> Path:
    """``out`` if outputs may be written there; else a :class:`DataError` saying why, before anything is
    written: a file, a dataset's ``images/`` or ``masks/`` (or an nnU-Net ``imagesTr/``, ``labelsTr/`` …)
    or a folder inside one, or one of the input folders ``reads`` or a folder inside it (for an input
    file: the folder it lies in)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{flag} {out} is a file; give a folder for the outputs")
    inside = dataset_folder(out)
    if inside is not None:
        raise DataError(f"{flag} {out} is {'' if inside == Path(os.path.realpath(out)) else 'inside '}the dataset folder "
                        f"{inside}; outputs would mix with (or replace) its files: choose a folder outside it")
    real = Path(os.path.realpath(out))
    for r in reads:
        folder = Path(os.path.realpath(r))
        if folder.is_file():  # one input file: not into the folder it lies in (a subfolder of it is fine)
            folder, below = folder.parent, False
        else:
            below = True
        if real == folder or (below and folder in real.parents):
            raise DataError(f"{flag} {out} is {'' if real == folder else 'inside '}the input folder {r}; outputs "
                            f"would mix with (or replace) the inputs: choose a folder outside it")
    return out


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    """Refuse (before anything is written) when an output file exists already, unless ``overwrite``."""
    if overwrite:
        return
    there = [p for p in paths if p.exists()]
    if there:
        raise DataError(f"{there[0]} exists{f' (and {len(there) - 1} more outputs)' if len(there) > 1 else ''}; "
                        f"pass --overwrite to replace them, or choose another --out")
