"""What a run trained on, so that it is never scored on it: ``trained_on.json`` in every run folder.

A split file can change after a run trained (``labeldiff split --overwrite``, an edit by hand). A run
therefore records the dataset root, the split file and its sha256, and the stems it read: the labeled
images of a fine-tuning (or of hybrid / supervised pretraining), the unlabeled images of unlabeled
pretraining. :func:`leaked` tells ``evaluate`` which of the images it is asked to score the run (or
the run it was pretrained from) has already seen.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

TRAINED_ON = "trained_on.json"


def dataset_key(path: str | Path) -> str:
    """One name for a dataset however it was given: the real path of its root (``ROOT/images`` → ``ROOT``)."""
    path = Path(path)
    if path.name == "images" and (path.parent / "masks").is_dir():
        path = path.parent
    return os.path.realpath(path)


def file_sha256(path: str | Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def record(root: str | Path, split_file: str | Path | None, stems: list[str], labeled: bool,
           include_test: bool = False) -> dict:
    """The ``trained_on.json`` of a run that read ``stems`` of the dataset at ``root`` (``labeled``: with
    their masks) under the split file ``split_file`` (None or absent: no split file)."""
    split = Path(split_file) if split_file is not None and Path(split_file).is_file() else None
    return {"data": dataset_key(root), "split_file": os.path.realpath(split) if split else None,
            "split_sha256": file_sha256(split), "labeled": labeled, "include_test": include_test,
            "stems": sorted(stems)}


def scored(root: str | Path, split_file: str | Path | None, split: str, stems: list[str]) -> dict:
    """What an evaluation scored (``metrics.json``'s ``test_images``): the dataset, the split by name, the
    split file and its sha256, and the stems, sorted. Two evaluations pair image by image when their
    datasets and stems agree."""
    rec = record(root, split_file, stems, labeled=True)
    return {"data": rec["data"], "split": split, "split_file": rec["split_file"], "split_sha256": rec["split_sha256"],
            "stems": rec["stems"]}


def leaked(rec: dict | None, root: str | Path, stems: list[str]) -> list[str]:
    """The stems among ``stems`` (to be scored, of the dataset at ``root``) that a run with the record
    ``rec`` trained on; [] when it has no record, read another dataset, or read the test images on purpose
    (``include_test``, the MDM paper's transductive protocol)."""
    if not rec or rec.get("include_test") or rec.get("data") != dataset_key(root):
        return []
    seen = set(rec.get("stems") or [])
    return [s for s in stems if s in seen]


def changed_split(rec: dict | None) -> str:
    """A clause saying the split file the run trained under has changed since (or '')."""
    if not rec or not rec.get("split_file"):
        return ""
    now = file_sha256(rec["split_file"])
    if now == rec.get("split_sha256"):
        return ""
    return (f" ({rec['split_file']} has changed since the run trained)" if now else
            f" ({rec['split_file']}, the split it trained under, is gone)")


def write(folder: Path, rec: dict) -> None:
    from labeldiff.fs import atomic_write_text

    atomic_write_text(Path(folder) / TRAINED_ON, json.dumps(rec, indent=1))
