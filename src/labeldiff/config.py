"""A run's configuration: :class:`RunConfig` (what ``config.json`` holds), and everything that reads the
declarations of :mod:`labeldiff.settings`: defaults per kind of run, checks of types, ranges and choices,
values from text (flags, ``--set``) and recipes, and the comparison of two configs. The argument parser
(:mod:`labeldiff.cli`), the reference pages (:mod:`labeldiff.cli.reference`) and the validation of
study overrides use these; :mod:`labeldiff.resolve` resolves a run's configuration from its layers.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from labeldiff.errors import ConfigError, RunFolderError
from labeldiff.settings import (BOTH, DENOISING, DIFFUSION, FINETUNE, LOSS_BY_METHOD, PRETRAIN, SAME, SECTIONS,  # noqa: F401
                                STRATEGIES, CorruptionConfig, DataConfig, ModelConfig, Setting, TrainConfig,
                                TransferConfig, auto_augment)

FLOAT32_MAX = 3.4028234663852886e38  # the network and optimiser compute in float32 at most
KINDS = ("pretrain", "segmentation")  # RunConfig.kind: a pretraining run, or a transfer (fine-tuning, probe)


@dataclass
class RunConfig:
    """Everything needed to rebuild a run: what ``config.json`` in a run folder holds."""

    kind: str = "pretrain"  # pretrain | segmentation
    model: ModelConfig = field(default_factory=ModelConfig)
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    num_classes: int | None = None
    # records of how the run came about (not settings; never compared on resume, never hashed by studies):
    # a transfer's pretrained run and the geometry values given that differ from it
    # ({"from": RUN, "changed": {"data.scale": {"pretrained", "used"}}}),
    inherited: dict[str, Any] | None = None
    # each extension by a resume with more train.steps ({"at_step", "from_steps", "to_steps"}),
    extended: list[dict[str, Any]] | None = None
    # and where each value that differs from the defaults came from ({"train.lr": "command line", ...})
    sources: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in SECTIONS:
                kwargs[key] = _section(SECTIONS[key], value)
            elif key in {f.name for f in fields(cls)}:
                kwargs[key] = value
            else:
                raise ConfigError(f"unknown config key {key!r}; known: {[f.name for f in fields(cls)]}")
        return cls(**kwargs)

    def save(self, path: Path) -> None:
        from labeldiff.fs import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        """A run folder's ``config.json``; a torn, edited or foreign file is a :class:`RunFolderError` of
        one line naming it (with what is wrong)."""
        path = Path(path)
        fix = "restore it (labeldiff writes it whole, in one rename) or train the run again with --overwrite"
        try:
            raw = json.loads(path.read_text())
        except ValueError as e:
            raise RunFolderError(f"{path}: not valid JSON ({e}); {fix}") from None
        if not isinstance(raw, dict):
            raise RunFolderError(f"{path}: not a run configuration (a JSON object); {fix}")
        try:
            cfg = cls.from_dict(raw)
            check_types(cfg)
        except (ValueError, TypeError) as e:
            raise RunFolderError(f"{path}: {e}; {fix}") from None
        return cfg


RECORDS = ("inherited", "extended", "sources")  # RunConfig fields that record, not set


def _section(kind: type, value: dict[str, Any]) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{kind.__name__} must be a mapping of its fields, not {value!r}")
    known = {f.name: f for f in fields(kind)}
    unknown = set(value) - set(known)
    if unknown:
        raise ConfigError(f"unknown {kind.__name__} field(s) {sorted(unknown)}; known: {sorted(known)}")
    out = {}
    for k, v in value.items():
        out[k] = tuple(v) if isinstance(v, list) else v
    for name, f in known.items():  # a setting added after the file was written: what the file's run did
        absent = f.metadata["setting"].absent if "setting" in f.metadata else SAME
        if name not in out and absent is not SAME:
            out[name] = absent
    return kind(**out)


# --- the declarations, read -------------------------------------------------------------------------------------

def declared() -> list[tuple[str, dataclasses.Field, Setting]]:
    """``(dotted name, field, Setting)`` of every setting, in declaration order."""
    return [(f"{section}.{f.name}", f, f.metadata["setting"]) for section, kind in SECTIONS.items()
            for f in fields(kind)]


def declaration(dotted: str) -> Setting:
    section, _, name = dotted.partition(".")
    if section not in SECTIONS or name not in {f.name for f in fields(SECTIONS[section])}:
        raise ConfigError(f"unknown setting {dotted!r}; settings are section.field with section one of "
                          f"{', '.join(SECTIONS)} (see docs/reference/settings.md)")
    return next(f for f in fields(SECTIONS[section]) if f.name == name).metadata["setting"]


@functools.lru_cache(maxsize=None)
def _hints(section: str) -> dict[str, Any]:
    return typing.get_type_hints(SECTIONS[section])


def annotation(dotted: str) -> Any:
    section, name = dotted.split(".")
    return _hints(section)[name]


def default_value(dotted: str, kind: str = "pretrain") -> Any:
    """The default of a setting for a run of ``kind``."""
    section, name = dotted.split(".")
    f = next(f for f in fields(SECTIONS[section]) if f.name == name)
    meta = f.metadata["setting"]
    if kind == "segmentation" and meta.finetune is not SAME:
        return meta.finetune
    return f.default if f.default is not MISSING else f.default_factory()


def geometry_fields() -> tuple[str, ...]:
    """The data fields a transfer takes from its pretrained run (declared ``geometry``)."""
    return tuple(name for name, _, meta in declared() if meta.geometry)


def not_result_fields() -> tuple[str, ...]:
    """The fields that change how a run is computed, not what (declared ``result=False``)."""
    return tuple(name for name, _, meta in declared() if not meta.result)


def resume_may_change() -> frozenset[str]:
    """What a resume may change: a run's length (an extension, recorded in ``extended``) and how and where
    the same computation runs. Any other difference from the stored config.json is refused."""
    return frozenset(name for name, _, meta in declared() if meta.resume or not meta.result)


def default_config(kind: str = "pretrain") -> RunConfig:
    """Every setting at its declared default for a run of ``kind`` (pretrain | segmentation)."""
    cfg = RunConfig(kind=kind)
    if kind == "segmentation":
        for name, _, meta in declared():
            if meta.finetune is not SAME:
                section, field_ = name.split(".")
                setattr(getattr(cfg, section), field_, meta.finetune)
    return cfg


def default_pretrain_config() -> RunConfig:
    """What ``labeldiff pretrain`` starts from before a recipe and flags."""
    return default_config("pretrain")


def default_finetune_config() -> RunConfig:
    """What ``labeldiff finetune`` (and a study's cells) start from: 300 steps, the CT paper's lr."""
    return default_config("segmentation")


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """``{"section.field": value}`` of every setting of ``cfg``."""
    return {name: getattr(getattr(cfg, name.split(".")[0]), name.split(".")[1]) for name, _, _ in declared()}


# --- checks, generated from the declarations -------------------------------------------------------------------

def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a JSON-loaded ``value`` fits the field annotation ``hint`` (int, float, str, bool, tuples,
    lists, dicts and their ``| None``)."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        item = args[0] if args else Any
        return isinstance(value, (tuple, list)) and all(_type_ok(v, item) for v in value)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check_types(cfg: RunConfig) -> None:
    """Every field has the type its declaration says (a config.json edited by hand with
    ``"num_classes": "three"``, a recipe with ``lr: fast``), naming the field."""
    hints = typing.get_type_hints(RunConfig)
    for name in ("kind", "num_classes", *RECORDS):
        if not _type_ok(getattr(cfg, name), hints[name]):
            raise ConfigError(f"{name} is {getattr(cfg, name)!r}, not {_type_name(hints[name])}")
    for name, value in flatten(cfg).items():
        if not _type_ok(value, annotation(name)):
            raise ConfigError(f"{name} is {value!r}, not {_type_name(annotation(name))}")


def _where(name: str, meta: Setting) -> str:
    return meta.flag or name


def check_ranges(cfg: RunConfig) -> None:
    """Every number within its declared range, finite and within float32's, and every choice one of its
    declared choices; else a one-line :class:`ConfigError` naming the flag (or the setting). Run before
    any data is read or any folder written."""
    spacing = cfg.data.spacing
    if spacing is not None and (len(spacing) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf for v in spacing)):
        raise ConfigError(f"--spacing must be three positive sizes in mm, x,y,z (got {spacing})")
    for name, value in flatten(cfg).items():
        meta = declaration(name)
        where = _where(name, meta)
        if meta.choices is not None and value not in meta.choices:
            shown = ", ".join(str(int(c)) if isinstance(c, bool) else str(c) for c in meta.choices)
            raise ConfigError(f"{where} {value!r} is not one of {shown}")
        if value is None and type(None) in typing.get_args(annotation(name)):
            continue
        if meta.lo is None and meta.hi is None:
            continue
        numbers = list(value) if isinstance(value, (tuple, list)) else [value]
        for v in numbers:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise ConfigError(f"{where} must be a number, not {v!r}")
            if not math.isfinite(v) or abs(v) > FLOAT32_MAX:
                raise ConfigError(f"{where} must be a finite number within float32's range, ±3.4e38 (got {v})")
            if meta.lo is not None and (v < meta.lo or (v == meta.lo and meta.lo_open)):
                raise ConfigError(f"{where} must be {'>' if meta.lo_open else '≥'} {meta.lo:g} (got {v:g})")
            if meta.hi is not None and (v > meta.hi or (v == meta.hi and meta.hi_open)):
                raise ConfigError(f"{where} must be {'<' if meta.hi_open else '≤'} {meta.hi:g} (got {v:g})")
    if cfg.transfer.t >= cfg.corruption.num_timesteps:
        raise ConfigError(f"--t must be below the diffusion steps T = {cfg.corruption.num_timesteps} "
                          f"(got {cfg.transfer.t})")
    if cfg.transfer.synthetic:
        parse_synthetic(cfg.transfer.synthetic)


def check(cfg: RunConfig) -> None:
    """Types, ranges and choices of every setting (:func:`check_types`, :func:`check_ranges`)."""
    check_types(cfg)
    check_ranges(cfg)


def check_transfer(t: TransferConfig) -> None:
    """The fine-tuning protocol's settings (its choices and ranges), with errors that list them."""
    cfg = RunConfig(kind="segmentation", transfer=t)
    check(cfg)


def parse_synthetic(spec: str) -> tuple[Path, int]:
    """``transfer.synthetic`` ``"RUN:N"`` → (hybrid run folder, N ≥ 1), with an error that shows the form."""
    run, sep, n = str(spec).rpartition(":")
    if not sep or not run or not n.strip().isdigit() or int(n) < 1:
        raise ConfigError(f"--synthetic {spec!r}: give RUN:N, a hybrid run folder and how many pairs to add, "
                          f"e.g. --synthetic runs/hybrid:100")
    return Path(run), int(n)


# --- values from text, files and other configs -----------------------------------------------------------------

def parse_value(dotted: str, text: str) -> Any:
    """The value of a setting from text (a flag's argument, ``--set name=value``): numbers, ``a,b,c``
    lists for tuple settings, 0/1/true/false for booleans, ``none`` for optional ones."""
    meta = declaration(dotted)
    hint = annotation(dotted)
    union = typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None))
    args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    text = str(text).strip()
    if type(None) in typing.get_args(hint) and text.lower() in ("none", "null", ""):
        return None
    if meta.choices is not None and any(c == "auto" for c in meta.choices) and text.lower() == "auto":
        return "auto"

    def one(kind: Any, s: str) -> Any:
        if kind is bool:
            low = s.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{meta.flag or dotted}: {s!r} is not 0/1 (or true/false)")
        if kind is int:
            try:
                return int(s)
            except ValueError:
                raise ConfigError(f"{meta.flag or dotted}: {s!r} is not an integer") from None
        if kind is float:
            try:
                return float(s)
            except ValueError:
                raise ConfigError(f"{meta.flag or dotted}: {s!r} is not a number") from None
        return s

    kind = args[0]
    origin = typing.get_origin(kind)
    if origin in (tuple, list):
        item = typing.get_args(kind)[0]
        values = [one(item, v) for v in text.split(",") if v.strip() != ""]
        if not values:
            raise ConfigError(f"{meta.flag or dotted}: give comma-separated values, e.g. {meta.metavar or '1,2'}")
        return tuple(values) if origin is tuple else values
    if hint == (bool | str):
        return one(bool, text)
    return one(kind, text)


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """A copy of ``cfg`` with ``{"section.field": value}`` overrides applied (None = keep)."""
    d = cfg.to_dict()
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, name = dotted.partition(".")
        if section not in SECTIONS or name not in d[section]:
            raise ConfigError(f"unknown setting {dotted}")
        d[section][name] = list(value) if isinstance(value, tuple) else value
    return RunConfig.from_dict(d)


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a syntax error is a ConfigError of one line with where it is."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(errors="replace"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where} ({what}); fix the syntax") from None


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML (sections as in :class:`RunConfig`) into a plain dict; ``path`` is a shipped
    name (``ddpm-cpu``) or a file (:func:`labeldiff.recipes.find`)."""
    from labeldiff.recipes import find

    p = find(path)
    data = read_yaml(p) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{p}: a recipe maps sections ({', '.join(sorted(SECTIONS))}) to their settings")
    return data


def recipe_values(recipe: dict[str, Any], where: str = "recipe") -> dict[str, Any]:
    """A recipe's ``{section: {field: value}}`` as ``{"section.field": value}``, every name checked."""
    out = {}
    for section, values in recipe.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}: section {section!r} is unknown; use {', '.join(SECTIONS)}")
        for name, value in (values or {}).items():
            declaration(f"{section}.{name}")
            out[f"{section}.{name}"] = value
    return out


