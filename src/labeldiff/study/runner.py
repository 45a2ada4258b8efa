"""``labeldiff study STUDY.yaml --out DIR``: cached pretraining, one fine-tune per cell, reports.

Layout of DIR::

    study.yaml, plan.json            the study as given, and every pretraining run and cell it makes
    data/                            prepared data (``prepare: brain-demo``, a ``split`` block)
    pretrain/<name>-<hash>/          one pretraining run per (method, steps) (or in --pretrain-dir); <hash> of its resolved
                                     config (RunConfig.to_dict() minus fields that do not change the
                                     result), so an edited method gets a new folder and the rest is reused
    cells/<cell-id>/                 cell.json (the cell and its labeled stems), run/ (the fine-tuning
                                     or probe run), eval/ (metrics.json, per_image.csv, overlays.png,
                                     timing.json; volume/ with ``metrics: volume``: the 3D slab scores)
    results.csv results.md per_class.md paired.md verdict.md dice_vs_labels.png paired.png overlays.png environment.json

A pretraining run is finished when its ``model.safetensors`` exists; one with a checkpoint but no
weights is resumed (``run_pretrain(..., resume=True)``); anything else in its folder is replaced.
A cell is finished when ``eval/metrics.json`` exists (``eval/`` is written as ``eval.tmp/`` and
renamed); finished cells are never recomputed, any other cell folder is deleted and redone.

A cell hands its chosen stems to :func:`labeldiff.transfer.run.run_transfer`, the entry point of
``labeldiff finetune``, and is evaluated on the study's test split. ``data.num_classes`` is set to
the dataset's K so a subset missing a class still gets K outputs. Pretraining on the target's own
images leaves its test split out unless ``data.include_test`` (the MDM paper's transductive protocol).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from labeldiff.config import ModelConfig, RunConfig, replace
from labeldiff.data.folders import LabeledFolder, VolumeFolder, open_labeled
from labeldiff.data.io import DataError
from labeldiff.data.nnunet import dataset_class_names, dataset_num_classes
from labeldiff.data.validation import validate_samples
from labeldiff.evaluate.run import run_evaluate
from labeldiff.evaluate.volume import class_mean, run_evaluate_volumes, split_slabs
from labeldiff.fs import atomic_folder
from labeldiff.models.probe import PROBE_METHODS
from labeldiff.pretrain.run import run_pretrain
from labeldiff.runtime import resolve_device
from labeldiff.sample.synthetic import ensure_synthetic
from labeldiff.study import plots, report
from labeldiff.study.configs import (arch_key, digest, finetune_config, finetune_explicit, identity, pretrain_config,
                                     pretrain_key, pretrain_runs, resolved_model, write_json)
from labeldiff.study.prepare import build_pool, code_state, prepare_data, write_environment
from labeldiff.study.select import PICKERS, RULES, class_sets, pixel_features, random_subset, unet_features
from labeldiff.study.spec import DEFAULT_PROTOCOL, LABELED_METHODS, NONE_METHOD, Study, load_study
from labeldiff.study.verdict import verdict_markdown
from labeldiff.transfer.run import run_transfer

OVERLAY_IMAGES = 3


@dataclass
class Target:
    """The labeled dataset cells train and test on."""

    ds: LabeledFolder | VolumeFolder
    train: list[str]
    test: list[str]
    num_classes: int
    classes: dict[str, frozenset[int]] | None  # per train image, with require_all_classes
    slabs: dict[str, tuple[int, int]] | None = None  # metrics: volume — case → test slab scored in 3D

    @classmethod
    def load(cls, study: Study, ft: RunConfig) -> "Target":
        ds = open_labeled(ft.data, study.data.path, study.data.split_file)
        train, test = ds.stems(ft.data.train_split), ds.stems(ft.data.test_split)
        k = validate_samples(ds.samples(train + test), ft.data.num_classes or dataset_num_classes(ds.root))
        classes = class_sets(ds, train, k) if study.require_all_classes else None
        slabs = None
        if "volume" in study.metrics:
            if not isinstance(ds, VolumeFolder):
                raise DataError(f"{study.file}: metrics: volume scores the test slices in 3D, which needs a volume "
                                f"dataset (an nnU-Net raw folder); {ds.root} is a 2D image folder")
            slabs = split_slabs(ds, test)
        return cls(ds, train, test, k, classes, slabs)

    def size(self, k: int | str) -> int:
        """k of a ``labels`` entry ("all" = every train image), checked against the train split."""
        if k == "all":
            return len(self.train)
        if int(k) > len(self.train):
            raise DataError(f"labels: {k} is larger than the train split ({len(self.train)} images); use "
                            f"{len(self.train)} or fewer, or \"all\"")
        return int(k)


@dataclass
class Pretraining:
    name: str
    cfg: RunConfig
    key: str
    dir: Path
    model: ModelConfig  # the network run_pretrain builds
    continues: "Pretraining | None" = None  # the shorter run of a pretrain_steps sweep this one extends
    fine_tuned: bool = True  # False: a length the method's finetune_at leaves out (trained, no cells)

    @property
    def finished(self) -> bool:
        return (self.dir / "model.safetensors").is_file()


@dataclass
class Cell:
    id: str
    dir: Path
    method: str  # row label: run name ("ddpm@200"), or "none" for scratch
    arch: str
    strategy: str
    k: int
    seed: int
    select: str
    pre: Pretraining | None  # None: scratch
    model: ModelConfig
    protocol: str = DEFAULT_PROTOCOL

    @property
    def finished(self) -> bool:
        return (self.dir / "eval" / "metrics.json").is_file()

    @property
    def run_dir(self) -> Path:
        """The run that segments: the cell's own, or for ``source`` the pretraining run itself."""
        return self.pre.dir if self.strategy == "source" else self.dir / "run"

    def describe(self) -> dict:
        return {"cell": self.id, "method": self.method, "arch": self.arch, "strategy": self.strategy,
                "protocol": self.protocol, "k": self.k, "seed": self.seed, "select": self.select,
                "pretrained": str(self.pre.dir) if self.pre else None,
                "pretrain_steps": self.pre.cfg.train.steps if self.pre else None}

    def short(self) -> str:
        return f"{self.method} {self.strategy} [{self.protocol}] k={self.k} seed={self.seed} {self.select}"


