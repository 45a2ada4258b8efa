"""The RunConfigs a study trains, and the hashes that name their cached folders.

Precedence, lowest first: labeldiff's defaults (those of ``labeldiff pretrain`` / ``finetune``), the
recipe, the study's ``data`` options, the method's (or ``finetune``'s) overrides, then what the
runner sets per run (data paths, ``train.steps`` of a sweep, and per cell: strategy, k, seed).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from labeldiff.config import (ModelConfig, RunConfig, apply_overrides, default_finetune_config,
                              default_pretrain_config, load_recipe, merge_recipe)
from labeldiff.corruption.masking import resolve_loss
from labeldiff.study.spec import MethodSpec, ProtocolSpec, Recipe, Study

# DataConfig fields that also shape pretraining inputs (split / class settings are the target's)
PRETRAIN_DATA_FIELDS = ("size", "mode", "scale", "channels", "cache_mb", "num_workers", "include_test", "axis", "intensity")
# fields that do not change what a run computes: left out of the hashes
NOT_RESULT = {"data": ("cache_mb", "num_workers"), "train": ("log_every", "checkpoint_every")}
LATER_DEFAULTS = {"data": {"axis": 2, "intensity": None, "ignore_index": None}, "transfer": {"label_unit": "slices"}}  # fields added later: at their default, runs hash as before


def digest(obj: Any, n: int = 10) -> str:
    """A short, stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def identity(cfg: RunConfig) -> dict:
    """``cfg.to_dict()`` without the fields that do not change the result.

    The dataset path stays (another dataset is another result); ``transfer.pretrained`` and
    ``data.split_file`` are dropped: the callers hash the pretrained run's identity and the split's
    stems instead of these paths.
    """
    d = cfg.to_dict()
    for section, names in NOT_RESULT.items():
        for name in names:
            d[section].pop(name, None)
    d["transfer"]["pretrained"] = None
    d["data"]["split_file"] = None
    if d.get("extended") is None:  # runs saved before the field existed hash as they did
        d.pop("extended", None)
    for section, defaults in LATER_DEFAULTS.items():
        for name, value in defaults.items():
            if d[section].get(name, value) == value:
                d[section].pop(name, None)
    return d


def _layered(base: RunConfig, recipe: Recipe, data: dict[str, Any]) -> RunConfig:
    """defaults → recipe file → the study's data options → the recipe's overrides."""
    if recipe.path is not None:
        base = merge_recipe(base, load_recipe(recipe.path))
    return apply_overrides(apply_overrides(base, data), recipe.overrides)


def _data_overrides(study: Study, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {f"data.{k}": v for k, v in study.data.options.items() if names is None or k in names}


def pretrain_config(study: Study, method: MethodSpec, steps: int | None, pool: Path | None = None) -> RunConfig:
    """The pretraining config of ``method`` (``steps`` from a ``pretrain_steps`` sweep, or None);
    ``pool``: the folder :func:`labeldiff.study.prepare.build_pool` made of a ``data.unlabeled`` list."""
    cfg = _layered(default_pretrain_config(), method.recipe, _data_overrides(study, PRETRAIN_DATA_FIELDS))
    cfg.corruption.loss = resolve_loss(cfg.corruption.method, cfg.corruption.loss)  # as run_pretrain stores it
    if steps is not None:
        cfg.train.steps = steps
    d = study.data
    if method.pretrain_on == "source":
        cfg.data.path = str(d.source)
        cfg.data.train_split, cfg.data.split_file = d.source_split, None
    elif d.pool and pool is not None:
        cfg.data.path, cfg.data.split_file = str(pool), None
    elif d.unlabeled is not None:
        cfg.data.path = str(d.unlabeled)
    else:  # the target's own images: its test split is left out unless data.include_test
        cfg.data.path = str(d.path)
        cfg.data.split_file = str(d.split_file) if d.split_file else None
        cfg.data.test_split = d.options.get("test_split", cfg.data.test_split)
    return cfg


def pretrain_key(cfg: RunConfig, continues: str | None = None, out: Path | None = None) -> str:
    """The hash naming a pretraining run's folder: its identity, the test images it leaves out, and the
    key of the shorter run it continues (a ``pretrain_steps`` sweep).

    ``out``: the study folder. Data a study prepared inside it (``prepare``: ``OUT/data/…``) is named
    by its place there, so two studies with different ``--out`` that prepare the same data share the
    run through ``--pretrain-dir`` instead of each training its own."""
    from labeldiff.data.splits import pretraining_exclusions

    d = identity(cfg)
    for unread in ("transfer", "inherited", "extended"):  # pretraining reads none of these
        d.pop(unread, None)
    if out is not None and d["data"].get("path"):
        path, out = Path(d["data"]["path"]).resolve(), Path(out).resolve()
        if path.is_relative_to(out):
            d["data"]["path"] = "OUT/" + path.relative_to(out).as_posix()
    extra = {"continues": continues} if continues else {}
    return digest({**d, "excluded": pretraining_exclusions(cfg.data)[0], **extra})


def run_name(method: MethodSpec, steps: int | None) -> str:
    return method.name if steps is None else f"{method.name}@{steps}"


def pretrain_runs(study: Study) -> list[tuple[str, MethodSpec, int | None]]:
    """``(name, method, steps)`` of every pretraining run (method ``none`` has none)."""
    return [(run_name(m, s), m, s) for m in study.methods if m.pretrains for s in (m.pretrain_steps or [None])]


def resolved_model(cfg: RunConfig) -> ModelConfig:
    """The network ``run_pretrain`` would build for ``cfg`` (channels from the data, ddep → efficientnet)."""
    from labeldiff.corruption import build_corruption
    from labeldiff.pretrain.run import resolve_method

    c = RunConfig.from_dict(cfg.to_dict())
    c.model.in_channels = c.data.channels
    resolve_method(c, build_corruption(c.corruption))
    return c.model


def arch_key(model: ModelConfig) -> str:
    return digest(asdict(model), 8)


def finetune_explicit(study: Study) -> set[str]:
    """The data fields a study sets for its cells (its data options, the finetune recipe's data section):
    what :meth:`labeldiff.runs.RunFolder.inherit` keeps when they differ from the pretrained run."""
    names = {f"data.{k}" for k in study.data.options}
    if study.finetune.path is not None:
        names |= {f"data.{k}" for k in (load_recipe(study.finetune.path).get("data") or {})}
    names |= {k for p in study.protocols for k in p.overrides if k.startswith("data.")}
    return names | {k for k in study.finetune.overrides if k.startswith("data.")}


def finetune_config(study: Study, protocol: ProtocolSpec | None = None) -> RunConfig:
    """Fine-tuning settings shared by every cell of ``protocol`` (cells add data paths, strategy, k, seed,
    network): defaults → finetune recipe → data options → finetune overrides → the protocol's overrides."""
    cfg = _layered(default_finetune_config(), study.finetune, _data_overrides(study))
    if protocol is not None:
        cfg = apply_overrides(cfg, protocol.overrides)
    cfg.data.path = str(study.data.path)
    return cfg


def write_json(path: Path, obj: Any) -> None:
    from labeldiff.checkpoint import atomic_write_text

    atomic_write_text(Path(path), json.dumps(obj, indent=2, default=str))
