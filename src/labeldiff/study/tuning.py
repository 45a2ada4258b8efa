"""A study's ``tune:`` block as pure functions: its settings (:class:`TuneSpec`, :func:`parse_tune`), the
validation images held out of the train split (:func:`validation_images`), each arm's choice from its
validation scores (:func:`choose`) and the tables that show them (:func:`tuning_markdown`).

An *arm* is what the study compares: a pretrained run × strategy, or scratch per network, per protocol,
selection and k, keyed ``(method, strategy, protocol, select, k)``. Every arm is fine-tuned with every point
of the grid and every tuning seed on k images of the train split outside the validation images, and scored
on those; it takes the point with the highest mean score over the tuning seeds, the first in grid order on a
tie. A shared fine-tuning learning rate suits at most one of two arms; tuning each on its own answers the
objection that the baseline lost to a rate chosen for the pretrained network. The cells that do it are
planned and run by :mod:`labeldiff.study.tuning_cells`.
"""
from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labeldiff.config import check, not_result_fields
from labeldiff.data.io import DataError
from labeldiff.errors import ConfigError
from labeldiff.resolve import Layer, compose
from labeldiff.study.errors import StudyError, check_setting_name
from labeldiff.study.stats import axis, mean_std, to_float

TUNE_KEYS = ("grid", "seeds", "validation", "validation_seed", "metric")
TUNE_METRICS = ("dice", "iou", "aji")  # what a tuning cell's validation images are scored by
TUNED_SECTIONS = ("train", "transfer")  # fine-tuning settings; data and model are the arm's own
CELL_OWNED = ("train.seed", "transfer.strategy", "transfer.labels", "transfer.labeled", "transfer.pretrained",
              "transfer.label_unit")  # what the study sets per cell (seeds, strategies, labels)
ARM = ("method", "strategy", "protocol", "select", "k")  # the row columns that name an arm


@dataclass
class TuneSpec:
    """``tune:`` of a study file (see :mod:`labeldiff.study.spec`)."""

    grid: dict[str, list]  # setting → its values, in the order given
    seeds: list[int]
    validation: float | str = 0.25  # a fraction of the train split, or the name of a split
    validation_seed: int = 0
    metric: str = "dice"
    points: list[dict[str, Any]] = field(init=False)  # every combination of the grid's values, in grid order

    def __post_init__(self):
        names = list(self.grid)
        self.points = [dict(zip(names, values)) for values in itertools.product(*self.grid.values())]

    @property
    def labels(self) -> list[str]:
        return [point_label(p) for p in self.points]


def point_label(point: dict[str, Any]) -> str:
    """``"train.lr=0.001"``; several settings joined by ``", "`` (the ``tuned`` column of results.csv)."""
    return ", ".join(f"{name}={value}" for name, value in point.items())


def _fail(file: Path, where: str, msg: str) -> StudyError:
    return StudyError(f"{file}: tune{where}: {msg}")