def plan_pretraining(study: Study, folder: Path, out: Path) -> list[Pretraining]:
    """One run per (method, length); in a ``pretrain_steps`` sweep each length continues the one before
    it (``--resume`` with more steps, see :func:`labeldiff.pretrain.loop.extend_config`). ``out``: the
    study folder, where prepared data lives (:func:`~labeldiff.study.configs.pretrain_key`)."""
    runs: list[Pretraining] = []
    pool = build_pool(study, folder) if study.data.pool and any(
        m.pretrains and m.pretrain_on == "unlabeled" for m in study.methods) else None
    for name, method, steps in pretrain_runs(study):
        cfg = pretrain_config(study, method, steps, pool)
        prev = runs[-1] if steps is not None and runs and runs[-1].name.split("@")[0] == method.name else None
        key = pretrain_key(cfg, prev.key if prev else None, out)
        runs.append(Pretraining(name, cfg, key, folder / f"{name}-{key}", resolved_model(cfg), prev,
                                method.fine_tunes(steps)))
    return runs


def scratch_networks(study: Study, runs: list[Pretraining]) -> dict[str, tuple[str, ModelConfig]]:
    """arch key → (row label, network): one scratch baseline per distinct network, not per method."""
    nets: dict[str, tuple[list[str], ModelConfig]] = {}
    for r in runs:
        nets.setdefault(arch_key(r.model), ([], r.model))[0].append(r.name)
    for m in study.methods:
        if m.name == NONE_METHOD:
            model = resolved_model(pretrain_config(study, m, None))
            nets.setdefault(arch_key(model), ([], model))[0].insert(0, NONE_METHOD)
    single = len(nets) == 1
    return {a: (NONE_METHOD if single or names[0] == NONE_METHOD else f"{NONE_METHOD}[{names[0]}]", model)
            for a, (names, model) in nets.items()}


