"""One resolution of a run's configuration, in one documented order.

A run's settings come in layers, later ones winning::

    the defaults of its kind (pretraining or fine-tuning: the declarations of labeldiff.settings)
    < the pretrained run it starts from: its whole network and its data geometry
    < a recipe file < a study (its data options, a method's or fine-tuning's overrides, a protocol, a cell)
    < the command line (flags and --set)

then the values that follow from others are derived (the network reads ``data.channels`` channels;
``corruption.loss: auto`` becomes the method's loss; ``transfer.augment: auto`` becomes none or strong by
the number of labeled images; ddep and dep train the EfficientNet encoder–decoder, dep from random
weights). :func:`resolve` does both and checks the result (types, ranges, choices). It is
pure: it reads no file (the caller passes the pretrained run's config) and changes none of its inputs.
The config it returns records where every value that differs from the defaults came from
(``sources``) and which geometry values differ from the pretrained run's (``inherited``); a run prints
both (:func:`describe`) and stores them in its ``config.json``.

The network of a pretrained run cannot be changed (its weights are loaded strictly): a layer that gives
another ``model.*`` value, or another ``data.channels``, is refused with the reason. A flag typed on the
command line that cannot apply to the run (``--members`` without ``--strategy probe``, ``--mask-ratio``
with ``--method ddpm``) is refused too, never silently ignored.

What a run then finds in its data is recorded beside the settings, not resolved here: the number of
classes K, an intensity scheme fitted on the training volumes, ``keep_head: auto`` decided against the
target's classes, the probe features chosen by validation.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from labeldiff.config import (LOSS_BY_METHOD, RunConfig, auto_augment, check, declaration, default_config,
                              default_value, flatten, geometry_fields)
from labeldiff.errors import ConfigError

MODEL_FIELDS = tuple(name for name in flatten(RunConfig()) if name.startswith("model."))


@dataclass(frozen=True)
class Layer:
    """One layer of settings: where they come from (printed and stored) and ``{"section.field": value}``.
    ``typed``: values typed on the command line, refused where they cannot apply to the run."""

    source: str
    values: Mapping[str, Any] = field(default_factory=dict)
    typed: bool = False


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _shown(name: str) -> str:
    flag = declaration(name).flag
    return f"{flag} ({name})" if flag else name


def compose(kind: str, layers: Sequence[Layer] = (), pretrained: RunConfig | None = None,
            pretrained_from: str | None = None) -> tuple[RunConfig, dict[str, str]]:
    """The layering alone: ``(config, {name: source})``, nothing derived yet. A study names its runs by
    what this gives (the settings it was asked for), so it hashes them before derivation."""
    values = flatten(default_config(kind))
    sources: dict[str, str] = {}
    locked: dict[str, Any] = {}
    if pretrained is not None:
        pre = flatten(pretrained)
        origin = f"the pretrained run {pretrained_from or pretrained.data.path}"
        for name in MODEL_FIELDS + geometry_fields():
            values[name] = pre[name]
            sources[name] = origin
        locked = {name: pre[name] for name in MODEL_FIELDS + ("data.channels",)}
    for layer in layers:
        for name, value in layer.values.items():
            declaration(name)  # an unknown name is refused, naming it
            if name in locked and not _same(value, locked[name]):
                if name == "data.channels":
                    raise ConfigError(f"{_shown(name)} {value!r} ({layer.source}): the network of "
                                      f"{pretrained_from} reads {locked[name]}-channel images; drop it (it is taken "
                                      f"from the pretrained run)")
                if name == "model.in_channels":  # follows data.channels: derived below
                    continue
                raise ConfigError(f"{_shown(name)} {value!r} ({layer.source}): the network comes from the pretrained "
                                  f"run {pretrained_from} ({locked[name]!r}), whose weights it loads; drop it")
            values[name] = value
            sources[name] = layer.source
    cfg = RunConfig(kind=kind)
    for name, value in values.items():
        section, field_ = name.split(".")
        setattr(getattr(cfg, section), field_, tuple(value) if isinstance(value, list) and name != "data.spacing"
                else value)
    return cfg, sources


def derive(cfg: RunConfig) -> dict[str, str]:
    """Set, in ``cfg``, the values that follow from others; returns ``{name: why}`` of those it changed.
    Idempotent: a config it derived before is left as it is."""
    from labeldiff.corruption import build_corruption

    why: dict[str, str] = {}

    def put(name: str, value: Any, reason: str) -> None:
        section, field_ = name.split(".")
        if not _same(getattr(getattr(cfg, section), field_), value):
            setattr(getattr(cfg, section), field_, value)
            why[name] = reason

    put("model.in_channels", cfg.data.channels, "derived: the network reads data.channels channels")
    if cfg.kind == "segmentation" and cfg.transfer.labeled:
        put("transfer.labels", len(cfg.transfer.labeled), "derived: the number of --labeled images")
    if cfg.kind == "segmentation" and cfg.transfer.augment == "auto":
        put("transfer.augment", auto_augment(cfg.transfer.labels, cfg.transfer.label_unit),
            f"derived: --augment auto for {cfg.transfer.labels} labeled {cfg.transfer.label_unit}")
    if cfg.kind == "pretrain":
        c = cfg.corruption
        if c.loss == "auto":
            put("corruption.loss", LOSS_BY_METHOD.get(c.method, "auto"), f"derived: the loss of {c.method}")
        if c.method in ("ddep", "dep") and cfg.model.arch == "unet":
            put("model.arch", "efficientnet-unet", f"derived: {c.method} trains the EfficientNet encoder–decoder")
        if c.method == "dep":
            put("model.encoder", "none", "derived: dep trains the encoder from random weights")
        corruption = build_corruption(c)
        if cfg.model.arch not in corruption.archs:
            feeds = ": it feeds a timestep, which only the diffusion UNet reads" if "unet" in corruption.archs else ""
            raise ConfigError(f"--method {c.method} cannot train --arch {cfg.model.arch} (it needs "
                              f"{', '.join(corruption.archs)}{feeds})")
    return why


def resolve(kind: str, layers: Sequence[Layer] = (), pretrained: RunConfig | None = None,
            pretrained_from: str | None = None) -> RunConfig:
    """The configuration of a run of ``kind`` (``pretrain`` | ``segmentation``) from its layers (see the
    module docstring), derived, checked, with ``sources`` and ``inherited`` recorded."""
    cfg, sources = compose(kind, layers, pretrained, pretrained_from)
    check_labeled(cfg, layers)
    sources.update(derive(cfg))
    if pretrained is not None:
        pre = flatten(pretrained)
        now = flatten(cfg)
        changed = {name: {"pretrained": pre[name], "used": now[name]} for name in geometry_fields()
                   if not _same(pre[name], now[name])}
        cfg.inherited = {"from": str(pretrained_from), "changed": changed}
    for layer in layers:
        if not layer.typed:
            continue
        for name in layer.values:
            rule = declaration(name).applies
            reason = rule(cfg) if rule is not None else None
            if reason:
                raise ConfigError(f"{_shown(name)} does not apply to this run: {reason}; drop it")
    check(cfg)
    now = flatten(cfg)
    cfg.sources = {name: src for name, src in sources.items() if not _same(now[name], default_value(name, kind))}
    return cfg


def check_labeled(cfg: RunConfig, layers: Sequence[Layer]) -> None:
    """``transfer.labeled`` names the images, so ``transfer.labels`` is their count: a layer that gives
    another count is refused (the two would say different things)."""
    named = cfg.transfer.labeled
    if cfg.kind != "segmentation" or not named:
        return
    named = tuple(dict.fromkeys(named))
    cfg.transfer.labeled = named
    for layer in layers:
        k = layer.values.get("transfer.labels")
        if k is not None and k != len(named):
            shown = ", ".join(named[:4]) + (", …" if len(named) > 4 else "")
            raise ConfigError(f"--labels {k} ({layer.source}) but --labeled names {len(named)} image"
                              f"{'s' if len(named) != 1 else ''} ({shown}); drop --labels (it is their count) or "
                              f"name {k}")


def nondefault(cfg: RunConfig) -> dict[str, Any]:
    """``{name: value}`` of the settings of ``cfg`` that differ from its kind's defaults: a config built in
    Python, as a layer."""
    return {name: value for name, value in flatten(cfg).items() if not _same(value, default_value(name, cfg.kind))}


def resolved(cfg: RunConfig, pretrained: RunConfig | None = None, pretrained_from: str | None = None) -> RunConfig:
    """``cfg`` if it was resolved already (it records its ``sources``), else resolved now with its
    non-default values as one layer (a config built in Python, e.g. by a test or a notebook)."""
    if cfg.sources is not None:
        return cfg
    return resolve(cfg.kind, [Layer("the given config", nondefault(cfg))], pretrained, pretrained_from)


def describe(cfg: RunConfig) -> list[str]:
    """Lines saying which settings differ from the defaults and where each came from, and which geometry
    values differ from the pretrained run's."""
    lines = []
    flat = flatten(cfg)
    by_source: dict[str, list[str]] = {}
    for name, source in (cfg.sources or {}).items():
        if name == "data.path" or source.startswith("derived"):
            continue
        by_source.setdefault(source, []).append(f"{name}={_text(flat[name])}")
    for source, items in by_source.items():
        lines.append(f"  {source}: {', '.join(items)}")
    for name, change in ((cfg.inherited or {}).get("changed") or {}).items():
        lines.append(f"  {name}: the pretrained run used {_text(change['pretrained'])}, this run uses "
                     f"{_text(change['used'])}, as given")
    return (["settings that differ from the defaults:"] + lines) if lines else []


def _text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(_text(v) for v in value)
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)
