"""A study YAML → :class:`Study` (dataclasses), validated with errors that say how to fix the YAML.

A study is a YAML file, or the name of an example study shipped with labeldiff (``quick``, ``brain``:
:mod:`labeldiff.examples`). Relative paths in a study file are looked up in the study file's folder,
then in the current directory; the first that exists wins and the resolved absolute path is used
(and printed). A ``split.groups`` file is first looked up in the dataset root, like ``labeldiff
split``'s default ``DATA/sequences.json``. A ``recipe`` is a shipped recipe's name (``ddpm-cpu``) or
a path (:func:`labeldiff.recipes.find`).

Schema (every key but ``methods`` and ``strategies`` is optional; see the example studies)::

    data:
      path: ../shared/datasets/monuseg   # labeled target: images/, masks/, split.json
      split_file: null                   # or a split JSON instead of path/split.json
      split: {groups: sequences.json, test_fraction: 0.3, seed: 0}  # or: make a group split; for an
                                         #   nnU-Net volume dataset {slab_train: 0.5, gap: 4}: slabs
      unlabeled: null                    # pretraining images [path/images], or a pool: a list of
                                         #   image folders / dataset roots and `target` (the target's
                                         #   images outside its test split), e.g. [../kvasir_seg, target]
      pool_size: null                    # with a pool: pretrain on a seeded random N of its images
      pool_seed: 0                       #   (the pool-size question: does a gain need many images?)
      pool_by: images                    # images | groups: draw the N as whole groups of data.split.groups
                                         #   (videos), a near-duplicate pool of the same size
      source: null                       # labeled source dataset (hybrid / supervised pretraining)
      source_split: train                # split of the source used for labeled pretraining
      size: 64                           # + any DataConfig field: mode, scale, channels, num_classes,
      scale: 0.25                        #   train_split, test_split, cache_mb, num_workers
    prepare: null                        # brain-demo: build the demo's MNI152 slices into OUT/data;
                                         #   volume-slabs: slice data.path's one nnU-Net case into slabs
    methods:
      - name: ddpm
        recipe: ddpm-cpu                 # a shipped recipe's name, or the path of a recipe YAML
        overrides: {train.steps: 800}    # section.field: value, applied after the recipe
        pretrain_steps: [200, 800]       # optional sweep: one run per length ("ddpm@200"), each longer
                                         #   one continuing the one before it (resumed with more steps)
        finetune_at: [800]               # optional: the sweep's lengths that get cells (default: all); the
                                         #   others are still trained, as the runs the longer ones continue
        pretrain_on: unlabeled           # unlabeled | source [source for hybrid/supervised]
      - name: mine                       # or a run you pretrained yourself (`labeldiff pretrain --out
        run: runs/pre                    #   runs/pre`), used as it is: never retrained nor written to. It
                                         #   must have the geometry the cells train at (size, mode, scale,
                                         #   channels, axis, intensity, spacing) and must never have read the
                                         #   study's test images (its trained_on.json); else the study refuses
      - name: none                       # no pretraining: only the scratch strategy
    strategies: [probe, linear, decoder, full, lp-ft, scratch]   # + source: a hybrid / supervised run as
                                         #   it is, no target label (its zero-label score)
    labels: [1, 3, all]
    seeds: [0, 1, 2]
    family: ../primaries.yaml            # optional: the registry of primaries (labeldiff family) that lists this
                                         #   study's primary; verdict.md then says first whether it survives
                                         #   Holm's correction over its family
    pretrain_seeds: [0, 1, 2]            # optional: pretrain each method once per seed ("ddpm~p1", train.seed
                                         #   1); every run is fine-tuned with every seed, so a cell is paired
                                         #   by (pretraining seed, fine-tuning seed) and the verdict separates
                                         #   how much the pretraining run moves the gain from how much the
                                         #   fine-tuning seed does. Absent: one run per method, its recipe's seed
    select: random                       # random | diverse | typical, or a list as an axis ([random, diverse])
    require_all_classes: false
    finetune: {recipe: finetune-cpu, overrides: {train.steps: 300}}
    protocols:                           # optional axis: fine-tuning settings for every cell, scratch too
      - {name: ct, protocol: ct, strategies: [decoder]}   # a paper's own protocol (labeldiff.protocols),
                                         #   overrides on top; strategies: only these run under it (+ scratch)
      - {name: none, overrides: {transfer.augment: none}}
      - {name: strong, overrides: {transfer.augment: strong, transfer.flips: hv}}
    metrics: [dice, iou, per-class]     # + volume: each case's test slab scored in 3D (Dice, HD95, NSD);
                                         #   + aji: the Aggregated Jaccard Index (separate objects: nuclei)
    robustness: {corruptions: all, severities: [1, 3, 5], seed: 0}   # or true (all, 1..5, seed 0):
                                         #   evaluate --corruptions per cell; dice_corrupted, dice_drop columns
    tune:                                # optional: each arm's fine-tuning settings chosen on its own
      grid: {train.lr: [0.0001, 0.0003, 0.001, 0.003]}   # train.* / transfer.* setting → values (several:
                                         #   every combination); the study's finetune and protocol set the rest
      seeds: [900, 901, 902]             # tuning seeds, none of them in seeds
      validation: 0.25                   # a fraction of the train split held out (seeded; whole groups where
                                         #   data.split.groups or DATA/sequences.json has them, else images at
                                         #   random), or the name of a split of the split file (val)
      validation_seed: 0
      metric: dice                       # dice | iou | aji, on the validation images
    extends: cvc_confirm.yaml            # take every key of that study file; the keys given here replace
                                         #   its keys whole (``data`` too, not merged). Its relative paths are
                                         #   read as if written here: keep both files in one folder.

With ``tune``, every *arm* — a pretrained run × strategy, and scratch per network, per protocol, selection
and k — is fine-tuned with every grid value and tuning seed on k images drawn (by the study's ``select``) from
the train split outside the validation images, and scored on those. Each arm takes the value with the
highest mean score over the tuning seeds (the first in grid order on a tie); its confirmation cells (the
study's ``seeds``) then fine-tune with it, so a pretrained arm and its scratch pair may use different values.
The tuning cells are ``OUT/tune/tune-…``; ``tuning.md`` and a section of ``verdict.md`` show every arm's
scores and choice, and ``results.csv`` a ``tuned`` column. A study without ``tune`` names its cells as before.

A study that ``extends`` another and only adds seeds to it (its seeds include all of the other's and
more) is another *look* at the same comparison: :attr:`Study.looks` lists the seeds of each look, and
the verdict judges the goal with the confidence level split over the looks (Bonferroni), because
adding seeds after seeing a verdict and stopping when it turns favourable would find gains that are
not there more often than 5 % of the time.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from labeldiff.config import STRATEGIES as TRANSFER_STRATEGIES
from labeldiff.config import (DataConfig, RunConfig, apply_overrides, check_transfer, load_recipe,
                              merge_recipe, read_yaml)
from labeldiff.errors import ConfigError, LabeldiffError
from labeldiff.evaluate.instances import INSTANCE_METRICS
from labeldiff.recipes import find as find_recipe
from labeldiff.study.errors import StudyError, check_setting_name
from labeldiff.study.tuning import TuneSpec, parse_tune

STRATEGIES = (*TRANSFER_STRATEGIES, "source")  # + source: a hybrid / supervised run as it is
SELECTS = ("random", "diverse", "typical")
# volume: the test slab of each case in 3D (volume datasets); aji: the Aggregated Jaccard Index of each cell's
# test images (labeldiff evaluate --metrics aji). Dice, IoU and per-class, the first three, are the default.
METRICS = ("dice", "iou", "per-class", "volume", *INSTANCE_METRICS)
PREPARE = ("brain-demo", "volume-slabs")
NONE_METHOD = "none"
LABELED_METHODS = ("hybrid", "supervised")  # pretext tasks that read a labeled source
TOP_KEYS = ("data", "prepare", "methods", "strategies", "labels", "seeds", "pretrain_seeds", "family", "select",
            "require_all_classes", "finetune", "protocols", "metrics", "robustness", "tune", "extends")
ROBUSTNESS_KEYS = ("corruptions", "severities", "seed")
DEFAULT_PROTOCOL = "default"
POOL_TARGET = "target"  # in a data.unlabeled list: the target's own images outside its test split
DATA_PATH_KEYS = ("path", "split_file", "split", "unlabeled", "source", "source_split")
POOL_KEYS = ("pool_size", "pool_seed", "pool_by")
POOL_BY = ("images", "groups")
DATA_OPTION_KEYS = tuple(f.name for f in fields(DataConfig) if f.name not in ("path", "split_file"))
METHOD_KEYS = ("name", "recipe", "overrides", "pretrain_steps", "finetune_at", "pretrain_on", "run")


@dataclass
class SplitSpec:
    """A split made by the runner (``labeldiff split`` semantics) into ``OUT/data/split.json``: a group
    split (``groups``), or for a volume dataset slabs (``slab_train``, ``gap``)."""

    groups: Path | None = None
    test_fraction: float = 0.3
    seed: int = 0
    slab_train: float | None = None
    gap: int = 4


@dataclass
class DataSpec:
    path: Path | None = None  # None only with ``prepare``
    split_file: Path | None = None
    split: SplitSpec | None = None
    unlabeled: Path | None = None
    pool: list[Path | str] | None = None  # unlabeled as a list: folders and/or POOL_TARGET
    pool_size: int | None = None  # a seeded random subset of the pool of this many images (None: all)
    pool_seed: int = 0
    pool_by: str = "images"  # "groups": the N drawn as whole groups of split.groups (a near-duplicate pool)
    source: Path | None = None
    source_split: str = "train"
    options: dict[str, Any] = field(default_factory=dict)  # DataConfig fields


@dataclass
class Recipe:
    """A recipe file (may be None: the defaults) and ``{section.field: value}`` overrides on top."""

    path: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def apply(self, cfg: RunConfig) -> RunConfig:
        if self.path is not None:
            cfg = merge_recipe(cfg, load_recipe(self.path))
        return apply_overrides(cfg, self.overrides)


@dataclass
class ProtocolSpec:
    """A named set of fine-tuning overrides (``transfer.augment``, ``transfer.steps_rule``, …) applied on
    top of ``finetune`` to every cell, scratch included: an axis of the study."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    paper: str | None = None  # a shipped protocol (labeldiff.protocols) whose fine-tuning block is layered first
    strategies: list[str] | None = None  # the study's strategies that run under it (None: all); scratch always