def plan_cells(study: Study, runs: list[Pretraining], target: Target, fts: dict[str, RunConfig],
               out: Path) -> list[Cell]:
    """Every (method run, strategy, protocol, select, k, seed), then scratch per network (in every
    protocol); notes skipped combinations. ``fts``: the fine-tuning config of each protocol."""
    base = {"train": target.train, "test": target.test, "K": target.num_classes,
            "require_all_classes": study.require_all_classes}
    ks = list(dict.fromkeys(target.size(k) for k in study.labels))
    cells: list[Cell] = []

    def add(label: str, arch: str, strategy: str, pre: Pretraining | None, model: ModelConfig) -> None:
        for protocol, ft in fts.items():
            keeps = pre is not None and pre.cfg.corruption.method in LABELED_METHODS
            if strategy in ("lp-ft", "linear") and ft.transfer.keep_head is True and keeps:
                print(f"note: skipping {strategy} for {label} under protocol {protocol}: with keep_head the source's "
                      f"own output is the head, there is none to train first")
                continue
            finetune = identity(ft)
            if not keeps:  # keep_head does not apply: the cell is the one of the same protocol without it
                finetune["transfer"]["keep_head"] = False
            shared = {**base, "finetune": finetune}
            tag = "" if protocol == DEFAULT_PROTOCOL else f"{protocol}-"
            for select in study.select:
                for k in ks:
                    for seed in study.seeds:
                        what = {"pretrained": pre.key} if pre else {"network": asdict(model)}
                        if strategy == "source":  # no training: the same score at every k, seed and protocol
                            key = digest({"test": target.test, "K": target.num_classes, **what, "strategy": strategy}, 8)
                        else:
                            key = digest({**shared, **what, "strategy": strategy, "k": k, "seed": seed,
                                          "select": select}, 8)
                        cid = f"{label}-{strategy}-{tag}k{k}-s{seed}-{select}-{key}"
                        cells.append(Cell(cid, out / "cells" / cid, label, arch, strategy, k, seed, select, pre, model,
                                          protocol))

    for run in runs:
        if not run.fine_tuned:
            print(f"note: {run.name} is trained (the longer run continues it) but gets no cells: not in finetune_at")
            continue
        for strategy in (s for s in study.strategies if s != "scratch"):
            if strategy == "probe" and (run.model.arch != "unet" or run.cfg.corruption.method not in PROBE_METHODS):
                print(f"note: skipping probe for {run.name}: the probe reads the decoder of a diffusion UNet")
                continue
            if strategy == "source" and run.cfg.corruption.method not in LABELED_METHODS:
                print(f"note: skipping source for {run.name}: only hybrid / supervised runs segment without labels")
                continue
            add(run.name, arch_key(run.model), strategy, run, run.model)
    if "scratch" in study.strategies:
        for arch, (label, model) in scratch_networks(study, runs).items():
            add(label, arch, "scratch", None, model)
    return cells


class Selector:
    """The labeled subset of a cell (see :mod:`labeldiff.study.select`).

    ``diverse`` and ``typical`` pick with one set of features for the whole study, computed once: those of the
    first pretrained diffusion UNet, or the images themselves when there is none. Every cell at a
    (k, seed), scratch included, then trains on the same subset, so every pretrained cell has a
    scratch pair.
    """

    def __init__(self, target: Target, ft: RunConfig, runs: list[Pretraining]):
        self.target, self.ft = target, ft
        self.source = next((r for r in runs if r.model.arch == "unet"), None)
        self.features = None

    def describe(self) -> str:
        return f"the decoder features of {self.source.name}" if self.source else "the images (16² pixels)"

    def stems(self, cell: Cell) -> list[str]:
        t = self.target
        if cell.select == "random":
            return random_subset(t.train, cell.k, cell.seed, t.classes, t.num_classes)
        if self.features is None:
            print(f"{cell.select} selection: features are {self.describe()}, seeded candidate pools")
            self.features = (unet_features(self.source.dir, t.ds.samples(t.train), self.ft.data) if self.source
                             else pixel_features(t.ds, t.train, self.ft.data))
        return PICKERS[cell.select](t.train, self.features, cell.k, cell.seed, t.classes, t.num_classes)


def planned_stems(cell: Cell, selector: Selector, show: int = 6) -> str:
    """What ``--dry-run`` says a cell labels, without training: the images a finished cell trained on
    (its cell.json), the random draw a cell will make (drawn now, the same draw), or, for ``diverse`` and
    ``typical``, that the pick is made when it runs (it needs the pretrained features)."""
    if cell.strategy == "source":
        return "labels: none (the source model as it is)"
    if cell.finished:
        stems = json.loads((cell.dir / "cell.json").read_text())["stems"]
    elif cell.select == "random":
        stems = selector.stems(cell)
    else:
        return f"labels: picked when it runs ({RULES[cell.select]} on {selector.describe()})"
    more = f", … (+{len(stems) - show})" if len(stems) > show else ""
    return "labels: " + ", ".join(stems[:show]) + more


