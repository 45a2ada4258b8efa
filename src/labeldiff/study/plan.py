"""What a study runs, planned before anything trains: the labeled target (:class:`Target`), one
pretraining run per method and length (:func:`plan_pretraining`), one cell per method run × strategy ×
protocol × selection × k × seed with scratch per network (:func:`plan_cells`), and the labeled subset of
each cell (:class:`Selector`). Names and hashes come from :mod:`labeldiff.study.configs`, so a finished
run or cell is recognised and reused."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from labeldiff.config import ModelConfig, RunConfig, auto_augment, flatten, geometry_fields
from labeldiff.data import provenance
from labeldiff.data.folders import LabeledFolder, VolumeFolder, open_labeled
from labeldiff.data.io import DataError
from labeldiff.data.nnunet import dataset_num_classes
from labeldiff.data.validation import validate_samples
from labeldiff.evaluate.instances import INSTANCE_METRICS
from labeldiff.evaluate.volume import split_slabs
from labeldiff.models.probe import PROBE_METHODS
from labeldiff.errors import ConfigError
from labeldiff.resolve import Layer, compose
from labeldiff.runs import RunFolder
from labeldiff.study.configs import (arch_key, digest, finetune_config, identity, pretrain_config, pretrain_key,
                                     pretrain_layers, pretrain_runs, resolved_model)
from labeldiff.study.prepare import build_pool
from labeldiff.study.select import PICKERS, RULES, class_sets, pixel_features, random_subset, unet_features
from labeldiff.study.spec import DEFAULT_PROTOCOL, LABELED_METHODS, NONE_METHOD, Study, StudyError
from labeldiff.study.tuning import point_label


VALIDATION = "validation"  # tune: the split of the validation images in the tuning cells' split file


@dataclass
class Target:
    """The labeled dataset cells train and test on."""

    ds: LabeledFolder | VolumeFolder
    train: list[str]
    test: list[str]
    num_classes: int
    classes: dict[str, frozenset[int]] | None  # per train image, with require_all_classes
    slabs: dict[str, tuple[int, int]] | None = None  # metrics: volume — case → test slab scored in 3D
    scores: tuple[str, ...] = ()  # metrics: aji — what each cell's evaluation scores besides Dice and IoU
    validation: bool = False  # tune: test is the split VALIDATION, images pretraining may have read without masks

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
        return cls(ds, train, test, k, classes, slabs, tuple(m for m in study.metrics if m in INSTANCE_METRICS))

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
    cfg: RunConfig  # the settings it was asked for (what its key hashes)
    key: str
    dir: Path
    model: ModelConfig  # the network run_pretrain builds
    continues: "Pretraining | None" = None  # the shorter run of a pretrain_steps sweep this one extends
    fine_tuned: bool = True  # False: a length the method's finetune_at leaves out (trained, no cells)
    layers: list[Layer] | None = None  # what labeldiff.resolve resolves its run config from
    reused: bool = False  # a run of the user's own (a method's run:), used as it is, never trained here
    method: str = ""  # the study method it pretrains
    seed: int | None = None  # its pretraining seed (pretrain_seeds); None: the recipe's, one run per method

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
    tuned: dict = field(default_factory=dict)  # tune: the grid point it fine-tunes with ({}: none)

    @property
    def finished(self) -> bool:
        return (self.dir / "eval" / "metrics.json").is_file()

    @property
    def run_dir(self) -> Path:
        """The run that segments: the cell's own, or for ``source`` the pretraining run itself."""
        return self.pre.dir if self.strategy == "source" else self.dir / "run"

    def describe(self) -> dict:
        d = {"cell": self.id, "method": self.method, "arch": self.arch, "strategy": self.strategy,
             "protocol": self.protocol, "k": self.k, "seed": self.seed, "select": self.select,
             "pretrained": str(self.pre.dir) if self.pre else None,
             "pretrain_steps": self.pre.cfg.train.steps if self.pre else None}
        if self.pre is not None and self.pre.seed is not None:
            d["pretrain_seed"] = self.pre.seed
        if self.tuned:
            d["tuned"] = self.tuned
        return d

    def short(self) -> str:
        tuned = f" {point_label(self.tuned)}" if self.tuned else ""
        return f"{self.method} {self.strategy} [{self.protocol}] k={self.k} seed={self.seed} {self.select}{tuned}"