@dataclass
class MethodSpec:
    name: str
    recipe: Recipe
    pretrain_steps: list[int] | None = None  # None: the recipe's train.steps, no name suffix
    pretrain_on: str = "unlabeled"  # unlabeled | source
    pretext: str = "ddpm"  # corruption.method after recipe + overrides
    finetune_at: list[int] | None = None  # the pretrain_steps that get cells; None: every length
    run: Path | None = None  # a finished pretraining run folder the study uses as it is (never retrains)

    def fine_tunes(self, steps: int | None) -> bool:
        return self.finetune_at is None or steps in self.finetune_at

    @property
    def pretrains(self) -> bool:
        return self.name != NONE_METHOD


@dataclass
class Study:
    file: Path
    data: DataSpec
    methods: list[MethodSpec]
    strategies: list[str]
    labels: list[int | str]
    seeds: list[int]
    select: list[str]
    require_all_classes: bool = False
    finetune: Recipe = field(default_factory=Recipe)
    metrics: list[str] = field(default_factory=lambda: list(METRICS[:3]))
    prepare: str | None = None
    protocols: list[ProtocolSpec] = field(default_factory=lambda: [ProtocolSpec(DEFAULT_PROTOCOL)])
    robustness: dict | None = None  # {corruptions, severities, seed}: evaluate --corruptions for every cell
    looks: list[list[int]] = field(default_factory=list)  # seeds of each look (see the module docstring); [] = one
    pretrain_seeds: list[int] | None = None  # one pretraining run per seed and method; None: one run each
    family: Path | None = None  # the registry of primaries this study's primary belongs to (labeldiff family)
    tune: TuneSpec | None = None  # each arm's fine-tuning settings chosen on validation images; None: as given
    extends: Path | None = None  # the study file this one extends
    merged: dict = field(default_factory=dict)  # the mapping after ``extends`` (OUT/study.yaml records it)

    def __post_init__(self):
        if not self.looks:
            self.looks = [list(self.seeds)]