TIMING = "study_timing.json"  # written by the study into a pretraining folder it trained


def start_from(shorter: Pretraining, folder: Path) -> None:
    """Seed ``folder`` with the final checkpoint, config and log of the finished ``shorter`` run."""
    if not shorter.finished:
        raise RuntimeError(f"{shorter.dir} is not finished; it must be before {folder} can continue it")
    info = json.loads((shorter.dir / "latest.json").read_text())
    with atomic_folder(folder) as tmp:
        shutil.copytree(shorter.dir / info["dir"], tmp / info["dir"])
        for name in ("config.json", "latest.json", "log.jsonl"):
            shutil.copyfile(shorter.dir / name, tmp / name)


def pretrain(runs: list[Pretraining]) -> None:
    """Train, resume or reuse every pretraining run."""
    for i, run in enumerate(runs, 1):
        if run.finished:
            print(f"[pretrain {i}/{len(runs)}] {run.name}: finished, reusing {run.dir}")
        else:
            resume = (run.dir / "latest.json").is_file()
            if not resume and run.continues is not None:
                start_from(run.continues, run.dir)
                resume = True
                print(f"[pretrain {i}/{len(runs)}] {run.name}: continuing {run.continues.name} "
                      f"({run.continues.cfg.train.steps} → {run.cfg.train.steps} steps) → {run.dir}")
            else:
                print(f"[pretrain {i}/{len(runs)}] {run.name}: {'resuming' if resume else 'training'} → {run.dir}")
            cfg = RunConfig.from_dict(run.cfg.to_dict())
            result = run_pretrain(cfg, run.dir, resume=resume, overwrite=not resume)
            write_json(run.dir / TIMING, {"seconds": result["seconds"], "resumed": resume})


def pretrain_seconds(runs: list[Pretraining]) -> dict[str, float | None]:
    """Seconds of each pretraining run (of its last session when resumed; None: not trained by a study)."""
    files = {r.name: r.dir / TIMING for r in runs}
    return {name: json.loads(f.read_text())["seconds"] if f.is_file() else None for name, f in files.items()}


def cell_config(cell: Cell, ft: RunConfig, target: Target) -> RunConfig:
    cfg = RunConfig.from_dict(ft.to_dict())
    cfg.data.split_file = str(target.ds.split_file) if target.ds.split_file.is_file() else None
    cfg.data.num_classes = target.num_classes
    cfg.transfer.strategy, cfg.transfer.labels, cfg.train.seed = cell.strategy, cell.k, cell.seed
    # a protocol's keep_head applies where there is a source head: hybrid / supervised pretraining
    if cell.pre is None or cell.pre.cfg.corruption.method not in LABELED_METHODS:
        cfg.transfer.keep_head = False  # (auto is resolved by the fine-tuning itself)
    if cell.pre is not None:
        cfg.transfer.pretrained = str(cell.pre.dir)
    else:  # scratch: the pretrained runs' network, built from the config alone
        cfg.transfer.pretrained = None
        cfg.model = replace(cell.model)
        cfg.data.channels = cell.model.in_channels
    return cfg


def run_cell(cell: Cell, ft: RunConfig, target: Target, selector: Selector, explicit: set[str]) -> float:
    """Select, train, evaluate one cell into its folder (replacing a partial one); returns seconds."""
    t0 = time.time()
    if cell.dir.exists():
        shutil.rmtree(cell.dir)
    key = cell.id.rsplit("-", 1)[1]
    twin = next((c for c in cell.dir.parent.glob(f"*-{key}") if c != cell.dir and (c / "eval" / "metrics.json").is_file()),
                None)
    if twin is not None:  # the same computation under another name: a source cell, or a keep_head that does not apply
        info = json.loads((twin / "cell.json").read_text())
        write_json(cell.dir / "cell.json", {**cell.describe(), "stems": info["stems"], "git": info["git"],
                                            "same_as": twin.name})
        with atomic_folder(cell.dir / "eval") as tmp:
            shutil.copytree(twin / "eval", tmp)
            write_json(tmp / "timing.json", {"seconds": 0.0, "copied_from": twin.name})
            if (twin / "run").exists():
                os.symlink(twin / "run", cell.dir / "run")
        return 0.0
    if cell.strategy == "source":
        return source_cell(cell, ft, target, t0)
    stems = selector.stems(cell)
    write_json(cell.dir / "cell.json", {**cell.describe(), "stems": stems, "git": code_state()})
    cfg = cell_config(cell, ft, target)
    run_transfer(cfg, cell.dir / "run", stems, explicit=explicit)
    with atomic_folder(cell.dir / "eval") as tmp:
        run_evaluate(cell.dir / "run", tmp, split=cfg.data.test_split, device=cfg.train.device)
        seconds = time.time() - t0
        write_json(tmp / "timing.json", {"seconds": seconds})
    return seconds


