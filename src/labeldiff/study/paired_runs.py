"""``labeldiff compare RUN_A RUN_B``: two single runs scored on the same test images, image by image.

Each run's evaluation (``RUN/eval_<split>/`` written by ``labeldiff evaluate``: ``metrics.json`` and
``per_image.csv``) gives one score per test image. The two are paired by image stem; the per-image
differences A − B get their mean and 95 % t-interval (:func:`labeldiff.study.stats.paired_ci`, the
study's), the count of images each run is ahead on, a markdown table and a plot. Images are the unit:
the interval says how sure the difference is over test images like these, for these two trained
networks; how much another training seed would move either is a study's question (several seeds).

Images of one patient or one video are not independent: frames of a colonoscopy video look alike, so
their differences move together and an interval over images is too narrow. With groups (``--groups
FILE``, JSON image stem → group; by default the scored dataset's ``sequences.json`` when it has one, as
``labeldiff split`` reads it) each group's mean difference is one observation, and the interval over the
groups is the one to read.

The pairing is refused, with the reason, when the two evaluations scored different datasets, different
test images, or the runs predict different numbers of classes.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labeldiff.errors import DataError
from labeldiff.study.stats import paired_ci

FORMS = ("a run folder (config.json, from `labeldiff finetune`; its eval_<split>/ is used, evaluated first if "
         "absent), an evaluation folder (metrics.json and per_image.csv, from `labeldiff evaluate`), or a study "
         "folder (results.csv, from `labeldiff study`) or its results.csv")


def form_of(path: Path) -> str:
    """What ``path`` is for ``labeldiff compare``: ``"study"``, ``"run"`` or ``"evaluation"``; a
    DataError says what each form expects otherwise."""
    path = Path(path)
    if path.suffix == ".csv" or any((path / f).exists() for f in ("results.csv", "cells", "study.yaml")):
        return "study"
    if (path / "config.json").is_file():
        return "run"
    if (path / "metrics.json").is_file() and (path / "per_image.csv").is_file():
        return "evaluation"
    what = "does not exist" if not path.exists() else "is none of these"
    raise DataError(f"{path} {what}; compare takes two of one form: {FORMS}")


@dataclass
class Evaluation:
    """One evaluation of a run: where it is, what it scored, and its per-image rows."""

    folder: Path
    name: str
    metrics: dict
    rows: list[dict]

    @property
    def scored(self) -> dict:
        """The dataset, split, split file and stems scored (``test_images`` of metrics.json; rebuilt from
        ``data``, ``split`` and per_image.csv for evaluations written before it)."""
        from labeldiff.data.provenance import dataset_key

        rec = self.metrics.get("test_images")
        if rec:
            return rec
        return {"data": dataset_key(self.metrics.get("data", "?")), "split": self.metrics.get("split"),
                "split_file": None, "split_sha256": None, "stems": sorted(r["stem"] for r in self.rows)}

    @property
    def num_classes(self) -> int:
        return int(self.metrics.get("num_classes") or len(self.metrics["dice"]["per_class"]))

    def values(self, metric: str) -> dict[str, float]:
        """stem → the image's ``metric``: ``dice`` / ``iou`` (mean over the foreground classes defined on the
        image, NaN when none is: empty in truth and prediction) or a ``dice_<c>`` / ``iou_<c>`` column."""
        cols = list(self.rows[0]) if self.rows else []
        if metric in ("dice", "iou"):
            fg = [c for c in cols if c.startswith(f"{metric}_") and c[len(metric) + 1:].isdigit()
                  and int(c[len(metric) + 1:]) > 0] or [f"{metric}_0"]
            out = {}
            for r in self.rows:
                v = np.array([_number(r.get(c)) for c in fg])
                out[r["stem"]] = float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any() else math.nan
            return out
        if metric not in cols:
            have = ", ".join(["dice", "iou"] + [c for c in cols if c != "stem"])
            raise DataError(f"--metric {metric}: {self.folder / 'per_image.csv'} has no such column; choose one of "
                            f"{have}")
        return {r["stem"]: _number(r[metric]) for r in self.rows}


def _number(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def open_evaluation(path: Path, split: str | None = None, evaluate=None) -> Evaluation:
    """The evaluation ``path`` holds: an evaluation folder itself, or a run folder's ``eval_<split>/``
    (``split``: the run's test split when None). A run without one is evaluated first with
    ``evaluate(run, out, split)`` (None: refused, saying which command writes it)."""
    path = Path(path)
    if form_of(path) == "run":
        from labeldiff.runs import RunFolder

        run = RunFolder.open(path, flag="compare")
        split = split or run.config.data.test_split
        folder = path / f"eval_{split}"
        if not (folder / "metrics.json").is_file():
            if evaluate is None:
                raise DataError(f"{path}: no {folder.name}/metrics.json; run `labeldiff evaluate --model {path} "
                                f"--split {split}` first")
            print(f"{path} has no {folder.name}/ yet: evaluating it on split {split!r} "
                  f"(`labeldiff evaluate --model {path} --split {split}`)")
            evaluate(path, folder, split)
        name = path.resolve().name
    else:
        folder = path
        name = path.resolve().parent.name if path.resolve().name.startswith("eval") else path.resolve().name
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
        with open(folder / "per_image.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError) as e:
        raise DataError(f"{folder}: cannot read metrics.json and per_image.csv ({e}); evaluate the run again "
                        f"(`labeldiff evaluate --model RUN --out {folder} --overwrite`)") from None
    if not rows or "stem" not in rows[0] or "dice" not in metrics:
        raise DataError(f"{folder}: metrics.json or per_image.csv is not one `labeldiff evaluate` wrote (no per-image "
                        f"rows or Dice); evaluate the run again")
    return Evaluation(folder, name, metrics, rows)


def check_pairable(a: Evaluation, b: Evaluation) -> str:
    """Refuse (DataError, with the reason and the fix) two evaluations that cannot be paired image by image:
    another dataset, other test images, another number of classes. Returns a note for the report ("" when
    there is none), e.g. when two split files hold the same test images."""
    sa, sb = a.scored, b.scored
    if sa["data"] != sb["data"]:
        raise DataError(f"{a.folder} scored the dataset {sa['data']} but {b.folder} scored {sb['data']}; paired "
                        f"differences need the same test images: evaluate both on one dataset, e.g. "
                        f"`labeldiff evaluate --model RUN_B --data {sa['data']} --split {sa['split']}`")
    only_a = sorted(set(sa["stems"]) - set(sb["stems"]))
    only_b = sorted(set(sb["stems"]) - set(sa["stems"]))
    if only_a or only_b:
        def where(e: Evaluation, s: dict) -> str:
            return f"split {s['split']!r}" + (f" of {s['split_file']}" if s.get("split_file") else "")

        def some(stems: list[str]) -> str:
            return ", ".join(stems[:3]) + (" …" if len(stems) > 3 else "") if stems else "none"

        raise DataError(f"{a.folder} and {b.folder} scored different test images ({where(a, sa)}: "
                        f"{len(sa['stems'])}, {where(b, sb)}: {len(sb['stems'])}; only in A: {some(only_a)}; only in "
                        f"B: {some(only_b)}); evaluate both on one split, e.g. `labeldiff evaluate --model RUN_B "
                        f"--split {sa['split']}" + (f" --split-file {sa['split_file']}`" if sa.get("split_file") else "`"))
    if a.num_classes != b.num_classes:
        raise DataError(f"{a.folder} scored {a.num_classes} classes and {b.folder} {b.num_classes}; their Dice are "
                        f"not the same quantity: compare runs trained with the same classes")
    if sa.get("split_sha256") and sb.get("split_sha256") and sa["split_sha256"] != sb["split_sha256"]:
        return (f"The two evaluations read different split files ({sa['split_file']}, {sb['split_file']}) that "
                f"name the same {len(sa['stems'])} test images; they are paired by image.")
    return ""


def test_groups(a: Evaluation, groups: Path | None) -> tuple[dict[str, str] | None, str | None]:
    """``(stem → group, where they came from)`` for the images ``a`` scored: the JSON file ``groups``, else
    the scored dataset's ``sequences.json`` when there is one, else ``(None, None)``. A scored image the
    file does not name is refused by name."""
    path = Path(groups) if groups is not None else Path(a.scored["data"]) / "sequences.json"
    if groups is None and not path.is_file():
        return None, None
    try:
        by = {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(f"--groups {path}: cannot read it as JSON image stem → group ({e}); give a file like "
                        f"{{\"frame1\": \"video1\", …}}") from None
    missing = [s for s in a.scored["stems"] if s not in by]
    if missing:
        raise DataError(f"--groups {path} names no group for {len(missing)} scored image(s) "
                        f"({', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}); give every test image a group")
    return by, str(path)


def paired_runs(a: Evaluation, b: Evaluation, metric: str = "dice", level: float = 0.95,
                groups: dict[str, str] | None = None) -> dict:
    """A − B per test image (in A's order), with ``mean``, ``low``, ``high``, ``n``, ``sd``
    (:func:`~labeldiff.study.stats.paired_ci`), ``ahead_a`` / ``ahead_b`` / ``tied`` counts, ``a`` and ``b``
    (each run's mean over the paired images), ``stems`` and ``diffs`` of the pairs and ``unscored`` (images
    without a finite score in either run, left out). With ``groups`` (stem → group), ``by_group`` holds the
    same over the groups' mean differences (``mean``, ``low``, ``high``, ``n``, ``sd``, ``ahead_a``,
    ``ahead_b``, ``tied``, ``names``, ``diffs``); else it is None."""
    note = check_pairable(a, b)
    va, vb = a.values(metric), b.values(metric)
    stems, diffs, xa, xb, unscored = [], [], [], [], []
    for r in a.rows:
        s = r["stem"]
        if math.isfinite(va[s]) and math.isfinite(vb[s]):
            stems.append(s)
            diffs.append(va[s] - vb[s])
            xa.append(va[s])
            xb.append(vb[s])
        else:
            unscored.append(s)
    mean, low, high, n, sd = paired_ci(diffs, level)
    d = np.array(diffs)
    return {"metric": metric, "mean": mean, "low": low, "high": high, "n": n, "sd": sd,
            "ahead_a": int((d > 0).sum()), "ahead_b": int((d < 0).sum()), "tied": int((d == 0).sum()),
            "a": float(np.mean(xa)) if xa else math.nan, "b": float(np.mean(xb)) if xb else math.nan,
            "stems": stems, "diffs": diffs, "values_a": xa, "values_b": xb, "unscored": unscored, "note": note,
            "by_group": _by_group(stems, diffs, groups, level) if groups else None}


def _by_group(stems: list[str], diffs: list[float], groups: dict[str, str], level: float) -> dict:
    """Each group's mean difference as one observation, and the t-interval over the groups."""
    members: dict[str, list[float]] = {}
    for s, x in zip(stems, diffs):
        members.setdefault(groups[s], []).append(x)
    names = sorted(members, key=lambda g: (len(g), g))
    means = [float(np.mean(members[g])) for g in names]
    mean, low, high, n, sd = paired_ci(means, level)
    m = np.array(means)
    return {"mean": mean, "low": low, "high": high, "n": n, "sd": sd, "ahead_a": int((m > 0).sum()),
            "ahead_b": int((m < 0).sum()), "tied": int((m == 0).sum()), "names": names, "diffs": means,
            "sizes": [len(members[g]) for g in names]}


def runs_markdown(a: Evaluation, b: Evaluation, p: dict, names: tuple[str, str], digits: int = 3,
                  rows: int | None = None, groups_from: str | None = None) -> str:
    """The report of :func:`paired_runs`: the summary row (and the by-group row, when grouped), how it was
    computed, and every image's scores (``rows``: only the ``rows // 2`` images most behind and most ahead)."""
    from labeldiff.study.report import format_ci, format_delta, format_excludes_zero

    na, nb = names
    metric = p["metric"]
    s = a.scored
    split = f"split {s['split']!r}" + (f" of {s['split_file']}" if s.get("split_file") else "")
    what = ("foreground Dice (mean over the foreground classes present in the image's truth or prediction)"
            if metric == "dice" else "foreground IoU (mean over the foreground classes present in the image's "
            "truth or prediction)" if metric == "iou" else f"the per_image.csv column {metric}")
    lines = [f"# {na} − {nb} ({metric}), paired by test image\n",
             f"{na}: {a.folder}; {nb}: {b.folder}. Both scored {len(s['stems'])} images of {s['data']} ({split}).\n",
             f"Per image: {what}. 95 % confidence interval of the mean paired difference from the t-distribution "
             f"over the images (n − 1 degrees of freedom); n/a with fewer than 2 images. The interval is over test "
             f"images for these two trained runs; another training seed may move either run, which a study with "
             f"several seeds measures.\n",
             f"| {na} | {nb} | mean Δ ({na} − {nb}) | 95 % CI | excludes 0 | {na} ahead | {nb} ahead | tied | "
             f"images |", "|---|---|---|---|---|---|---|---|---|",
             f"| {p['a']:.{digits}f} | {p['b']:.{digits}f} | {format_delta(p, digits)} | {format_ci(p, digits)} | "
             f"{format_excludes_zero(p)} | {p['ahead_a']} | {p['ahead_b']} | {p['tied']} | {p['n']} |"]
    g = p.get("by_group")
    if g:
        lines += [f"\nBy group ({g['n']} groups of {groups_from}: each group's mean Δ is one observation, since "
                  f"images of one video or patient move together; this is the interval to read):\n",
                  f"| groups | mean Δ | 95 % CI | excludes 0 | {na} ahead | {nb} ahead | tied |",
                  "|---|---|---|---|---|---|---|",
                  f"| {g['n']} | {format_delta(g, digits)} | {format_ci(g, digits)} | {format_excludes_zero(g)} | "
                  f"{g['ahead_a']} | {g['ahead_b']} | {g['tied']} |", "",
                  "| group | images | Δ |", "|---|---|---|"]
        lines += [f"| {name} | {size} | {x:+.{digits}f} |" for name, size, x in
                  sorted(zip(g["names"], g["sizes"], g["diffs"]), key=lambda r: r[2])]
    if p["unscored"]:
        lines.append(f"\n{len(p['unscored'])} image(s) left out: no {metric} in one run (empty in both truth and "
                     f"prediction): {', '.join(p['unscored'][:5])}{' …' if len(p['unscored']) > 5 else ''}")
    if p["note"]:
        lines.append(f"\n{p['note']}")
    settings = [k for k in ("tta", "precision") if a.metrics.get(k) != b.metrics.get(k)]
    if settings:
        lines.append("\nThe evaluations differ in " + ", ".join(
            f"{k} ({na}: {a.metrics.get(k)}, {nb}: {b.metrics.get(k)})" for k in settings) + ".")
    order = sorted(range(p["n"]), key=lambda i: p["diffs"][i])
    shown = order if rows is None or len(order) <= rows else order[:rows // 2] + [None] + order[-(rows // 2):]
    title = "Per image, by Δ" if len(shown) == len(order) else \
        f"Per image, by Δ: the {rows // 2} most behind and the {rows // 2} most ahead of {p['n']}"
    lines += [f"\n## {title}\n", f"| image | {na} | {nb} | Δ |", "|---|---|---|---|"]
    for i in shown:
        lines.append(f"| … {p['n'] - 2 * (rows // 2)} more | | | |" if i is None else
                     f"| {p['stems'][i]} | {p['values_a'][i]:.{digits}f} | {p['values_b'][i]:.{digits}f} | "
                     f"{p['diffs'][i]:+.{digits}f} |")
    return "\n".join(lines) + "\n"


def summary_line(p: dict, names: tuple[str, str]) -> str:
    na, nb = names
    ci = f" [{p['low']:+.3f}, {p['high']:+.3f}]" if p["n"] >= 2 else ""
    line = (f"{na} − {nb}: {p['metric']} {p['mean']:+.3f}{ci} (95 % CI over {p['n']} test images); {na} ahead on "
            f"{p['ahead_a']}, {nb} on {p['ahead_b']}, tied on {p['tied']}")
    g = p.get("by_group")
    if g:
        gci = f" [{g['low']:+.3f}, {g['high']:+.3f}]" if g["n"] >= 2 else " (no interval from one group)"
        line += (f"\nby group: {g['mean']:+.3f}{gci} (95 % CI over {g['n']} groups, each group's mean Δ; the "
                 f"interval to read when images of a group are alike); {na} ahead in {g['ahead_a']}, {nb} in "
                 f"{g['ahead_b']}")
    return line