def _fail(file: Path, where: str, msg: str) -> StudyError:
    return StudyError(f"{file}: {where}: {msg}")


def _unknown(file: Path, where: str, keys, known) -> None:
    bad = [k for k in keys if k not in known]
    if bad:
        hint = difflib.get_close_matches(str(bad[0]), list(known), n=1)
        hint = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise _fail(file, where, f"unknown key {bad[0]!r}{hint}; known keys: {', '.join(known)}")


def resolve_path(value: Any, file: Path, where: str, first: Path | None = None) -> Path:
    """An existing path for ``value``: absolute, or relative to ``first``, the study file's folder or
    the current directory (in that order)."""
    if not isinstance(value, str) or not value:
        raise _fail(file, where, f"expected a path string, got {value!r}")
    p = Path(value)
    bases = [b for b in (first, file.parent, Path.cwd()) if b is not None]
    candidates = [p] if p.is_absolute() else [b / p for b in bases]
    for c in candidates:
        if c.exists():
            return c.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise _fail(file, where, f"{value} does not exist (looked at {looked}); relative paths are taken from the study "
                             f"file's folder, then the current directory")


def _list(raw: Any, file: Path, where: str) -> list:
    if raw is None:
        return []
    return list(raw) if isinstance(raw, (list, tuple)) else [raw]