def source_cell(cell: Cell, ft: RunConfig, target: Target, t0: float) -> float:
    """``source``: the hybrid / supervised run as it is, with no target label, on the target's test
    split. Its key leaves out k, seed and protocol, so :func:`run_cell` evaluates it once per
    pretraining run and copies it into the other cells."""
    write_json(cell.dir / "cell.json", {**cell.describe(), "stems": [], "git": code_state()})
    split_file = str(target.ds.split_file) if target.ds.split_file.is_file() else None
    with atomic_folder(cell.dir / "eval") as tmp:
        run_evaluate(cell.pre.dir, tmp, data=str(target.ds.root), split=ft.data.test_split, split_file=split_file,
                     device=ft.train.device)
        seconds = time.time() - t0
        write_json(tmp / "timing.json", {"seconds": seconds})
    return seconds


def volume_evaluations(cells: list[Cell], target: Target, device: str = "auto") -> None:
    """``metrics: volume``: score every finished cell's model on the test slab of each case in 3D (Dice,
    HD95, NSD; :func:`~labeldiff.evaluate.volume.run_evaluate_volumes`) into ``eval/volume/``, once."""
    if target.slabs is None:
        return
    todo = [c for c in cells if c.finished and not (c.dir / "eval" / "volume" / "metrics.json").is_file()]
    for cell in tqdm(todo, desc="3D slab scores", unit="cell", disable=not todo):
        model = cell.pre.dir if cell.strategy == "source" else cell.dir / "run"
        with atomic_folder(cell.dir / "eval" / "volume") as tmp:
            run_evaluate_volumes(model, target.ds.root, tmp, slabs=target.slabs, device=device, quiet=True)


def robustness_evaluations(cells: list[Cell], study: Study, target: Target, ft: RunConfig) -> None:
    """``robustness:``: ``labeldiff evaluate --corruptions`` of every finished cell's model on the test split
    into ``eval/robustness/``, once per setting (a cell scored under other settings is scored again)."""
    if study.robustness is None:
        return

    def done(c: Cell) -> bool:
        path = c.dir / "eval" / "robustness" / "robustness.json"
        if not path.is_file():
            return False
        r = json.loads(path.read_text())
        return {k: r.get(k) for k in study.robustness} == study.robustness

    todo = [c for c in cells if c.finished and not done(c)]
    split_file = str(target.ds.split_file) if target.ds.split_file.is_file() else None
    for cell in tqdm(todo, desc="robustness", unit="cell", disable=not todo):
        where = ({"data": str(target.ds.root), "split_file": split_file} if cell.strategy == "source" else {})
        with atomic_folder(cell.dir / "eval" / "robustness") as tmp:
            run_evaluate(cell.pre.dir if cell.strategy == "source" else cell.dir / "run", tmp,
                         split=ft.data.test_split, device=ft.train.device, max_overlays=1,
                         corruptions=study.robustness["corruptions"], severities=study.robustness["severities"],
                         corruption_seed=study.robustness["seed"], **where)


