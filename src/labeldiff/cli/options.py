"""The building blocks of the parser: the one vocabulary, the argparse types with finite ranges, and the
options generated from the declared settings (:mod:`labeldiff.settings`): a declaration with a ``flag`` and
the command among its ``commands`` becomes an option of that command, in the group of its section, with its
help, its default for that command, its choices and its parser."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# One name per concept across every command (the reference lists it; a test walks every parser and
# fails when a concept appears under another name).
VOCABULARY = {
    "--model": "the run being used (a run folder written by pretrain or finetune)",
    "--pretrained": "the run to start from (a pretraining run folder)",
    "--data": "the dataset (a folder of images, a dataset root, or an nnU-Net raw volume dataset)",
    "--input": "the images (or volumes) to predict",
    "--out": "where the command writes (a run folder, a report folder, a file)",
    "--labels": "the number of labeled images k",
    "--seed": "a random seed",
    "--overwrite": "replace what --out holds (only a labeldiff run, or outputs labeldiff wrote)",
    "--device": "where the network runs: auto, cpu or cuda[:N]",
    "--precision": "the number format the network computes in",
}
# names that would say one of those concepts a second way
SYNONYMS = ("--images", "--dataset", "--input-dir", "--run", "--run-dir", "--checkpoint", "--model-dir", "--k",
            "--num-labels", "--n-labels", "--output", "--out-dir", "--output-dir", "--from-scratch", "--force",
            "--random-seed", "--pretrained-run")

GROUPS = {"data": "data", "train": "training", "model": "network", "corruption": "pretext task",
          "transfer": "transfer"}
KIND = {"pretrain": "pretrain", "finetune": "segmentation"}
INTENSITY_SCHEMES = ("percentile", "ct-window", "ct-percentile", "dataset-percentile", "zscore", "none")  # the data
# layer's (labeldiff.data.nnunet), kept here so --help imports no numpy; a test keeps the two the same


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``labeldiff CMD: error: …`` (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def number(typ, lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """An argparse type: a finite ``typ`` within [lo, hi] (open ends where ``lo_open`` / ``hi_open``)."""
    import math

    def parse(text: str):
        try:
            v = typ(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if typ is int else 'a number'}") from None
        bad = (not math.isfinite(v) or (lo is not None and (v < lo or (v == lo and lo_open))) or
               (hi is not None and (v > hi or (v == hi and hi_open))))
        if bad:
            left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
            raise argparse.ArgumentTypeError(f"must be a finite number in {left}{'-∞' if lo is None else f'{lo:g}'}, "
                                             f"{'∞' if hi is None else f'{hi:g}'}{right} (got {text})")
        return v
    parse.__name__ = typ.__name__
    return parse


POSITIVE = number(int, 1)
NON_NEGATIVE = number(int, 0)
FRACTION = number(float, 0, 1, lo_open=True, hi_open=True)


def _text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(_text(v) for v in value)
    if isinstance(value, bool):
        return str(int(value))
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _setting_type(name: str):
    """The argparse type of a declared setting: :func:`labeldiff.config.parse_value`, its errors one line."""
    from labeldiff.config import parse_value
    from labeldiff.errors import ConfigError

    def parse(text: str):
        try:
            return parse_value(name, text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None
    parse.__name__ = name
    return parse


def add_settings(p: argparse.ArgumentParser, command: str) -> None:
    """The options of ``command`` generated from the declared settings, grouped by section."""
    from labeldiff.config import annotation, declared, default_value

    kind = KIND[command]
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, _, meta in declared():
        if meta.flag is None or command not in meta.commands or meta.flag == "--data":
            continue
        section = name.split(".")[0]
        group = groups.get(section) or groups.setdefault(section, p.add_argument_group(GROUPS[section]))
        default = default_value(name, kind)
        if meta.store_true:
            group.add_argument(meta.flag, dest=name, action="store_true", default=None, help=meta.help)
            continue
        choices = meta.choices
        metavar = meta.metavar or ("{" + ",".join(_text(c) for c in choices) + "}" if choices else
                                   _metavar(annotation(name)))
        shown = f" [{_text(default)}]" if default not in (None, "") else ""
        group.add_argument(meta.flag, dest=name, type=_setting_type(name), default=None, metavar=metavar,
                           help=f"{meta.help}{shown}")


def _metavar(hint: Any) -> str:
    import typing

    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return {bool: "{0,1}", int: "N", float: "X"}.get(kinds[0], "TEXT")


def add_run_options(p: argparse.ArgumentParser, command: str) -> None:
    """What every training command takes besides its settings."""
    io = p.add_argument_group("run")
    io.add_argument("--data", required=True, type=Path, help=VOCABULARY["--data"])
    io.add_argument("--out", required=True, type=Path, help="run folder to create")
    io.add_argument("--recipe", help="settings from a recipe: a shipped name (e.g. ddpm-cpu) or a YAML file; "
                                     "flags override it")
    io.add_argument("--protocol", help="a paper's transfer protocol by name (ct, mdm, ddep, hybrid, hybrid-ledm, "
                                       "shared) or a YAML file: " + ("the pretraining it asks for (mdm: the test "
                                       "images too; ct: dataset-wide intensity percentiles)" if command == "pretrain"
                                       else "strategy, head, optimiser, schedule, loss, augmentation and probe "
                                       "features as the paper states them") + "; above --recipe, below the flags")
    io.add_argument("--set", dest="set_values", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="any setting, including those without a flag (e.g. train.weight_decay=1e-4); repeatable")
    io.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                                                          "(with the same settings; a larger --steps extends it)")
    io.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    add_settings(p, command)
    g = p.add_argument_group("volumes")
    g.add_argument("--intensity", default=None, choices=INTENSITY_SCHEMES,
                   help="volume datasets: percentile (each volume's 0.5/99.5 percentiles to [-1, 1]), ct-window (a "
                        "fixed HU window, --hu-window), ct-percentile (nnU-Net's CT scheme, fitted on the training "
                        "cases), dataset-percentile (the CT paper's: the training cases' pooled 0.5/99.5 percentiles "
                        "to [-1, 1]), zscore (per volume, MRI) or none [" +
                        ("percentile" if command == "pretrain" else "the pretrained run's, else percentile") + "]")
    g.add_argument("--hu-window", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="--intensity ct-window: the HU window, e.g. -160 240 (abdomen)")


def add_inference_options(p: argparse.ArgumentParser, volumes: bool = True) -> None:
    if volumes:
        p.add_argument("--axis", type=int, default=None, choices=(0, 1, 2),
                       help="volumes: the axis slices are cut along [the run's: 2 = axial]")
        p.add_argument("--intensity", default=None, choices=INTENSITY_SCHEMES,
                       help="volumes: the intensity scheme [the run's own]")
        p.add_argument("--hu-window", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                       help="--intensity ct-window: the HU window, e.g. -160 240")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average with the horizontal flip")
    p.add_argument("--device", default="auto", help=f"{VOCABULARY['--device']} [auto]")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                   help="fp32 (the same numbers on every CPU), bf16 autocast, or auto (bf16 where the CPU/GPU has "
                        "it) [fp32]")


def _names(text: str) -> tuple[str, str]:
    names = tuple(n.strip() for n in text.split(","))
    if len(names) != 2 or not all(names):
        raise argparse.ArgumentTypeError(f"{text!r}: give two names, e.g. videos,random")
    return names


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give I/N, e.g. 0/2") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: I must lie in 0..N-1")
    return i, n


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(","))


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",")]