def parse_tune(raw: Any, file: Path, seeds: list[int]) -> TuneSpec | None:
    """Validate ``tune:`` of the study ``file`` whose confirmation seeds are ``seeds``; None when absent."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _fail(file, "", "expected a mapping {grid: {train.lr: [0.0001, 0.001]}, seeds: [900, 901], "
                              "validation: 0.25, metric: dice}")
    unknown = [k for k in raw if k not in TUNE_KEYS]
    if unknown:
        raise _fail(file, "", f"unknown key {unknown[0]!r}; known keys: {', '.join(TUNE_KEYS)}")
    grid = _grid(raw.get("grid"), file)
    tuning_seeds = raw.get("seeds")
    if not isinstance(tuning_seeds, list) or not tuning_seeds or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in tuning_seeds):
        raise _fail(file, ".seeds", f"{tuning_seeds!r}: list the tuning seeds, integers ≥ 0 none of which is in "
                                    f"seeds, e.g. [900, 901, 902]")
    tuning_seeds = list(dict.fromkeys(tuning_seeds))
    both = [s for s in tuning_seeds if s in seeds]
    if both:
        raise _fail(file, ".seeds", f"{', '.join(map(str, both))} {'is' if len(both) == 1 else 'are'} also in seeds "
                                    f"{seeds}: the confirmation must run on seeds the tuning never saw; choose other "
                                    f"tuning seeds")
    validation = raw.get("validation", 0.25)
    if isinstance(validation, bool) or not (isinstance(validation, str) and validation
                                            or isinstance(validation, (int, float)) and 0 < validation < 1):
        raise _fail(file, ".validation", f"{validation!r}: give a fraction of the train split between 0 and 1 "
                                         f"(exclusive), e.g. 0.25, or the name of a split of the split file (val)")
    seed = raw.get("validation_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _fail(file, ".validation_seed", f"expected an integer, got {seed!r}")
    metric = raw.get("metric", "dice")
    if metric not in TUNE_METRICS:
        raise _fail(file, ".metric", f"{metric!r} is not one of {', '.join(TUNE_METRICS)}")
    return TuneSpec(grid, tuning_seeds, validation if isinstance(validation, str) else float(validation), seed, metric)


def _grid(raw: Any, file: Path) -> dict[str, list]:
    if not isinstance(raw, dict) or not raw:
        raise _fail(file, ".grid", "expected a mapping of fine-tuning settings to their values, e.g. "
                                   "{train.lr: [0.0001, 0.0003, 0.001]}")
    grid = {}
    for name, values in raw.items():
        name = str(name)
        check_setting_name(name, file, "tune.grid")
        if name.partition(".")[0] not in TUNED_SECTIONS:
            sections = ", ".join(s + ".*" for s in TUNED_SECTIONS)
            raise _fail(file, f".grid: {name}", f"tune fine-tuning settings ({sections}); the data and the network "
                                                f"are the study's")
        if name in CELL_OWNED:
            raise _fail(file, f".grid: {name}", "the study sets it per cell (seeds, strategies, labels); tune another "
                                                "setting")
        if name in not_result_fields():
            raise _fail(file, f".grid: {name}", "does not change what a run computes; tune another setting")
        if not isinstance(values, list) or not values:
            raise _fail(file, f".grid: {name}", f"{values!r}: list the values to try, e.g. [0.0001, 0.001]")
        dup = next((v for v in values if values.count(v) > 1), None)
        if dup is not None:
            raise _fail(file, f".grid: {name}", f"{dup!r} is listed twice")
        for value in values:
            try:
                check(compose("segmentation", [Layer("tune.grid", {name: value})])[0])
            except (ConfigError, ValueError, TypeError) as e:
                hint = (" (YAML reads 1e-3 as text: write 0.001 or 1.0e-3)" if isinstance(value, str)
                        and value.replace(".", "").replace("e", "").replace("-", "").isdigit() else "")
                raise _fail(file, f".grid: {name}", f"{value!r}: {e}{hint}") from None
        grid[name] = list(values)
    return grid


def validation_images(train: list[str], fraction: float, seed: int,
                      groups: dict[str, object] | None = None) -> list[str]:
    """The validation images: whole groups of ``train`` (``groups``: stem → group, e.g. the video of each frame;
    None: each image its own) drawn with ``seed`` until they hold at least ``fraction`` of its images, at least
    one group left to train (:func:`labeldiff.data.splits.group_split`)."""
    from labeldiff.data.splits import group_split

    by = groups if groups is not None else {s: s for s in train}
    try:
        return group_split(list(train), by, fraction, seed)["test"]
    except DataError as e:
        raise DataError(f"tune.validation: {e}") from None


@dataclass
class Choice:
    """One arm's tuning: each grid point's ``(mean, sd, n)`` over the tuning seeds, and the point chosen
    (an index into the grid's points; None while a point lacks a seed's score)."""

    stats: list[tuple[float, float, int]]
    chosen: int | None
    missing: int = 0  # tuning cells not finished yet


def arm_of(row: dict) -> tuple:
    """``(method, strategy, protocol, select, k)`` of a result row (k as an int)."""
    return row["method"], row["strategy"], axis(row, "protocol"), axis(row, "select"), int(row["k"])


def choose(rows: list[dict], labels: list[str], seeds: list[int], metric: str = "dice") -> dict[tuple, Choice]:
    """Per arm of the tuning ``rows`` (one per finished tuning cell, with ``tuned``: its grid point's label of
    ``labels``, ``seed`` and ``metric``): each point's mean ± sd over the tuning ``seeds`` and the point with
    the highest mean, the first in grid order on a tie. A point whose scores are all NaN cannot win (one
    whose every point is NaN takes the first). An arm is chosen only once every point has every seed."""
    scores: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r.get("tuned") in labels and int(r["seed"]) in seeds:
            scores[arm_of(r)][r["tuned"]][int(r["seed"])] = to_float(r.get(metric))
    out = {}
    for arm, by_point in scores.items():
        stats = [mean_std([by_point[label][s] for s in seeds if s in by_point[label]]) for label in labels]
        missing = sum(s not in by_point[label] for label in labels for s in seeds)
        best = None
        if not missing:
            means = [m if not math.isnan(m) else -math.inf for m, _, _ in stats]
            best = next(i for i, m in enumerate(means) if m == max(means))
        out[arm] = Choice(stats, best, missing)
    return out


def _stat(stat: tuple[float, float, int], digits: int) -> str:
    m, sd, n = stat
    if n == 0:
        return "–"
    return f"{m:.{digits}f} ± {sd:.{digits}f} ({n})" if n > 1 else f"{m:.{digits}f} (1)"


def tuning_tables(choices: dict[tuple, Choice], labels: list[str], ks: dict[int, int], metric: str,
                  digits: int = 3, level: str = "##") -> list[str]:
    """Markdown: per k of the study (``ks``: k → the k its tuning cells trained with), one row per arm, one
    column per grid point (mean ± sd (n) of the validation ``metric`` over the tuning seeds, the chosen one
    bold) and the chosen point."""
    varying = [i for i, name in ((2, "protocol"), (3, "select")) if len({a[i] for a in choices}) > 1]
    head = ["arm", *labels, "chosen"]
    lines = []
    for k, tk in ks.items():
        arms = [a for a in choices if a[4] == tk]
        if not arms:
            continue
        trained = f" (tuned with {tk} labeled images: all of the train split outside validation)" if tk != k else ""
        lines += [f"{level} k = {k}{trained}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arm in arms:
            c = choices[arm]
            name = " / ".join([arm[0], arm[1], *(arm[i] for i in varying)])
            shown = [f"**{_stat(s, digits)}**" if i == c.chosen else _stat(s, digits) for i, s in enumerate(c.stats)]
            chosen = labels[c.chosen] if c.chosen is not None else f"– ({c.missing} tuning cells to run)"
            lines.append("| " + " | ".join([name, *shown, chosen]) + " |")
        lines.append("")
    return lines


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _seeds(seeds: list[int]) -> str:
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def tuning_paragraph(spec: TuneSpec, validation: list[str], how: str, seeds: list[int], cells: int) -> str:
    """What tuning did (``cells``: how many tuning cells it ran), said once for tuning.md and verdict.md."""
    grid = "; ".join(f"{name}: {', '.join(map(str, values))}" for name, values in spec.grid.items())
    n = len(validation)
    return (f"Each arm — each pretrained run × strategy, and scratch per network, per protocol, selection and k — "
            f"was tuned on its own: fine-tuned with every value of the grid ({grid}) and every tuning seed "
            f"({', '.join(map(str, spec.seeds))}) on k images drawn from the train split outside the "
            f"{_count(n, 'validation image')} ({how}), and scored by {spec.metric} on those, never on the test split. "
            f"Each arm's confirmation cells ({_seeds(seeds)}, none of them a tuning seed) then fine-tuned with the "
            f"value of its highest mean validation score (the first in grid order on a tie), so a pretrained arm and "
            f"its scratch pair may use different values. The cost: {_count(len(spec.points), 'grid point')} × "
            f"{_count(len(spec.seeds), 'tuning seed')} more cells per arm, {cells} tuning cells in all.")


def tuning_markdown(spec: TuneSpec, choices: dict[tuple, Choice], ks: dict[int, int], validation: list[str], how: str,
                    seeds: list[int], title: str, cells: int) -> str:
    """``tuning.md``: what tuning did, each arm's validation scores and choice, the validation images."""
    shown = ", ".join(validation[:20]) + (f", … ({len(validation)})" if len(validation) > 20 else "")
    lines = [f"# Tuning: {title}\n", tuning_paragraph(spec, validation, how, seeds, cells) + "\n",
             f"Entries: mean ± sample std of {spec.metric} on the validation images over the tuning seeds "
             f"(number of seeds); bold: the chosen value.\n",
             *tuning_tables(choices, spec.labels, ks, spec.metric),
             f"Validation images: {shown}.\n"]
    return "\n".join(lines)