def cell_row(cell: Cell) -> dict:
    info = json.loads((cell.dir / "cell.json").read_text())
    m = json.loads((cell.dir / "eval" / "metrics.json").read_text())
    timing = cell.dir / "eval" / "timing.json"
    row = {"cell": cell.id, "method": cell.method, "pretrain_steps": info.get("pretrain_steps"), "arch": cell.arch,
           "strategy": cell.strategy, "protocol": cell.protocol, "k": cell.k, "seed": cell.seed, "select": cell.select,
           "stems": ";".join(info["stems"]), "dice": m["dice"]["mean"], "iou": m["iou"]["mean"]}
    row.update({f"dice_{c}": v for c, v in enumerate(m["dice"]["per_class"].values())})  # keyed by class names
    row["seconds"] = json.loads(timing.read_text())["seconds"] if timing.is_file() else None
    robust = cell.dir / "eval" / "robustness" / "robustness.json"
    if robust.is_file():  # robustness: the mean Dice over corruption × severity, and clean − that
        r = json.loads(robust.read_text())
        row.update({"dice_corrupted": r["mean_dice"], "dice_drop": r["drop"]})
    volume = cell.dir / "eval" / "volume" / "metrics.json"
    if volume.is_file():  # metrics: volume
        v = json.loads(volume.read_text())
        row.update({"dice_3d": v["dice"], "hd95_mm": class_mean(v["per_class"], "hd95_mm"),
                    "nsd": class_mean(v["per_class"], "nsd")})
    return row


def _duration(s: float | None) -> str:
    if s is None:
        return "unknown"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def todo_order(cells: list[Cell]) -> list[Cell]:
    """The unfinished cells, seed by seed, each (k, protocol, select) with its scratch pair: a study
    stopped early has whole paired seeds rather than one strategy's cells."""
    seeds = list(dict.fromkeys(c.seed for c in cells))
    return sorted((c for c in cells if not c.finished), key=lambda c: (seeds.index(c.seed), c.k, c.protocol, c.select))


def run_cells(cells: list[Cell], fts: dict[str, RunConfig], target: Target, out: Path, explicit: set[str],
              selector: Selector, todo: list[Cell] | None = None) -> int:
    """Run the unfinished cells (or those of ``todo``: a shard's) with progress and ETA; returns how many
    were computed. ``results.csv`` lists every finished cell, whoever computed it."""
    done = [c for c in cells if c.finished]
    times = [s for s in (cell_row(c)["seconds"] for c in done) if s is not None]
    todo = todo_order(cells) if todo is None else todo
    print(f"cells: {len(cells)} in the study, {len(done)} finished, {len(todo)} to run")
    for i, cell in enumerate(todo):
        eta = sum(times) / len(times) * (len(todo) - i) if times else None
        print(f"[cell {len(done) + i + 1}/{len(cells)}] {cell.short()} — {len(done) + i} done, "
              f"ETA {_duration(eta)} → {cell.dir}")
        try:
            times.append(run_cell(cell, fts[cell.protocol], target, selector, explicit))
        except KeyboardInterrupt:
            print(f"\ninterrupted in cell {cell.id}: {len(done) + i}/{len(cells)} cells finished; run the same "
                  f"command again to continue (finished cells and pretraining runs are reused)")
            report.write_csv([cell_row(c) for c in cells if c.finished], out / "results.csv")
            raise
        report.write_csv([cell_row(c) for c in cells if c.finished], out / "results.csv")
    return len(todo)


def write_study_file(study: Study, path: Path) -> None:
    """Copy the study file to ``path``; one that ``extends`` another is written whole (both files merged)."""
    if study.extends is None:
        shutil.copyfile(study.file, path)
        return
    import yaml

    head = f"# {study.file.name}, which extends {study.extends.name}: the two merged\n"
    path.write_text(head + yaml.safe_dump(study.merged, sort_keys=False, allow_unicode=True))


