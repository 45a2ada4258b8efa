"""The cells of a study's ``tune:`` block (the choice itself is :mod:`labeldiff.study.tuning`): the validation
images held out of the train split, written as a split file ``OUT/tune/split-<hash>.json`` whose train split
is the train split outside them and whose ``validation`` split is them (it has no test split); a tuning cell
per arm × grid point × tuning seed in ``OUT/tune/`` (:func:`plan_tuning`), planned and run like the study's
other cells, so finished ones are reused; each arm's choice once its tuning cells are finished, and the
confirmation cells planned with it (:func:`confirmation_cells`)."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from labeldiff.config import RunConfig
from labeldiff.data.folders import LabeledFolder, VolumeFolder, open_labeled
from labeldiff.data.io import DataError
from labeldiff.study import report
from labeldiff.study.configs import digest
from labeldiff.study.execute import cell_row
from labeldiff.study.plan import VALIDATION, Arm, Cell, Pretraining, Selector, Target, plan_cells, planned_stems
from labeldiff.study.select import class_sets
from labeldiff.study.spec import Study, StudyError
from labeldiff.study.tuning import Choice, choose, point_label, tuning_markdown, tuning_paragraph, tuning_tables
from labeldiff.study.tuning import validation_images

FOLDER = "tune"


@dataclass
class Tuning:
    """What a study's ``tune:`` runs: its cells, on ``target`` (train: the train split outside the validation
    images; test: the validation images, the split :data:`~labeldiff.study.plan.VALIDATION`), and ``ks``: each
    k of the study → the k its tuning cells train with (the same, but all of the train split is all of what
    is left of it)."""

    study: Study
    target: Target
    how: str  # how the validation images were chosen
    ks: dict[int, int]
    cells: list[Cell]

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.cells)

    def rows(self) -> list[dict]:
        return [cell_row(c) for c in self.cells if c.finished]

    def choices(self) -> dict[Arm, Choice]:
        t = self.study.tune
        return choose(self.rows(), t.labels, t.seeds, t.metric)

    def chosen(self, choices: dict[Arm, Choice], arm: Arm) -> dict | None:
        """The grid point the arm ``(method, strategy, protocol, select, k)`` chose; None while its tuning runs."""
        found = choices.get((*arm[:4], self.ks[arm[4]]))
        return None if found is None or found.chosen is None else self.study.tune.points[found.chosen]


def _groups(study: Study, target: Target) -> tuple[dict | None, str]:
    """The groups no validation draw may split (stem → group), and how they were found."""
    ds = target.ds
    if study.data.split is not None and study.data.split.groups is not None:
        path = Path(study.data.split.groups)
    elif isinstance(ds, LabeledFolder) and (ds.root / "sequences.json").is_file():
        path = ds.root / "sequences.json"
    elif isinstance(ds, VolumeFolder):
        return {s: ds.case_of(s) for s in target.train}, "whole cases"
    else:
        return None, "drawn at random"
    return json.loads(path.read_text()), f"whole groups of {path.name}"


def top_slab(train: list[str], cases: dict[str, str], fraction: float) -> list[str]:
    """Per case, the last ``fraction`` of its train slices in ``train``'s (slice) order, at least one and never
    all: a contiguous slab, as the study's test slab is one."""
    import math

    out = []
    for case in dict.fromkeys(cases[s] for s in train):
        mine = [s for s in train if cases[s] == case]
        n = min(len(mine) - 1, max(1, math.ceil(fraction * len(mine))))
        out += mine[len(mine) - n:] if n > 0 else []
    return out


def hold_out(study: Study, target: Target) -> tuple[list[str], str]:
    """The validation images (``tune.validation``: a fraction of the train split, or a split's name) and how
    they were chosen."""
    spec = study.tune
    if isinstance(spec.validation, str):
        name, ds = spec.validation, target.ds
        if name not in ds.splits:
            raise StudyError(f"{study.file}: tune.validation: {ds.split_file} has no split {name!r} (it has "
                             f"{', '.join(sorted(ds.splits))}); name one of them, or give a fraction, e.g. 0.25")
        val = ds.stems(name)
        clash = sorted(set(val) & set(target.test))
        if clash:
            raise StudyError(f"{study.file}: tune.validation: split {name!r} shares {len(clash)} images with the test "
                             f"split ({', '.join(clash[:3])}); tuning must never score a test image: name a split "
                             f"disjoint from it")
        return val, f"the split {name!r} of {Path(ds.split_file).name}"
    groups, how = _groups(study, target)
    if isinstance(target.ds, VolumeFolder) and len(set(groups.values())) < 2:  # one case: a slab of its slices
        val = top_slab(target.train, groups, spec.validation)
        return val, (f"{len(val)} of the {len(target.train)} train slices: the top {spec.validation:g} of the one "
                     f"case's training slab (a volume with one case cannot give whole cases)")
    val = validation_images(target.train, spec.validation, spec.validation_seed, groups)
    return val, f"{len(val)} of the {len(target.train)} train images, {how}, seed {spec.validation_seed}"