def _ints(raw: Any, file: Path, where: str, minimum: int, allow_all: bool = False) -> list:
    out = []
    for v in _list(raw, file, where):
        if allow_all and v == "all":
            out.append(v)
        elif isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            extra = ' or "all"' if allow_all else ""
            raise _fail(file, where, f"{v!r} is not an integer ≥ {minimum}{extra}")
        else:
            out.append(v)
    return list(dict.fromkeys(out))


def _choices(raw: Any, file: Path, where: str, choices: tuple[str, ...], default: list[str]) -> list[str]:
    values = _list(raw, file, where) or default
    for v in values:
        if v not in choices:
            raise _fail(file, where, f"{v!r} is not one of {', '.join(choices)}")
    return list(dict.fromkeys(values))


def _recipe(raw: Any, file: Path, where: str) -> Recipe:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise _fail(file, where, "expected a mapping {recipe: PATH, overrides: {section.field: value}}")
    _unknown(file, where, raw, ("recipe", "overrides"))
    path = None
    if raw.get("recipe"):
        if not isinstance(raw["recipe"], str):
            raise _fail(file, f"{where}.recipe", f"expected a recipe name or path, got {raw['recipe']!r}")
        try:
            path = find_recipe(raw["recipe"], bases=(file.parent,))
        except ConfigError as e:
            raise _fail(file, f"{where}.recipe", str(e).removeprefix("recipe ")) from None
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise _fail(file, f"{where}.overrides", "expected a mapping like {train.steps: 800}")
    for key in overrides:
        check_setting_name(key, file, f"{where}.overrides")
    recipe = Recipe(path, dict(overrides))
    try:
        check_transfer(recipe.apply(RunConfig()).transfer)
    except (ValueError, TypeError) as e:
        raise _fail(file, where, f"the recipe and overrides do not make a valid config: {e}") from None
    return recipe