def merge_recipe(cfg: RunConfig, recipe: dict[str, Any]) -> RunConfig:
    return apply_overrides(cfg, recipe_values(recipe))


def replace(obj: Any, **changes: Any) -> Any:
    return dataclasses.replace(obj, **changes)


# --- comparing two configs -------------------------------------------------------------------------------------

PATH_FIELDS = ("data.path", "data.split_file", "transfer.pretrained", "model.encoder")  # compared as real paths


def _flat(cfg: RunConfig) -> dict[str, Any]:
    out = {k: v for k, v in cfg.to_dict().items() if k not in SECTIONS and k not in RECORDS}
    out.update(flatten(cfg))
    for key in PATH_FIELDS:
        value = out.get(key)
        if isinstance(value, str) and value and os.path.exists(value):
            out[key] = os.path.realpath(value)
    return out


def config_diff(a: RunConfig, b: RunConfig) -> list[tuple[str, Any, Any]]:
    """``[(dotted name, a's value, b's value)]`` of every setting that differs (paths compared as the
    folders they name, tuples and lists alike; the records ``inherited``, ``extended``, ``sources`` are no
    settings)."""
    fa, fb = _flat(a), _flat(b)

    def same(x: Any, y: Any) -> bool:
        return json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)

    return [(k, fa.get(k), fb.get(k)) for k in fa if not same(fa.get(k), fb.get(k))]


RESUME_MAY_CHANGE = resume_may_change()
AUGMENT_LEVELS = tuple(c for c in declaration("transfer.augment").choices if c != "auto")  # labeldiff.data.augment
LABEL_UNITS = declaration("transfer.label_unit").choices


def check_augment(level: str, flips: str) -> None:
    """An augmentation level and mirrorings from their declared choices (for callers outside a config)."""
    for name, value, choices in (("transfer.augment", level, AUGMENT_LEVELS),
                                 ("transfer.flips", flips, declaration("transfer.flips").choices)):
        if value not in choices:
            raise ConfigError(f"{declaration(name).flag} {value!r} is not one of {', '.join(choices)}")
