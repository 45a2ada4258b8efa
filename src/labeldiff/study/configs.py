"""The RunConfigs a study trains, and the hashes that name their cached folders.

Every config comes from :mod:`labeldiff.resolve` with the study's layers, lowest first: labeldiff's
defaults (those of ``labeldiff pretrain`` / ``finetune``), the recipe, the study's ``data`` options, the
method's (or ``finetune``'s) overrides, a protocol's overrides, then what the runner sets per run (data
paths, ``train.steps`` of a sweep, and per cell: strategy, k, seed, the network of a scratch cell). A run
is named by the hash of the settings it was asked for (:func:`labeldiff.resolve.compose`, before
derivation), so studies written before the resolution was one function keep their names.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from labeldiff.config import (LOSS_BY_METHOD, ModelConfig, RunConfig, geometry_fields, load_recipe, not_result_fields,
                              recipe_values)
from labeldiff.resolve import Layer, compose, derive
from labeldiff.study.spec import MethodSpec, ProtocolSpec, Recipe, Study

# DataConfig fields that also shape pretraining inputs: its geometry, how it is read, and include_test
# (split / class settings are the target's)
PRETRAIN_DATA_FIELDS = tuple(dict.fromkeys(
    [n.split(".")[1] for n in geometry_fields() + not_result_fields() if n.startswith("data.")] + ["include_test"]))
# fields that do not change what a run computes: left out of the hashes
NOT_RESULT: dict[str, list[str]] = {}
for _name in not_result_fields():
    NOT_RESULT.setdefault(_name.split(".")[0], []).append(_name.split(".")[1])
# fields added later: at these values (what runs did before them) runs hash as before. DDeP's noise was added on
# [-1, 1] ("signed") before noise_range existed, so a "unit" run is another result with another id.
LATER_DEFAULTS = {"data": {"axis": 2, "intensity": None, "ignore_index": None},
                  "transfer": {"label_unit": "slices", "labeled": None, "probe_batch": 1024, "probe_max_epochs": 50},
                  "train": {"lr_schedule": "linear"},
                  "corruption": {"noise_range": "signed", "image_weight": 1.0}}
ONLY_FOR = {("corruption", "noise_range"): ("ddep", "dep")}  # a later field hashed only for these methods


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
    d.pop("sources", None)  # a record of where values came from, not a setting
    if d.get("extended") is None:  # runs saved before the field existed hash as they did
        d.pop("extended", None)
    for (section, name), methods in ONLY_FOR.items():
        if d["corruption"]["method"] not in methods:
            d[section].pop(name, None)
    for section, defaults in LATER_DEFAULTS.items():
        for name, value in defaults.items():
            if d[section].get(name, value) == value:
                d[section].pop(name, None)
    return d


def layers(study: Study, recipe: Recipe, data_fields: tuple[str, ...] | None = None,
           protocol: ProtocolSpec | None = None) -> list[Layer]:
    """A study's layers for a recipe: the recipe file, the study's data options (``data_fields`` of them,
    or all), the recipe's overrides, a protocol's overrides."""
    where = f"study {study.file.name}"
    out = []
    if recipe.path is not None:
        out.append(Layer(f"recipe {recipe.path.stem}", recipe_values(load_recipe(recipe.path), str(recipe.path))))
    out.append(Layer(f"{where}, data", {f"data.{k}": v for k, v in study.data.options.items()
                                        if data_fields is None or k in data_fields}))
    out.append(Layer(f"{where}, overrides", dict(recipe.overrides)))
    if protocol is not None and protocol.paper is not None:
        from labeldiff import protocols

        out.append(Layer(f"protocol {protocol.paper}", protocols.load(protocol.paper).values("segmentation")))
    if protocol is not None:
        out.append(Layer(f"{where}, protocol {protocol.name}", dict(protocol.overrides)))
    return out


def pretrain_layers(study: Study, method: MethodSpec, steps: int | None, pool: Path | None = None,
                    seed: int | None = None) -> list[Layer]:
    """The layers of ``method``'s pretraining (``steps`` from a ``pretrain_steps`` sweep, or None; ``seed``
    from ``pretrain_seeds``, or None: the recipe's); ``pool``: the folder
    :func:`labeldiff.study.prepare.build_pool` made of a ``data.unlabeled`` list."""
    d = study.data
    run: dict[str, Any] = {}
    if steps is not None:
        run["train.steps"] = steps
    if seed is not None:
        run["train.seed"] = seed
    if method.pretrain_on == "source":
        run.update({"data.path": str(d.source), "data.train_split": d.source_split, "data.split_file": None})
    elif d.pool and pool is not None:
        run.update({"data.path": str(pool), "data.split_file": None})
    elif d.unlabeled is not None:
        run["data.path"] = str(d.unlabeled)
    else:  # the target's own images: its test split is left out unless data.include_test
        run.update({"data.path": str(d.path), "data.split_file": str(d.split_file) if d.split_file else None,
                    "data.test_split": d.options.get("test_split", "test")})
    return layers(study, method.recipe, PRETRAIN_DATA_FIELDS) + [Layer(f"study {study.file.name}, run", run)]


def pretrain_config(study: Study, method: MethodSpec, steps: int | None, pool: Path | None = None,
                    seed: int | None = None) -> RunConfig:
    """The settings :func:`pretrain_layers` compose (what names the run; ``run_pretrain`` derives the rest)."""
    cfg, _ = compose("pretrain", pretrain_layers(study, method, steps, pool, seed))
    if cfg.corruption.loss == "auto":  # the loss is named in the hash as run_pretrain stores it
        cfg.corruption.loss = LOSS_BY_METHOD.get(cfg.corruption.method, "auto")
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


PRETRAIN_SEED_MARK = "~p"  # "ddpm@2000~p1": the run of pretraining seed 1


def run_name(method: MethodSpec, steps: int | None, seed: int | None = None) -> str:
    name = method.name if steps is None else f"{method.name}@{steps}"
    return name if seed is None else f"{name}{PRETRAIN_SEED_MARK}{seed}"


def pretrain_runs(study: Study) -> list[tuple[str, MethodSpec, int | None, int | None]]:
    """``(name, method, steps, seed)`` of every pretraining run (method ``none`` has none): per method, per
    pretraining seed (``pretrain_seeds``; None: one run, the recipe's seed), each length of its sweep."""
    return [(run_name(m, s, p), m, s, p) for m in study.methods if m.pretrains
            for p in (study.pretrain_seeds if study.pretrain_seeds and m.run is None else [None])
            for s in (m.pretrain_steps or [None])]


def resolved_model(cfg: RunConfig) -> ModelConfig:
    """The network ``run_pretrain`` builds for ``cfg`` (its derived values: channels from the data, ddep →
    efficientnet)."""
    c = RunConfig.from_dict(cfg.to_dict())
    derive(c)
    return c.model


def arch_key(model: ModelConfig) -> str:
    return digest(asdict(model), 8)


def finetune_layers(study: Study, protocol: ProtocolSpec | None = None, tuned: dict | None = None) -> list[Layer]:
    """The layers every cell of ``protocol`` shares: finetune recipe → data options → finetune overrides →
    the protocol's overrides → the target's path (cells add strategy, k, seed, the network); with ``tuned``,
    a point of the study's ``tune`` grid on top (:func:`tuned_layer`)."""
    return layers(study, study.finetune, None, protocol) + [
        Layer(f"study {study.file.name}, data", {"data.path": str(study.data.path)})] + tuned_layer(tuned)


def tuned_layer(tuned: dict | None) -> list[Layer]:
    """A point of a ``tune`` grid as the layer above the protocol's: a tuning cell's grid value, or the one
    its arm chose for a confirmation cell (none without ``tune``)."""
    return [Layer("study tune", dict(tuned))] if tuned else []


def finetune_config(study: Study, protocol: ProtocolSpec | None = None, tuned: dict | None = None) -> RunConfig:
    """Fine-tuning settings shared by every cell of ``protocol`` (:func:`finetune_layers`, composed):
    what names a cell, with its own values."""
    return compose("segmentation", finetune_layers(study, protocol, tuned))[0]


def write_json(path: Path, obj: Any) -> None:
    from labeldiff.fs import atomic_write_text

    atomic_write_text(Path(path), json.dumps(obj, indent=2, default=str))