def write_reports(study: Study, cells: list[Cell], target: Target, out: Path, pre_seconds: dict, t0: float,
                  git: dict | None = None) -> list[dict]:
    rows = [cell_row(c) for c in cells if c.finished]
    write_environment(out / "environment.json", study, rows, pre_seconds, time.time() - t0, git)
    if not rows:
        print("no finished cells yet: nothing to report")
        return rows
    leak = ("pretraining also read the test images (include_test, transductive)" if study.data.options.get("include_test")
            else "pretraining never read the test images")
    title = f"{study.file.stem}: {Path(study.data.path).name}, test split {len(target.test)} images; {leak}"
    report.write_csv(rows, out / "results.csv")
    names = dataset_class_names(target.ds.root)
    (out / "results.md").write_text(report.results_markdown(rows, study.metrics, title, class_names=names))
    if "per-class" in study.metrics:
        (out / "per_class.md").write_text(report.per_class_markdown(rows, class_names=names))
    paired = report.paired_markdown(rows)
    if any(r.get("dice_3d") is not None for r in rows):
        paired += "\n" + report.paired_markdown([r for r in rows if r.get("dice_3d") is not None], "dice_3d")
    if any(r.get("dice_drop") is not None for r in rows):  # robustness: is the pretrained network's drop smaller?
        paired += "\n" + report.paired_markdown([r for r in rows if r.get("dice_drop") is not None], "dice_drop")
    (out / "paired.md").write_text(paired)
    (out / "verdict.md").write_text(verdict_markdown(rows, title, looks=study.looks))
    plots.plot_dice_vs_labels(rows, out / "dice_vs_labels.png", title=title)
    plots.plot_paired(rows, out / "paired.png", title=title)
    overlays(study, cells, target, out / "overlays.png")
    print(f"\n{report.results_table(rows, 'dice')}\nwrote {out}/results.csv, results.md, per_class.md, paired.md, "
          f"verdict.md, dice_vs_labels.png, paired.png, overlays.png, environment.json")
    return rows


def overlays(study: Study, cells: list[Cell], target: Target, path: Path) -> None:
    """The first test images, predicted by every method × strategy at the largest k and seed 0."""
    import torch

    from labeldiff.evaluate.predict import predict_mask
    from labeldiff.runs import RunFolder

    finished = [c for c in cells if c.finished and c.select == study.select[0]
                and c.protocol == study.protocols[0].name]
    if not finished:
        return
    k = max(c.k for c in finished)
    seed = 0 if any(c.seed == 0 for c in finished) else min(c.seed for c in finished)
    chosen = [c for c in finished if c.k == k and c.seed == seed]
    samples = target.ds.samples(target.test[:OVERLAY_IMAGES])
    channels = RunFolder.open(chosen[0].run_dir).config.data.channels
    images = [{"name": s.stem, "image": s.read_image(channels), "target": s.read_mask(target.num_classes)}
              for s in samples]
    preds = {}
    for c in chosen:
        run = RunFolder.open(c.run_dir)
        model, cfg = run.segmenter("cpu"), run.config
        preds[f"{c.method} / {c.strategy}"] = [
            predict_mask(model, torch.from_numpy(s.read_image(cfg.data.channels)), cfg.data).numpy()
            for s in samples]
    plots.plot_overlays(images, preds, path, title=f"k = {k}, seed {seed}, select {study.select[0]}",
                         class_names=dataset_class_names(target.ds.root))


def run_workers(path: Path, out: Path, pre_dir: Path, workers: int) -> None:
    """Run the cells in ``workers`` processes side by side (``labeldiff study --shard i/N``), each with an
    equal share of the CPU threads and, where there are GPUs, GPU ``i mod #GPUs``; their output goes to
    ``out/workers/shard-i.log``. Cells are independent, so this needs no communication; a cell is small
    (k images, a batch of 8), so one per device beats one split over devices with DDP."""
    import subprocess
    import sys

    import torch

    logs = out / "workers"
    logs.mkdir(exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // workers)
    gpus = torch.cuda.device_count()
    procs = []
    for i in range(workers):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        log = open(logs / f"shard-{i}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "labeldiff.cli", "study", str(path), "--out", str(out),
                                        "--pretrain-dir", str(pre_dir), "--shard", f"{i}/{workers}"],
                                       stdout=log, stderr=subprocess.STDOUT, env=env), log))
    print(f"cells in {workers} processes side by side ({threads} thread{'s' if threads > 1 else ''} each"
          f"{f', GPU i mod {gpus}' if gpus else ''}); their output: {logs}/shard-*.log")
    failed = []
    for i, (proc, log) in enumerate(procs):
        if proc.wait() != 0:
            failed.append(i)
        log.close()
    if failed:
        tail = (logs / f"shard-{failed[0]}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"study worker(s) {failed} failed; the end of {logs}/shard-{failed[0]}.log:\n{tail}\n"
                           f"Finished cells are kept: run the same command again to continue")


def synthetic_first(fts: dict[str, RunConfig]) -> None:
    """Sample the synthetic pairs each protocol asks for (``transfer.synthetic``) before any cell, so that
    cells in several worker processes read one cache instead of each sampling it."""
    for ft in fts.values():
        if ft.transfer.synthetic:
            ensure_synthetic(ft.transfer.synthetic, resolve_device(ft.train.device))


