"""``labeldiff study STUDY.yaml --out DIR``: cached pretraining, one fine-tune per cell, reports.

Layout of DIR::

    study.yaml, plan.json            the study as given, and every pretraining run and cell it makes
    data/                            prepared data (``prepare: brain-demo``, a ``split`` block)
    pretrain/<name>-<hash>/          one pretraining run per (method, steps) (or in --pretrain-dir); <hash> of its resolved
                                     config (RunConfig.to_dict() minus fields that do not change the
                                     result), so an edited method gets a new folder and the rest is reused
    cells/<cell-id>/                 cell.json (the cell and its labeled stems), run/ (the fine-tuning
                                     or probe run), eval/ (metrics.json, per_image.csv, overlays.png,
                                     timing.json; predictions/: the first 8 test images' predicted class ids
                                     and uncertainty/ maps, for report.html's viewer; volume/ with
                                     ``metrics: volume``: the 3D slab scores; aji/ when
                                     ``metrics: [..., aji]`` came after the cell finished)
    tune/                            with ``tune``: split-<hash>.json (the train split outside the validation
                                     images, and the validation images) and tune-<cell-id>/, a tuning cell each
                                     (as cells/, scored on the validation images)
    results.csv results.md per_class.md paired.md verdict.md dice_vs_labels.png paired.png overlays.png environment.json
    report.html                      all of these in one page that opens offline in a browser, with a viewer of each
                                     cell's predictions on the first test images and of its scratch pair's
    tuning.md tuning.csv             with ``tune``: each arm's validation scores per grid value and its choice

A pretraining run is finished when its ``model.safetensors`` exists; one with a checkpoint but no
weights is resumed (``run_pretrain(..., resume=True)``); anything else in its folder is replaced.
A cell is finished when ``eval/metrics.json`` exists (``eval/`` is written as ``eval.tmp/`` and
renamed); finished cells are never recomputed, any other cell folder is deleted and redone. With ``tune``
the tuning cells run first; an arm's confirmation cells are planned once its tuning cells are finished.

A cell hands its chosen stems to :func:`labeldiff.transfer.run.run_transfer`, the entry point of
``labeldiff finetune``, and is evaluated on the study's test split. ``data.num_classes`` is set to
the dataset's K so a subset missing a class still gets K outputs. Pretraining on the target's own
images leaves its test split out unless ``data.include_test`` (the MDM paper's transductive protocol).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from labeldiff.data.nnunet import dataset_class_names
from labeldiff.study import html_report, plots, report
from labeldiff.study.configs import finetune_config, finetune_layers, write_json
from labeldiff.study.estimate import estimate_lines
from labeldiff.study.execute import (VIEWER_IMAGES, cell_row, object_evaluations, pretrain, pretrain_seconds,
                                     robustness_evaluations, run_cells, run_workers, synthetic_first,
                                     viewer_predictions, volume_evaluations)
from labeldiff.study.plan import Cell, Selector, Target, check_reused, plan_cells, plan_pretraining, planned_stems, todo_order
from labeldiff.study.prepare import code_state, prepare_data, write_environment
from labeldiff.study.spec import StudyError, Study, load_study
from labeldiff.study.tuning_cells import (Tuning, arm, confirmation_cells, dry_run_lines, plan_tuning, waiting_line,
                                         write_tuning)
from labeldiff.study.verdict import verdict_markdown

OVERLAY_IMAGES = 3


def write_study_file(study: Study, path: Path) -> None:
    """Copy the study file to ``path``; one that ``extends`` another is written whole (both files merged)."""
    if study.extends is None:
        shutil.copyfile(study.file, path)
        return
    import yaml

    head = f"# {study.file.name}, which extends {study.extends.name}: the two merged\n"
    path.write_text(head + yaml.safe_dump(study.merged, sort_keys=False, allow_unicode=True))


def write_reports(study: Study, cells: list[Cell], target: Target, out: Path, pre_seconds: dict, t0: float,
                  git: dict | None = None, tuning: Tuning | None = None) -> list[dict]:
    rows = [cell_row(c) for c in cells if c.finished]
    write_environment(out / "environment.json", study, rows, pre_seconds, time.time() - t0, git)
    leak = ("pretraining also read the test images (include_test, transductive)" if study.data.options.get("include_test")
            else "pretraining never read the test images")
    title = f"{study.file.stem}: {Path(study.data.path).name}, test split {len(target.test)} images; {leak}"
    tuned = write_tuning(tuning, out, title, study.seeds) if tuning is not None else None
    if not rows:
        print("no finished cells yet: nothing to report" + (" but tuning.md" if tuning is not None else ""))
        return rows
    report.write_csv(rows, out / "results.csv")
    names = dataset_class_names(target.ds.root)
    texts = {"results.md": report.results_markdown(rows, study.metrics, title, class_names=names)}
    if "per-class" in study.metrics:
        texts["per_class.md"] = report.per_class_markdown(rows, class_names=names)
    paired = report.paired_markdown(rows)
    if any(r.get("dice_3d") is not None for r in rows):
        paired += "\n" + report.paired_markdown([r for r in rows if r.get("dice_3d") is not None], "dice_3d")
    if any(r.get("aji") not in (None, "") for r in rows):  # metrics: aji — the same pairs, by objects
        paired += "\n" + report.paired_markdown([r for r in rows if r.get("aji") not in (None, "")], "aji")
    if any(r.get("dice_drop") is not None for r in rows):  # robustness: is the pretrained network's drop smaller?
        paired += "\n" + report.paired_markdown([r for r in rows if r.get("dice_drop") is not None], "dice_drop")
    texts["paired.md"] = paired
    verdict = verdict_markdown(rows, title, looks=study.looks, tuned=tuned)
    if study.family is not None:  # said first: whether its primary survives correction for the others
        from labeldiff.study.family import correction_note, judge_registry

        note = correction_note(judge_registry(study.family, own=(study.file.stem, out / "results.csv")),
                               study.file.stem) or (f"**After correction for the other primaries:** {study.family} "
                                                    f"lists no primary of {study.file.stem}; add it there.\n")
        head, rest = verdict.split("\n", 1)
        verdict = f"{head}\n\n{note}{rest}"
    texts["verdict.md"] = verdict
    for name, text in texts.items():
        (out / name).write_text(text)
    plots.plot_dice_vs_labels(rows, out / "dice_vs_labels.png", title=title)
    plots.plot_paired(rows, out / "paired.png", title=title)
    overlays(study, cells, target, out / "overlays.png")
    if tuning is not None and (out / "tuning.md").is_file():
        texts["tuning.md"] = (out / "tuning.md").read_text()
    page = write_html(cells, target, out, title, texts, rows)
    print(f"\n{report.results_table(rows, 'dice')}\nwrote {out}/results.csv, results.md, per_class.md, paired.md, "
          f"verdict.md, dice_vs_labels.png, paired.png, overlays.png, environment.json"
          + (", tuning.md, tuning.csv" if tuning is not None else "")
          + f", {page.name} ({html_report.size_words(page)}: every table, figure and an overlay viewer in one page)")
    return rows


def write_html(cells: list[Cell], target: Target, out: Path, title: str, texts: dict[str, str],
               rows: list[dict]) -> Path:
    """``report.html`` (:mod:`labeldiff.study.html_report`): the reports ``texts`` (file name → Markdown),
    the figures and results.csv of ``out``, and the overlay viewer of the finished cells' kept predictions
    of the first :data:`~labeldiff.study.execute.VIEWER_IMAGES` test images."""
    from labeldiff.runs import RunFolder

    finished = [c for c in cells if c.finished]
    samples = target.ds.samples(target.test[:VIEWER_IMAGES])
    channels = RunFolder.open(finished[0].run_dir).config.data.channels
    viewer = html_report.viewer_data(rows, {c.id: c.dir for c in finished}, samples, channels, target.num_classes,
                                     samples[0].ignore_index if samples else None)
    page = html_report.study_page(out, title, texts, out / "results.csv", viewer, target.num_classes)
    return html_report.write_page(out / html_report.PAGE, page)


def overlays(study: Study, cells: list[Cell], target: Target, path: Path) -> None:
    """The first test images, predicted by every method × strategy at the largest k and seed 0."""
    import torch

    from labeldiff.evaluate.predict import predict_mask
    from labeldiff.runs import RunFolder

    finished = [c for c in cells if c.finished and c.select == study.select[0]
                and c.protocol == study.protocols[0].name]
    if not finished:
        return
    k = max(c.k for c in finished)
    seed = 0 if any(c.seed == 0 for c in finished) else min(c.seed for c in finished)
    chosen = [c for c in finished if c.k == k and c.seed == seed]
    samples = target.ds.samples(target.test[:OVERLAY_IMAGES])
    channels = RunFolder.open(chosen[0].run_dir).config.data.channels
    images = [{"name": s.stem, "image": s.read_image(channels), "target": s.read_mask(target.num_classes)}
              for s in samples]
    preds = {}
    for c in chosen:
        run = RunFolder.open(c.run_dir)
        model, cfg = run.segmenter("cpu"), run.config
        preds[f"{c.method} / {c.strategy}"] = [
            predict_mask(model, torch.from_numpy(s.read_image(cfg.data.channels)), cfg.data).numpy()
            for s in samples]
    plots.plot_overlays(images, preds, path, title=f"k = {k}, seed {seed}, select {study.select[0]}",
                         class_names=dataset_class_names(target.ds.root), num_classes=target.num_classes,
                         ignore_index=samples[0].ignore_index)


def run_study(path: str | Path, out: str | Path, dry_run: bool = False, report_only: bool = False,
              pretrain_only: bool = False, pretrain_dir: str | Path | None = None, workers: int = 1,
              shard: tuple[int, int] | None = None) -> list[dict]:
    """Run the study in ``path`` into ``out`` (see the module docstring); returns the result rows.

    ``workers``: run the cells in that many processes side by side (:func:`run_workers`), after the
    pretraining; ``shard = (i, n)``: be one of them, running the i-th of every n cells to run and scoring
    them (``robustness``, 3D slabs), without pretraining (it must be finished) or reports.

    ``dry_run``: print the plan (what is finished, what would run) and train nothing.
    ``report_only``: rewrite the reports from the finished cells and train nothing.
    ``pretrain_only``: train (or resume) the pretraining runs and stop before the cells.
    ``pretrain_dir``: where pretraining runs are cached (default ``out/pretrain``); runs are named by the
    hash of their config, so studies may share one folder (a screen and its confirmation, say).
    """
    t0, git = time.time(), code_state()  # the code this invocation runs, whatever is committed meanwhile
    study = load_study(path)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_study_file(study, out / "study.yaml")
    prepare_data(study, out)
    fts = {p.name: finetune_config(study, p) for p in study.protocols}
    shared = {p.name: finetune_layers(study, p) for p in study.protocols}
    ft = next(iter(fts.values()))
    target = Target.load(study, ft)
    pre_dir = Path(pretrain_dir).resolve() if pretrain_dir else out / "pretrain"
    runs = plan_pretraining(study, pre_dir, out)
    check_reused(study, runs, target, shared)
    cells = plan_cells(study, runs, target, fts, out)
    tuning, pending = None, []
    if study.tune is not None:  # each arm's settings chosen by its tuning cells, first
        tuning = plan_tuning(study, runs, target, fts, out, cells)
        templates, (cells, waiting) = cells, confirmation_cells(study, runs, target, fts, out, tuning)
        pending = [c for c in templates if arm(c) in set(waiting)]
    write_plan(out, study, target, runs, cells, tuning)
    stale = {p.name for p in (out / "cells").glob("*")} - {c.id for c in cells} if (out / "cells").is_dir() else set()
    later = f"; {len(pending)} of them planned once tuning has chosen their settings" if pending else ""
    print(f"study {study.file.name}: {len(runs)} pretraining runs ({sum(r.finished for r in runs)} finished), "
          f"{len(cells) + len(pending)} cells ({sum(c.finished for c in cells)} finished{later}), "
          f"K={target.num_classes}, "
          f"{len(target.train)} train / {len(target.test)} test images"
          + (f"; {len(stale)} cell folders of earlier versions of the study are kept, not reported" if stale else ""))
    if dry_run:
        selector = Selector(target, ft, runs)
        if tuning is not None:
            for line in dry_run_lines(tuning, Selector(tuning.target, ft, runs)):
                print(line)
        for c in cells:
            print(f"  {'done' if c.finished else 'todo'}  {c.id}  {planned_stems(c, selector)}")
        for c in pending:
            print(waiting_line(c, selector))
        for line in estimate_lines(runs, cells + pending, shared, target,
                                   tuning=(tuning.cells, tuning.target) if tuning is not None else None):
            print(line)
        return [cell_row(c) for c in cells if c.finished]
    if pretrain_only:
        pretrain(runs)
        synthetic_first(fts)
        print(f"pretraining done: {len(runs)} runs in {pre_dir}; run without --pretrain-only for the cells")
        return [cell_row(c) for c in cells if c.finished]
    if shard is not None:
        i, n = shard
        unfinished = [r.name for r in runs if not r.finished]
        if unfinished:
            raise StudyError(f"--shard runs cells only, and pretraining {unfinished} is not finished: run the study "
                             f"with --pretrain-only first (two shards would train the same run)")
        synthetic_first(fts)  # a no-op under --workers (sampled before); shards started by hand sample what is missing
        if tuning is not None and not tuning.finished:  # the tuning cells first; run again for the confirmation
            mine = [c for j, c in enumerate(todo_order(tuning.cells)) if j % n == i]
            run_cells(tuning.cells, shared, tuning.target, out, Selector(tuning.target, ft, runs), todo=mine,
                      kind="tuning cell", table="tuning.csv")
            return [cell_row(c) for c in cells if c.finished]
        mine = [c for j, c in enumerate(todo_order(cells)) if j % n == i]
        run_cells(cells, shared, target, out, Selector(target, ft, runs), todo=mine)
        volume_evaluations(mine, target, ft.train.device)  # scored side by side too; the parent finds them done
        robustness_evaluations(mine, study, target, ft)
        object_evaluations(mine, target, ft)
        return [cell_row(c) for c in cells if c.finished]
    if not report_only:
        pretrain(runs)
        synthetic_first(fts)
        if tuning is not None and not tuning.finished:
            if workers > 1:
                run_workers(Path(study.file), out, pre_dir, workers, log="tune-shard")  # the tuning cells only
            else:
                run_cells(tuning.cells, shared, tuning.target, out, Selector(tuning.target, ft, runs),
                          kind="tuning cell", table="tuning.csv")
            cells, _ = confirmation_cells(study, runs, target, fts, out, tuning)
            write_plan(out, study, target, runs, cells, tuning)
        if workers > 1:
            run_workers(Path(study.file), out, pre_dir, workers)
        else:
            run_cells(cells, shared, target, out, Selector(target, ft, runs))
    volume_evaluations(cells, target, ft.train.device)
    robustness_evaluations(cells, study, target, ft)
    object_evaluations(cells, target, ft)
    viewer_predictions(cells, target, ft.train.device)
    return write_reports(study, cells, target, out, pretrain_seconds(runs), t0, git, tuning)


def write_plan(out: Path, study: Study, target: Target, runs: list, cells: list[Cell], tuning: Tuning | None) -> None:
    """``plan.json``: every pretraining run and cell (with ``tune``: the tuning cells, the validation images and
    the confirmation cells planned so far)."""
    plan = {"data": str(study.data.path), "split_file": study.data.split_file, "train": len(target.train),
            "test": len(target.test), "K": target.num_classes,
            "pretraining": [{"name": r.name, "dir": r.dir, "finished": r.finished} for r in runs],
            "cells": [{**c.describe(), "finished": c.finished} for c in cells]}
    if tuning is not None:
        plan["tuning"] = {"validation": tuning.target.test, "how": tuning.how,
                          "split_file": tuning.target.ds.split_file,
                          "cells": [{**c.describe(), "finished": c.finished} for c in tuning.cells]}
    write_json(out / "plan.json", plan)