def validation_target(study: Study, target: Target, ft: RunConfig, out: Path) -> tuple[Target, str]:
    """The target of the tuning cells, with its split file written (named by its content, never rewritten)."""
    val, how = hold_out(study, target)
    rest = [s for s in target.train if s not in set(val)]
    if not rest:
        raise StudyError(f"{study.file}: tune.validation: the validation images are the whole train split; hold out "
                         f"fewer, so the tuning cells have images to label")
    split = {ft.data.train_split: rest, VALIDATION: val,  # no test split: a tuning run is never scored on it
             "note": f"tune: the train split outside the validation images ({how}), and the validation images"}
    path = out / FOLDER / f"split-{digest(split, 8)}.json"
    if not path.is_file():
        from labeldiff.data.splits import save_split

        path.parent.mkdir(parents=True, exist_ok=True)
        save_split(path, split)
    ds = open_labeled(ft.data, study.data.path, path)
    classes = class_sets(ds, rest, target.num_classes) if study.require_all_classes else None
    scores = ("aji",) if study.tune.metric == "aji" else ()
    return Target(ds, rest, val, target.num_classes, classes, None, scores, validation=True), how


def _quiet(fn, *args, **kw):
    """``fn`` without its notes (the study's own plan printed them once)."""
    with redirect_stdout(io.StringIO()):
        return fn(*args, **kw)


def plan_tuning(study: Study, runs: list[Pretraining], target: Target, fts: dict[str, RunConfig], out: Path,
                cells: list[Cell]) -> Tuning:
    """The tuning cells of the study's confirmation ``cells``: every arm but ``source`` (which trains nothing)
    × grid point × tuning seed, on the validation target."""
    vt, how = validation_target(study, target, next(iter(fts.values())), out)
    ks = {}
    for k in dict.fromkeys(c.k for c in cells):
        if k >= len(target.train):  # all of the train split: all of what tuning may label
            ks[k] = len(vt.train)
        elif k > len(vt.train):
            raise DataError(f"labels: k={k}, but the tuning cells draw their images from the {len(vt.train)} train "
                            f"images outside the {len(vt.test)} validation images; hold out fewer (tune.validation) "
                            f"or lower k")
        else:
            ks[k] = k
    points = study.tune.points
    tuning = _quiet(plan_cells, study, runs, vt, fts, out, points=lambda arm: [] if arm[1] == "source" else points,
                    seeds=study.tune.seeds, ks=list(dict.fromkeys(ks.values())), folder=FOLDER, prefix="tune-")
    return Tuning(study, vt, how, ks, tuning)


def confirmation_cells(study: Study, runs: list[Pretraining], target: Target, fts: dict[str, RunConfig], out: Path,
                       tuning: Tuning) -> tuple[list[Cell], list[Arm]]:
    """The confirmation cells of the arms whose tuning is finished, each with its arm's chosen point (``source``
    cells as they are), and the arms still waiting for their tuning."""
    choices, waiting = tuning.choices(), []

    def chosen(arm: Arm) -> list[dict]:
        if arm[1] == "source":
            return [{}]
        point = tuning.chosen(choices, arm)
        if point is None:
            waiting.append(arm)
        return [] if point is None else [point]

    cells = _quiet(plan_cells, study, runs, target, fts, out, points=chosen)
    return cells, waiting


def arm(cell: Cell) -> Arm:
    return cell.method, cell.strategy, cell.protocol, cell.select, cell.k


def dry_run_lines(tuning: Tuning, selector: Selector) -> list[str]:
    """What ``--dry-run`` says of the tuning: its cells, each with its grid point and labeled images, and that
    the confirmation cells' fine-tuning settings are chosen after it."""
    t = tuning.study.tune
    arms = {arm(c) for c in tuning.cells}
    lines = [f"tune: {len(tuning.cells)} tuning cells ({sum(c.finished for c in tuning.cells)} finished) = {len(arms)} "
             f"arms × {len(t.points)} grid points × {len(t.seeds)} tuning seeds, scored by {t.metric} on "
             f"{len(tuning.target.test)} validation images ({tuning.how}); the confirmation cells' fine-tuning "
             f"settings are chosen after tuning, each arm its own"]
    for c in tuning.cells:
        lines.append(f"  {'done' if c.finished else 'todo'}  {FOLDER}/{c.id}  {point_label(c.tuned)}  "
                     f"{planned_stems(c, selector)}")
    return lines


def waiting_line(cell: Cell, selector: Selector) -> str:
    """A confirmation cell whose arm is still tuning: its id but for the hash of the settings to be chosen."""
    return f"  todo  {cell.id.rsplit('-', 1)[0]}-…  {planned_stems(cell, selector)} (settings chosen after tuning)"


def write_tuning(tuning: Tuning, out: Path, title: str, seeds: list[int]) -> list[str]:
    """``tuning.csv`` (a row per finished tuning cell, its validation scores) and ``tuning.md``; returns the
    verdict's section on tuning."""
    t, rows = tuning.study.tune, tuning.rows()
    choices = choose(rows, t.labels, t.seeds, t.metric)
    report.write_csv(rows, out / "tuning.csv")
    n = len(tuning.cells)
    (out / "tuning.md").write_text(tuning_markdown(t, choices, tuning.ks, tuning.target.test, tuning.how, seeds, title,
                                                   n))
    return ["## Each arm tuned on its own\n", tuning_paragraph(t, tuning.target.test, tuning.how, seeds, n) + "\n",
            f"Mean ± sd of {t.metric} on the validation images over the tuning seeds (number of seeds); bold: the "
            f"chosen value (also in results.csv, column tuned; every tuning cell in tuning.csv).\n",
            *tuning_tables(choices, t.labels, tuning.ks, t.metric, level="###")]