def _data(raw: Any, file: Path, prepare: str | None) -> DataSpec:
    if raw is None and prepare is None:
        raise _fail(file, "data", "missing; name the labeled dataset, e.g. data: {path: ../shared/datasets/monuseg}")
    raw = raw or {}
    if not isinstance(raw, dict):
        raise _fail(file, "data", "expected a mapping with path: DATASET_ROOT and data options (size, scale, …)")
    _unknown(file, "data", raw, DATA_PATH_KEYS + POOL_KEYS + DATA_OPTION_KEYS)
    spec = DataSpec(options={k: raw[k] for k in DATA_OPTION_KEYS if k in raw})
    if raw.get("path"):
        spec.path = resolve_path(raw["path"], file, "data.path")
    elif prepare is None:
        raise _fail(file, "data.path", "missing; give the labeled dataset root (a folder with images/ and masks/)")
    if raw.get("split_file") and raw.get("split"):
        raise _fail(file, "data", "give either split_file (an existing split JSON) or split (make one), not both")
    if raw.get("split_file"):
        spec.split_file = resolve_path(raw["split_file"], file, "data.split_file")
    if raw.get("split"):
        s = raw["split"]
        if not isinstance(s, dict) or ("groups" in s) == ("slab_train" in s):
            raise _fail(file, "data.split", "expected {groups: GROUPS.json, test_fraction: 0.3, seed: 0}, or for a "
                                            "volume dataset {slab_train: 0.5, gap: 4}")
        _unknown(file, "data.split", s, ("groups", "test_fraction", "seed", "slab_train", "gap"))
        if "slab_train" in s:
            spec.split = SplitSpec(slab_train=float(s["slab_train"]), gap=int(s.get("gap", 4)))
        else:
            spec.split = SplitSpec(resolve_path(s["groups"], file, "data.split.groups", first=spec.path),
                                   float(s.get("test_fraction", 0.3)), int(s.get("seed", 0)))
    if isinstance(raw.get("unlabeled"), list):
        spec.pool = [POOL_TARGET if v == POOL_TARGET else resolve_path(v, file, f"data.unlabeled[{i}]")
                     for i, v in enumerate(raw["unlabeled"])]
        if not spec.pool:
            raise _fail(file, "data.unlabeled", "an empty list; name image folders and/or target")
    if raw.get("pool_size") is not None:  # null: the whole pool
        if not spec.pool:
            raise _fail(file, "data.pool_size", "subsamples a pool; give data.unlabeled as a list of image folders "
                                                "and/or target")
        size, seed = raw.get("pool_size"), raw.get("pool_seed", 0)
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
            raise _fail(file, "data.pool_size", f"{size!r} is not a number of images ≥ 1")
        if not (isinstance(seed, int) and not isinstance(seed, bool)):
            raise _fail(file, "data.pool_seed", f"{seed!r} is not an integer seed")
        spec.pool_size, spec.pool_seed = size, seed
        spec.pool_by = str(raw.get("pool_by", "images"))
        if spec.pool_by not in POOL_BY:
            raise _fail(file, "data.pool_by", f"{spec.pool_by!r}; choose images or groups")
        if spec.pool_by == "groups" and (spec.split is None or spec.split.groups is None):
            raise _fail(file, "data.pool_by", "groups draws whole groups of the target; give data.split: {groups: "
                                              "GROUPS.json, ...} (image stem → group, e.g. the video of each frame)")
    elif raw.get("pool_by", "images") != "images":
        raise _fail(file, "data.pool_by", "draws data.pool_size images; give data.pool_size too")
    for key in ("unlabeled", "source"):
        if raw.get(key) and not (key == "unlabeled" and spec.pool):
            setattr(spec, key, resolve_path(raw[key], file, f"data.{key}"))
    spec.source_split = str(raw.get("source_split", "train"))
    try:
        apply_overrides(RunConfig(), {f"data.{k}": v for k, v in spec.options.items()})
    except (ValueError, TypeError) as e:
        raise _fail(file, "data", str(e)) from None
    return spec