def concrete(finetune: dict, k: int) -> dict:
    """A protocol's hashed settings for cells of k labels: ``transfer.augment: auto`` as what it resolves to
    (:func:`labeldiff.settings.auto_augment`), so a cell is named by what it computes — the same name as
    the same cell with that augmentation given."""
    t = finetune["transfer"]
    if t.get("augment") != "auto":
        return finetune
    return {**finetune, "transfer": {**t, "augment": auto_augment(k, t.get("label_unit", "slices"))}}


def plan_pretraining(study: Study, folder: Path, out: Path) -> list[Pretraining]:
    """One run per (method, length); in a ``pretrain_steps`` sweep each length continues the one before
    it (``--resume`` with more steps, see :func:`labeldiff.pretrain.loop.extend_config`). ``out``: the
    study folder, where prepared data lives (:func:`~labeldiff.study.configs.pretrain_key`)."""
    runs: list[Pretraining] = []
    pool = build_pool(study, folder) if study.data.pool and any(
        m.pretrains and m.run is None and m.pretrain_on == "unlabeled" for m in study.methods) else None
    for name, method, steps, seed in pretrain_runs(study):
        if method.run is not None:  # the user's own run: named by the hash of its identity, as the study's are
            cfg = RunFolder.open(method.run, flag=f"{name}.run").config
            runs.append(Pretraining(name, cfg, pretrain_key(cfg, None, out), method.run, cfg.model, reused=True))
            continue
        cfg = pretrain_config(study, method, steps, pool, seed)
        last = runs[-1] if runs else None  # a sweep's previous length: the same method and pretraining seed
        prev = last if steps is not None and last is not None and last.method == method.name and \
            last.seed == seed and not last.reused else None
        key = pretrain_key(cfg, prev.key if prev else None, out)
        runs.append(Pretraining(name, cfg, key, folder / f"{name}-{key}", resolved_model(cfg), prev,
                                method.fine_tunes(steps), pretrain_layers(study, method, steps, pool, seed),
                                method=method.name, seed=seed))
    return runs


def check_reused(study: Study, runs: list[Pretraining], target: Target, shared: dict[str, list[Layer]]) -> None:
    """Refuse, with the reason, a run of the user's own (``methods: [{name, run}]``) that the study cannot
    judge as its own: one whose data geometry differs from the geometry its cells would train and test at
    (``shared``: each protocol's fine-tuning layers, resolved over the run as a cell's are), one that read the
    study's test images (``trained_on.json``; unless the study's ``include_test``), or one trained on the
    target's labels. Prints what was checked."""
    for run in (r for r in runs if r.reused):
        where = f"{study.file}: methods ({run.name}).run: {run.dir}"
        for protocol, layers in shared.items():
            try:
                cell, sources = compose("segmentation", layers, run.cfg, str(run.dir))
            except ConfigError as e:
                raise StudyError(f"{where}: {e}") from None
            ran, will = flatten(run.cfg), flatten(cell)
            differ = [name for name in geometry_fields() if json.dumps(ran[name], sort_keys=True, default=str) !=
                      json.dumps(will[name], sort_keys=True, default=str)]
            if differ:
                said = "; ".join(f"{n}: the run {ran[n]!r}, the cells {will[n]!r} ({sources.get(n, 'the default')})"
                                 for n in differ)
                under = "" if protocol == DEFAULT_PROTOCOL else f" under protocol {protocol}"
                raise StudyError(f"{where} was pretrained at another data geometry than this study's cells train "
                                 f"and test at{under} ({said}); set the study's data (or finetune overrides) to the "
                                 f"run's values, or pretrain a run at the study's")
        rec = next((r for how, r in RunFolder.open(run.dir).trained_on() if how == "was trained on"), None)
        if rec is None:
            raise StudyError(f"{where} has no {provenance.TRAINED_ON} (written by labeldiff pretrain since it records "
                             f"what a run read), so the study cannot check that it never read the test images; "
                             f"pretrain it again with this labeldiff")
        if rec.get("data") == provenance.dataset_key(target.ds.root):
            if rec.get("labeled"):
                raise StudyError(f"{where} was trained on the masks of {target.ds.root}, the study's target: its cells "
                                 f"would not be label-efficient; pretrain it on another labeled dataset (data.source)")
            seen = sorted(set(rec.get("stems") or []) & set(target.test))
            if seen and not study.data.options.get("include_test"):
                shown = ", ".join(seen[:3]) + (", …" if len(seen) > 3 else "")
                raise StudyError(f"{where} read {len(seen)} of the study's {len(target.test)} test images when it was "
                                 f"pretrained ({shown}); pretrain it on the images outside the study's test split "
                                 f"(the default, without --include-test, with the study's split file), or give the "
                                 f"study data: {{include_test: true}}")
        seen = sorted(set(rec.get("stems") or []) & set(target.test)) if rec.get("data") == \
            provenance.dataset_key(target.ds.root) else []
        read = (f"it read the pixels of {len(seen)} of the study's {len(target.test)} test images, as the study's "
                f"include_test allows" if seen else f"it never read the study's {len(target.test)} test images")
        print(f"{run.name}: your run {run.dir}, used as it is (the cells' data geometry; {read})")


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


