"""Data a study makes before it trains: the demo's brain slices, a group split, environment.json."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

from labeldiff import runtime
from labeldiff.fs import atomic_folder
from labeldiff.study.configs import write_json
from labeldiff.study.spec import StudyError, Study

BRAIN_DEMO = "brain-demo"
VOLUME_SLABS = "volume-slabs"
SLAB_TRAIN_FRACTION, SLAB_GAP = 0.5, 4


def prepare_data(study: Study, out: Path) -> None:
    """Run the ``prepare`` hook and the ``split`` block, filling ``study.data.path`` / ``split_file``.

    ``prepare: brain-demo`` writes :func:`labeldiff.demo.build_brain_dataset`'s MNI152 axial slices
    (train = lower slab, test = upper slab, all = both) into ``OUT/data/brain-demo`` once.
    ``data.split`` writes ``OUT/data/split.json`` with :func:`labeldiff.data.splits.write_split` (what
    ``labeldiff split`` writes: a group split, or slabs of a volume dataset) and points ``data.split_file``
    at it.
    """
    if study.prepare == BRAIN_DEMO:
        from labeldiff.data.mni152 import build_brain_dataset

        root = out / "data" / BRAIN_DEMO
        if not (root / "split.json").is_file():
            print(f"prepare: slicing the MNI152 template (nilearn) into {root}")
            build_brain_dataset(root)
        if study.data.path is None:
            study.data.path = root
    if study.prepare == VOLUME_SLABS:
        study.data.path = volume_slabs(Path(study.data.path), out / "data")
    if study.data.split is not None:
        from labeldiff.data.splits import write_split

        s, path = study.data.split, out / "data" / "split.json"
        _, what = write_split(study.data.path, path, groups=s.groups, test_fraction=s.test_fraction, seed=s.seed,
                              slab_train=s.slab_train, gap=s.gap, axis=int(study.data.options.get("axis", 2)),
                              spacing=study.data.options.get("spacing"), overwrite=True)
        study.data.split_file = path
        print(f"split: {what} → {path}")

def volume_slabs(root: Path, folder: Path, size: int = 64) -> Path:
    """``prepare: volume-slabs``: the one labeled case of an nnU-Net v2 raw dataset (``imagesTr/``,
    ``labelsTr/``, ``dataset.json``) as axial 2D slices (:func:`labeldiff.data.volumes.volume_to_slices`,
    slices with ≥ 2 % labeled pixels, ``size``²) in ``folder/<name>-slabs``: ``train`` = the lower
    half of the slices, ``test`` = the upper slab after a gap of 4 slices — the CT paper's "label a
    few slices of one slab, predict a disjoint one". Pretraining reads every slice outside the test
    slab. Written once; returns the slice dataset's root.
    """
    from labeldiff.data.splits import save_split, slab_splits
    from labeldiff.data.volumes import volume_to_slices

    dest = folder / f"{root.name}-slabs"
    if (dest / "split.json").is_file():
        return dest
    meta = json.loads((root / "dataset.json").read_text())
    ending = meta.get("file_ending", ".nii.gz")
    labels = sorted((root / "labelsTr").glob(f"*{ending}"))
    if len(labels) != 1:
        raise StudyError(f"prepare: volume-slabs slices one labeled case; {root / 'labelsTr'} has {len(labels)}")
    case = labels[0].name[:-len(ending)]
    image = root / "imagesTr" / f"{case}_0000{ending}"
    print(f"prepare: slicing {image.name} (axial, {size}²) into {dest}")
    stems = volume_to_slices(image, dest, labels=labels[0], axis=2, size=size, min_foreground=0.02, prefix=case)
    split = slab_splits(stems, train_frac=SLAB_TRAIN_FRACTION, gap=SLAB_GAP)
    save_split(dest / "split.json", {**split, "note": f"{meta.get('description', root.name)}: axial slices; train = "
                                                     f"lower slab ({len(split['train'])}), test = upper slab "
                                                     f"({len(split['test'])}), gap {SLAB_GAP}"}, overwrite=True)
    write_json(dest / "classes.json", meta.get("labels", {}))
    return dest


def build_pool(study: Study, folder: Path) -> Path:
    """The unlabeled pool of a ``data.unlabeled`` list as one folder of links, made once.

    Each entry is a folder of images or a dataset root (all of its ``images/``), or ``target``: the
    target's images outside its test split (the study's split). Links are named
    ``<source>__<stem>`` so stems stay unique; the folder is ``folder/pools/pool-<hash of the
    linked files>/images`` (the hash names the pretraining runs too) with ``pool.json`` listing what
    came from where. With ``data.pool_size`` N the pool is a random N of those images, drawn with
    ``data.pool_seed``; with ``data.pool_by: groups`` the N are whole groups of the target (its
    ``data.split.groups``, e.g. the frames of one video), drawn in a seeded order until N images are
    in (the last group cut to its first images in name order), every other image a group of its own — a
    pool of near-duplicates the size of a random draw. Returns the ``images`` folder.
    """
    import numpy as np

    from labeldiff.data.folders import LabeledFolder, unlabeled_samples
    from labeldiff.data.io import DataError
    from labeldiff.study.configs import digest
    from labeldiff.study.spec import POOL_TARGET

    files: list[tuple[str, Path]] = []
    counts: dict[str, int] = {}
    group: dict[str, str] = {}  # pool_by groups: pool name → its group (else its own name)
    for entry in study.data.pool or []:
        if entry == POOL_TARGET:
            ds = LabeledFolder(study.data.path, study.data.split_file)
            split = study.data.options.get("test_split", "test")
            test = set(ds.stems(split)) if split in ds.splits else set()
            kept = [stem for stem in sorted(ds.images) if stem not in test]
            chosen = [(f"target__{stem}", ds.images[stem]) for stem in kept]
            if study.data.pool_by == "groups":
                groups = json.loads(Path(study.data.split.groups).read_text())
                group.update({f"target__{stem}": f"target group {groups[stem]}" for stem in kept if stem in groups})
            name = f"target ({Path(study.data.path).name}, without its {len(test)} test images)"
        else:
            chosen = [(f"{Path(entry).name}__{s.stem}", s.image) for s in unlabeled_samples(Path(entry))]
            name = str(entry)
        counts[name] = len(chosen)
        files += [(stem, path, name) for stem, path in chosen]
    note, said = {}, ""
    if study.data.pool_size is not None:
        if study.data.pool_size > len(files):
            raise DataError(f"data.pool_size {study.data.pool_size}: the pool has only {len(files)} images "
                            f"({'; '.join(f'{n}: {c}' for n, c in counts.items())}); give at most {len(files)}")
        rng = np.random.default_rng(study.data.pool_seed)
        if study.data.pool_by == "groups":
            keep, drawn = _whole_groups([group.get(stem, stem) for stem, _, _ in files], study.data.pool_size, rng)
            note = {"drawn": f"{study.data.pool_size} of {len(files)} in {len(drawn)} whole groups (pool_seed "
                             f"{study.data.pool_seed})", "groups": drawn}
            said = f", {note['drawn']}"
        else:
            keep = rng.choice(len(files), study.data.pool_size, replace=False)
            note = {"drawn": f"{study.data.pool_size} of {len(files)} (pool_seed {study.data.pool_seed})"}
            said = f", a random {note['drawn']}"
        files = [files[i] for i in sorted(keep)]
        counts = {n: sum(src == n for _, _, src in files) for n in counts}
    files = [(stem, path) for stem, path, _ in files]
    key = digest(sorted(str(Path(p).resolve()) for _, p in files))
    images = Path(folder) / "pools" / f"pool-{key}" / "images"
    if not images.is_dir():
        with atomic_folder(images.parent) as tmp:
            (tmp / "images").mkdir(parents=True)
            for stem, path in files:
                os.symlink(Path(path).resolve(), tmp / "images" / f"{stem}{Path(path).suffix}")
            write_json(tmp / "pool.json", {"images": len(files), "sources": counts, **note})
    print(f"unlabeled pool: {len(files)} images ({'; '.join(f'{n}: {c}' for n, c in counts.items())}{said}) "
          f"→ {images}")
    return images


def _whole_groups(groups: list[str], n: int, rng) -> tuple[list[int], list[str]]:
    """Indices of ``n`` items taken group by group in a random order of the groups (a group's items in
    list order, the last group cut to fit), and the groups taken."""
    order = sorted(set(groups))
    keep: list[int] = []
    taken: list[str] = []
    for i in rng.permutation(len(order)):
        members = [j for j, g in enumerate(groups) if g == order[i]]
        keep += members[:n - len(keep)]
        taken.append(order[i])
        if len(keep) == n:
            break
    return keep, taken


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_state(folder: Path) -> dict | None:
    """``{"commit", "dirty"}`` of the git checkout holding ``folder``, or None."""
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode:
            return None
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain"], capture_output=True, text=True,
                                timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """The CUDA GPUs this process sees, by name ([] without CUDA)."""
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def code_state() -> dict | None:
    """The git state of the labeldiff checkout that is running (None outside a checkout)."""
    import labeldiff

    return git_state(Path(labeldiff.__file__).parent)


def write_environment(path: Path, study: Study, rows: list[dict], pretrain_seconds: dict[str, float | None],
                      wall_seconds: float, git: dict | None) -> None:
    """``git``: the code's state when this invocation started (each cell.json has its own)."""
    write_json(path, {
        "packages": {name: _version(name) for name in ("torch", "monai", "numpy", "labeldiff")},
        "python": platform.python_version(),
        "git": git,
        "cpu": {"model": cpu_model(), "count": os.cpu_count(),  # what train.precision auto trains in here:
                "precision_auto": runtime.precision_name(runtime.resolve_precision("auto", runtime.resolve_device("cpu")))},
        "gpus": gpu_names(),  # where device auto trains when there are any (cuda:0; --workers: one each)
        "study": str(study.file),
        "seeds": study.seeds,
        "wall_seconds_this_invocation": round(wall_seconds, 1),
        "seconds_per_pretraining": pretrain_seconds,
        "seconds_per_cell": {r["cell"]: r.get("seconds") for r in rows},
    })