def _method(raw: Any, i: int, file: Path, data: DataSpec) -> MethodSpec:
    where = f"methods[{i}]"
    if isinstance(raw, str) and raw == NONE_METHOD:
        raw = {"name": NONE_METHOD}
    if not isinstance(raw, dict) or not raw.get("name"):
        raise _fail(file, where, "expected {name: NAME, recipe: RECIPE, overrides: {...}} (or name: none)")
    _unknown(file, where, raw, METHOD_KEYS)
    name = str(raw["name"])
    where = f"methods[{i}] ({name})"
    if "@" in name or "/" in name:
        raise _fail(file, where, "a method name may not contain '@' or '/' (the runner adds '@STEPS' to sweeps)")
    if "run" in raw:
        return _reused(raw, name, where, file)
    recipe = _recipe({k: raw[k] for k in ("recipe", "overrides") if k in raw}, file, where)
    if name != NONE_METHOD and recipe.path is None:
        raise _fail(file, where, "needs a recipe (e.g. recipe: ddpm-cpu); use name: none for no pretraining")
    steps = sorted(_ints(raw.get("pretrain_steps"), file, f"{where}.pretrain_steps", 1)) or None
    if steps and name == NONE_METHOD:
        raise _fail(file, where, "method none has no pretraining; drop pretrain_steps")
    finetune_at = sorted(_ints(raw.get("finetune_at"), file, f"{where}.finetune_at", 1)) or None
    if finetune_at and not set(finetune_at) <= set(steps or []):
        raise _fail(file, f"{where}.finetune_at", f"{finetune_at} must be lengths listed in pretrain_steps "
                    f"({steps or 'none listed'}): the lengths of the sweep that get fine-tuned cells")
    pretext = recipe.apply(RunConfig()).corruption.method
    default_on = "source" if pretext in LABELED_METHODS else "unlabeled"
    on = raw.get("pretrain_on", default_on)
    if on not in ("unlabeled", "source"):
        raise _fail(file, f"{where}.pretrain_on", f"{on!r} is not unlabeled or source")
    if name != NONE_METHOD and on == "source" and data.source is None:
        why = (f"pretext {pretext!r} trains on labeled images and must not see the target's labels"
               if pretext in LABELED_METHODS else "pretrain_on: source")
        raise _fail(file, where, f"{why}; name a labeled source dataset in data.source")
    if pretext in LABELED_METHODS and on != "source" and name != NONE_METHOD:
        raise _fail(file, where, f"pretext {pretext!r} needs labels; it can only pretrain on data.source")
    return MethodSpec(name, recipe, steps, on, pretext, finetune_at)


def _reused(raw: dict, name: str, where: str, file: Path) -> MethodSpec:
    """``{name, run: FOLDER}``: a pretraining run the study uses as it is. Its geometry and what it read are
    checked against the study's data when the study is planned (:func:`labeldiff.study.plan.check_reused`)."""
    from labeldiff.runs import RunFolder

    extra = [k for k in raw if k not in ("name", "run")]
    if extra:
        raise _fail(file, where, f"{extra[0]!r} with run: a run of your own is used as it is (its settings are in its "
                                 f"config.json); drop {', '.join(extra)}, or drop run and give a recipe")
    if name == NONE_METHOD:
        raise _fail(file, where, "method none has no pretraining; give the run another name")
    path = resolve_path(raw["run"], file, f"{where}.run")
    try:
        run = RunFolder.open(path, flag=f"{where}.run").require_pretrain(f"{where}.run")
    except LabeldiffError as e:
        raise _fail(file, f"{where}.run", str(e).removeprefix(f"{where}.run ")) from None
    if not (path / "model.safetensors").is_file():
        raise _fail(file, f"{where}.run", f"{path} is not finished (no model.safetensors); finish it first: "
                                          f"labeldiff pretrain … --out {path} --resume")
    labeled = run.method in LABELED_METHODS
    return MethodSpec(name, Recipe(), None, "source" if labeled else "unlabeled", run.method, None, path)