Arm = tuple  # (method row label, strategy, protocol, select, k): what a pretrained cell and its scratch pair are


def plan_cells(study: Study, runs: list[Pretraining], target: Target, fts: dict[str, RunConfig], out: Path,
               points: Callable[[Arm], list[dict]] | None = None, seeds: list[int] | None = None,
               ks: list[int] | None = None, folder: str = "cells", prefix: str = "") -> list[Cell]:
    """Every (method run, strategy, protocol, select, k, seed), then scratch per network (in every
    protocol); notes skipped combinations. ``fts``: the fine-tuning config of each protocol.

    ``tune`` (:mod:`labeldiff.study.tuning_cells`) plans with the rest: ``points`` gives each arm the
    settings its cells fine-tune with on top of their protocol (every grid point, or the arm's chosen one;
    [] leaves the arm out), ``seeds`` and ``ks`` replace the study's, and the cells go to ``OUT/folder``
    with ids starting ``prefix``. Without them, a cell is named as before ``tune`` existed."""
    base = {"train": target.train, "test": target.test, "K": target.num_classes,
            "require_all_classes": study.require_all_classes}
    ks = ks or list(dict.fromkeys(target.size(k) for k in study.labels))
    seeds = seeds or study.seeds
    protocols = {p.name: p for p in study.protocols}
    cells: list[Cell] = []

    def add(label: str, arch: str, strategy: str, pre: Pretraining | None, model: ModelConfig) -> None:
        for protocol, ft in fts.items():
            only = protocols[protocol].strategies
            if only and strategy != "scratch" and strategy not in only:
                continue  # the protocol runs only its own strategies (and scratch)
            keeps = pre is not None and pre.cfg.corruption.method in LABELED_METHODS
            if strategy in ("lp-ft", "linear") and ft.transfer.keep_head is True and keeps:
                print(f"note: skipping {strategy} for {label} under protocol {protocol}: with keep_head the source's "
                      f"own output is the head, there is none to train first")
                continue
            tag = "" if protocol == DEFAULT_PROTOCOL else f"{protocol}-"
            for select in study.select:
                for k in ks:
                    for point in points((label, strategy, protocol, select, k)) if points else [{}]:
                        finetune = identity(finetune_config(study, protocols[protocol], point) if point else ft)
                        if not keeps:  # keep_head does not apply: the cell is the one of the same protocol without it
                            finetune["transfer"]["keep_head"] = False
                        shared = {**base, "finetune": concrete(finetune, k)}
                        for seed in seeds:
                            what = {"pretrained": pre.key} if pre else {"network": asdict(model)}
                            if strategy == "source":  # no training: the same score at every k, seed and protocol
                                key = digest({"test": target.test, "K": target.num_classes, **what,
                                              "strategy": strategy}, 8)
                            else:
                                key = digest({**shared, **what, "strategy": strategy, "k": k, "seed": seed,
                                              "select": select}, 8)
                            cid = f"{prefix}{label}-{strategy}-{tag}k{k}-s{seed}-{select}-{key}"
                            cells.append(Cell(cid, out / folder / cid, label, arch, strategy, k, seed, select, pre,
                                              model, protocol, dict(point)))

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


def todo_order(cells: list[Cell]) -> list[Cell]:
    """The unfinished cells, seed by seed, each (k, protocol, select) with its scratch pair: a study
    stopped early has whole paired seeds rather than one strategy's cells."""
    seeds = list(dict.fromkeys(c.seed for c in cells))
    return sorted((c for c in cells if not c.finished), key=lambda c: (seeds.index(c.seed), c.k, c.protocol, c.select))