def run_study(path: str | Path, out: str | Path, dry_run: bool = False, report_only: bool = False,
              pretrain_only: bool = False, pretrain_dir: str | Path | None = None, workers: int = 1,
              shard: tuple[int, int] | None = None) -> list[dict]:
    """Run the study in ``path`` into ``out`` (see the module docstring); returns the result rows.

    ``workers``: run the cells in that many processes side by side (:func:`run_workers`), after the
    pretraining; ``shard = (i, n)``: be one of them, running the i-th of every n cells to run and scoring
    them (``robustness``, 3D slabs), without pretraining (it must be finished) or reports.

    ``dry_run``: print the plan (what is finished, what would run) and train nothing.
    ``report_only``: rewrite the reports from the finished cells and train nothing.
    ``pretrain_only``: train (or resume) the pretraining runs and stop before the cells.
    ``pretrain_dir``: where pretraining runs are cached (default ``out/pretrain``); runs are named by the
    hash of their config, so studies may share one folder (a screen and its confirmation, say).
    """
    t0, git = time.time(), code_state()  # the code this invocation runs, whatever is committed meanwhile
    study = load_study(path)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_study_file(study, out / "study.yaml")
    prepare_data(study, out)
    fts = {p.name: finetune_config(study, p) for p in study.protocols}
    ft = next(iter(fts.values()))
    target = Target.load(study, ft)
    pre_dir = Path(pretrain_dir).resolve() if pretrain_dir else out / "pretrain"
    runs = plan_pretraining(study, pre_dir, out)
    cells = plan_cells(study, runs, target, fts, out)
    write_json(out / "plan.json", {"data": str(study.data.path), "split_file": study.data.split_file,
                                   "train": len(target.train), "test": len(target.test), "K": target.num_classes,
                                   "pretraining": [{"name": r.name, "dir": r.dir, "finished": r.finished} for r in runs],
                                   "cells": [{**c.describe(), "finished": c.finished} for c in cells]})
    stale = {p.name for p in (out / "cells").glob("*")} - {c.id for c in cells} if (out / "cells").is_dir() else set()
    print(f"study {study.file.name}: {len(runs)} pretraining runs ({sum(r.finished for r in runs)} finished), "
          f"{len(cells)} cells ({sum(c.finished for c in cells)} finished), K={target.num_classes}, "
          f"{len(target.train)} train / {len(target.test)} test images"
          + (f"; {len(stale)} cell folders of earlier versions of the study are kept, not reported" if stale else ""))
    if dry_run:
        selector = Selector(target, ft, runs)
        for c in cells:
            print(f"  {'done' if c.finished else 'todo'}  {c.id}  {planned_stems(c, selector)}")
        return [cell_row(c) for c in cells if c.finished]
    if pretrain_only:
        pretrain(runs)
        synthetic_first(fts)
        print(f"pretraining done: {len(runs)} runs in {pre_dir}; run without --pretrain-only for the cells")
        return [cell_row(c) for c in cells if c.finished]
    if shard is not None:
        i, n = shard
        unfinished = [r.name for r in runs if not r.finished]
        if unfinished:
            raise ValueError(f"--shard runs cells only, and pretraining {unfinished} is not finished: run the study "
                             f"with --pretrain-only first (two shards would train the same run)")
        mine = [c for j, c in enumerate(todo_order(cells)) if j % n == i]
        synthetic_first(fts)  # a no-op under --workers (sampled before); shards started by hand sample what is missing
        run_cells(cells, fts, target, out, finetune_explicit(study), Selector(target, ft, runs), todo=mine)
        volume_evaluations(mine, target, ft.train.device)  # scored side by side too; the parent finds them done
        robustness_evaluations(mine, study, target, ft)
        return [cell_row(c) for c in cells if c.finished]
    if not report_only:
        pretrain(runs)
        synthetic_first(fts)
        if workers > 1:
            run_workers(Path(study.file), out, pre_dir, workers)
        else:
            run_cells(cells, fts, target, out, finetune_explicit(study), Selector(target, ft, runs))
    volume_evaluations(cells, target, ft.train.device)
    robustness_evaluations(cells, study, target, ft)
    return write_reports(study, cells, target, out, pretrain_seconds(runs), t0, git)