def _protocols(raw: Any, file: Path) -> list[ProtocolSpec]:
    items = _list(raw, file, "protocols")
    if not items:
        return [ProtocolSpec(DEFAULT_PROTOCOL)]
    out = []
    for i, item in enumerate(items):
        where = f"protocols[{i}]"
        if not isinstance(item, dict) or not item.get("name"):
            raise _fail(file, where, "expected {name: NAME, protocol: ct|mdm|ddep|hybrid|…, overrides: {…}}")
        _unknown(file, where, item, ("name", "protocol", "strategies", "overrides"))
        name = str(item["name"])
        if not name.replace("-", "").replace("_", "").isalnum():
            raise _fail(file, where, f"name {name!r}: use letters, digits, '-' and '_' only (it is part of folder names)")
        recipe = _recipe({"overrides": item.get("overrides") or {}}, file, f"{where} ({name})")
        paper = item.get("protocol")
        if paper is not None:
            from labeldiff import protocols

            try:
                protocols.load(str(paper))
            except ConfigError as e:
                raise _fail(file, f"{where}.protocol", str(e)) from None
        only = item.get("strategies")
        if only is not None:
            only = _choices(only, file, f"{where}.strategies", STRATEGIES, [])
        out.append(ProtocolSpec(name, recipe.overrides, None if paper is None else str(paper), only or None))
    names = [p.name for p in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise _fail(file, "protocols", f"the name {dup!r} is used twice; give each protocol its own name")
    return out


def _robustness(raw: Any, file: Path) -> dict | None:
    """``robustness: true`` (every corruption, severities 1..5, seed 0) or a mapping of ``corruptions``
    (``all``, a comma string or a list of names), ``severities`` (a list in 1..5) and ``seed``."""
    from labeldiff.evaluate.corruptions import SEVERITIES, parse_corruptions, parse_severities

    if raw is None or raw is False:
        return None
    raw = {} if raw is True else raw
    if not isinstance(raw, dict):
        raise _fail(file, "robustness", f"expected true or a mapping of {', '.join(ROBUSTNESS_KEYS)}, got {raw!r}")
    _unknown(file, "robustness", raw, ROBUSTNESS_KEYS)
    names, levels = raw.get("corruptions", "all"), raw.get("severities", list(SEVERITIES))
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _fail(file, "robustness.seed", f"expected an integer, got {seed!r}")
    try:
        return {"corruptions": parse_corruptions(names if isinstance(names, str) else ",".join(map(str, names))),
                "severities": parse_severities(",".join(map(str, levels if isinstance(levels, list) else [levels]))),
                "seed": seed}
    except ValueError as e:
        raise _fail(file, "robustness", str(e)) from None


def parse_study(raw: Any, file: Path) -> Study:
    """Validate the parsed YAML ``raw`` of ``file`` into a :class:`Study`."""
    file = Path(file).resolve()
    if not isinstance(raw, dict):
        raise StudyError(f"{file}: a study file is a mapping with data, methods, strategies, labels, seeds, …")
    _unknown(file, "top level", raw, TOP_KEYS)
    prepare = raw.get("prepare")
    if prepare is not None and prepare not in PREPARE:
        raise _fail(file, "prepare", f"{prepare!r} is unknown; available: {', '.join(PREPARE)}")
    data = _data(raw.get("data"), file, prepare)
    if prepare == "volume-slabs" and data.path is None:
        raise _fail(file, "data.path", "prepare: volume-slabs slices the volume of an nnU-Net raw dataset; give its "
                                       "root (imagesTr/, labelsTr/, dataset.json), e.g. ../shared/datasets/colin27_aal")
    methods = [_method(m, i, file, data) for i, m in enumerate(_list(raw.get("methods"), file, "methods"))]
    if not methods:
        raise _fail(file, "methods", "empty; list at least one, e.g. - {name: ddpm, recipe: ddpm-cpu}")
    names = [m.name for m in methods]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise _fail(file, "methods", f"the name {dup!r} is used twice; give each method its own name")
    strategies = _choices(raw.get("strategies"), file, "strategies", STRATEGIES, [])
    if not strategies:
        raise _fail(file, "strategies", f"missing; choose from {', '.join(STRATEGIES)}")
    if NONE_METHOD in names and "scratch" not in strategies:
        raise _fail(file, "methods", "method none has no pretraining, so it only runs with strategy scratch; "
                                     "add scratch to strategies or drop the method")
    labels = _ints(raw.get("labels"), file, "labels", 1, allow_all=True)
    if not labels:
        raise _fail(file, "labels", "missing; list the numbers of labeled images k, e.g. labels: [1, 3, 30]")
    seeds = _ints(raw.get("seeds", [0]), file, "seeds", 0)
    select = _choices(raw.get("select"), file, "select", SELECTS, ["random"])
    require = raw.get("require_all_classes", False)
    if not isinstance(require, bool):
        raise _fail(file, "require_all_classes", f"expected true or false, got {require!r}")
    metrics = _choices(raw.get("metrics"), file, "metrics", METRICS, list(METRICS[:3]))
    finetune = _recipe(raw.get("finetune"), file, "finetune")
    protocols = _protocols(raw.get("protocols"), file)
    for p in protocols:
        missing = [s for s in p.strategies or [] if s not in strategies]
        if missing:
            raise _fail(file, f"protocols ({p.name}).strategies", f"{', '.join(missing)} is not among the study's "
                                                                  f"strategies ({', '.join(strategies)}); add it there")
    named = [where for where, values in [("finetune", finetune.overrides), *((f"protocols ({p.name})", p.overrides)
                                                                            for p in protocols)]
             if values.get("transfer.labeled")]
    if finetune.path is not None and (load_recipe(finetune.path).get("transfer") or {}).get("labeled"):
        named.insert(0, f"finetune.recipe ({finetune.path.name})")
    if named:
        raise _fail(file, named[0], "transfer.labeled names the images of one run; a study picks each cell's images "
                                    "itself (labels, seeds, select): drop it")
    pretrain_seeds = _ints(raw.get("pretrain_seeds"), file, "pretrain_seeds", 0) or None if "pretrain_seeds" in raw \
        else None
    if pretrain_seeds is not None:
        reused = next((m.name for m in methods if m.run is not None), None)
        if reused:
            raise _fail(file, "pretrain_seeds", f"method {reused} is one run of yours (run:), trained once; "
                                                f"pretrain_seeds trains each method once per seed: drop one of them")
    family = None
    if raw.get("family") is not None:
        family = (file.parent / str(raw["family"])).resolve()
        if not family.is_file():
            raise _fail(file, "family", f"{family} does not exist; give the registry of primaries (YAML, see "
                                        f"`labeldiff family --help`), relative to this file")
    return Study(file, data, methods, strategies, labels, seeds, select, require, finetune, metrics, prepare, protocols,
                 _robustness(raw.get("robustness"), file), pretrain_seeds=pretrain_seeds, family=family,
                 tune=parse_tune(raw.get("tune"), file, seeds))


def _read(path: Path, chain: tuple[Path, ...]) -> tuple[dict, Path | None, set]:
    """The mapping of the study file ``path`` after ``extends`` (recursively), the file it extends and
    the keys ``path`` itself sets."""
    try:
        raw = read_yaml(path)
    except ValueError as e:
        raise StudyError(str(e)) from None
    if not isinstance(raw, dict) or "extends" not in raw:
        return raw, None, set(raw) if isinstance(raw, dict) else set()
    raw = dict(raw)
    parent = resolve_path(raw.pop("extends"), path, "extends")
    if parent in chain + (path,):
        cycle = " → ".join(p.name for p in chain + (path, parent))
        raise StudyError(f"{path}: extends: the files extend each other in a loop ({cycle}); remove one extends")
    base, _, _ = _read(parent, chain + (path,))
    if not isinstance(base, dict):
        raise StudyError(f"{path}: extends: {parent} is not a study mapping")
    return {**base, **raw}, parent, set(raw)


def load_study(path: str | Path) -> Study:
    """Read and validate a study file (or a shipped example's name), following ``extends``; see the
    module docstring."""
    from labeldiff.examples import find as find_example

    try:
        path = find_example(path)
    except ConfigError as e:
        raise StudyError(str(e)) from None
    raw, parent, own = _read(path, ())
    study = parse_study(raw, path)
    study.extends, study.merged = parent, raw
    if parent is not None and own <= {"seeds"}:  # only seeds added: the same comparison, looked at again
        base = load_study(parent)
        earlier = [s for look in base.looks for s in look]
        new = [s for s in study.seeds if s not in earlier]
        if new and set(earlier) <= set(study.seeds):
            study.looks = base.looks + [new]
    return study
