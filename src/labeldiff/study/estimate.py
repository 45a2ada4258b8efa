"""What is left of a study, and about how long it takes on this machine: the time lines of ``--dry-run``.

Each distinct pretraining network and each distinct fine-tuning network, batch and precision is timed once
(:func:`labeldiff.pretrain.run.calibrate_pretrain`, :func:`labeldiff.transfer.finetune.calibrate_finetune`:
the second of two calibration steps on real batches of the study's data, with weights thrown away), and
multiplied by the steps each run and cell still has to train. A cell's evaluation is timed too: one test
image predicted as evaluation predicts it (:func:`labeldiff.transfer.finetune.calibrate_evaluation`), times
the test images. A probe's MLPs (they stop on their own loss), selection features and a volume's 3D
metrics are not in the figures.
"""
from __future__ import annotations

import json
from dataclasses import asdict

from labeldiff.config import RunConfig, flatten, geometry_fields
from labeldiff.errors import LabeldiffError
from labeldiff.pretrain.cost import duration, per_step
from labeldiff.pretrain.run import calibrate_pretrain
from labeldiff.resolve import Layer
from labeldiff.runtime import precision_name, resolve_device, resolve_precision, threads_summary
from labeldiff.study.execute import cell_config, cell_row, run_config
from labeldiff.study.plan import Cell, Pretraining, Target
from labeldiff.transfer.finetune import calibrate_evaluation, calibrate_finetune

UNTIMED = {"probe": "a probe's MLPs stop on their own loss", "source": "no training: evaluation only"}


def steps_left(run: Pretraining) -> int:
    """Training steps a pretraining run still has: all, those after its last checkpoint, or, continuing a
    shorter run of its sweep, those after that run's length."""
    if run.finished:
        return 0
    latest = run.dir / "latest.json"
    if latest.is_file():
        return run.cfg.train.steps - json.loads(latest.read_text())["step"]
    if run.continues is not None:
        return run.cfg.train.steps - run.continues.cfg.train.steps
    return run.cfg.train.steps


def _key(cfg: RunConfig, strategy: str) -> str:
    """What a step's time depends on: the network, the data geometry, batch, precision, device and, for a
    cell, what it trains and how batches are augmented."""
    flat = flatten(cfg)
    t = cfg.transfer
    return json.dumps([cfg.kind, asdict(cfg.model), cfg.corruption.method if cfg.kind == "pretrain" else None,
                       {name: flat[name] for name in geometry_fields()}, cfg.train.batch_size, cfg.train.precision,
                       cfg.train.device, str(cfg.data.path) if cfg.kind == "pretrain" else None, strategy,
                       t.head_hidden, t.keep_out_norm, t.augment, t.flips], sort_keys=True, default=str)


def _how(cfg: RunConfig) -> str:
    return precision_name(resolve_precision(cfg.train.precision, resolve_device(cfg.train.device)))


def estimate_lines(runs: list[Pretraining], cells: list[Cell], shared: dict[str, list[Layer]],
                   target: Target, tuning: tuple[list[Cell], Target] | None = None) -> list[str]:
    """The ``--dry-run`` lines: ≈ time per pretraining run and per cell still to run, and the total;
    ``tuning``: a study's tuning cells and their target (the validation images they are scored on)."""
    timed: dict[str, float | str] = {}

    def seconds(cfg: RunConfig, strategy: str, measure) -> float | str:
        key = _key(cfg, strategy)
        if key not in timed:
            try:
                timed[key] = measure()
            except LabeldiffError as e:  # e.g. a step that would not fit in memory: say so, keep planning
                timed[key] = f"not timed: {e}"
        return timed[key]

    lines, total, configs = [], 0.0, {}
    for run in runs:
        left = steps_left(run)
        cfg = configs[run.name] = run_config(run)
        if left <= 0:
            continue
        step = seconds(cfg, "pretrain", lambda c=cfg: calibrate_pretrain(c))
        if isinstance(step, str):
            lines.append(f"  pretraining {run.name}: {left} steps, {step}")
            continue
        total += left * step
        lines.append(f"  pretraining {run.name}: ≈ {duration(left * step)} for {left} steps ({per_step(step)} a "
                     f"step, {_how(cfg)})")
    groups: dict[tuple, list] = {}
    tuning_cells, tuning_target = tuning or ([], target)
    for cell, on in [*((c, tuning_target) for c in tuning_cells), *((c, target) for c in cells)]:
        if cell.finished:
            continue
        stage = "tuning cells" if on is not target else "cells"
        group = groups.setdefault((stage, cell.method, cell.strategy, cell.protocol), [0, None, ""])
        group[0] += 1
        if group[1] is not None or group[2]:
            continue
        if cell.strategy in UNTIMED:
            group[2] = UNTIMED[cell.strategy]
            continue
        pre = configs.get(cell.pre.name) if cell.pre is not None and not cell.pre.finished else None
        cfg = cell_config(cell, shared[cell.protocol], on, pre_config=pre)
        samples = on.ds.samples(on.train[:max(1, min(cell.k, len(on.train)))])
        phases = [(cfg.transfer.lp_steps, "linear")] if cfg.transfer.strategy == "lp-ft" else []
        phases.append((cfg.train.steps, cfg.transfer.strategy))
        cost, steps, parts = 0.0, 0, []
        for n, strategy in phases:
            step = seconds(cfg, strategy,
                           lambda c=cfg, s=strategy: calibrate_finetune(c, samples, on.num_classes, s))
            if isinstance(step, str):
                group[2] = step
                break
            cost, steps = cost + n * step, steps + n
            parts.append(f"{per_step(step)} a step" + (f" ({strategy})" if len(phases) > 1 else ""))
        else:
            at_most = "at most " if cfg.transfer.steps_rule == "plateau" else ""
            scoring = seconds(cfg, "evaluate", lambda c=cfg: calibrate_evaluation(
                c, on.ds.samples(on.test[:1])[0], on.num_classes)) if on.test else 0.0
            scored = ""
            if not isinstance(scoring, str):
                cost += scoring * len(on.test)
                scored = f", evaluation {duration(scoring * len(on.test))} ({per_step(scoring)} an image)"
            group[1] = cost
            group[2] = f"{at_most}{steps} steps, {', '.join(parts)}, {_how(cfg)}{scored}"
    for (stage, method, strategy, protocol), (n, cost, what) in groups.items():
        name = f"{method} {strategy}" + (f" [{protocol}]" if len(shared) > 1 else "")
        if cost is None:
            lines.append(f"  {stage} {name}: {n} to run, not estimated ({what})")
            continue
        total += n * cost
        lines.append(f"  {stage} {name}: {n} to run × ≈ {duration(cost)} each ({what}) ≈ {duration(n * cost)}")
    if not lines:
        return []
    done = [row["seconds"] for row in (cell_row(c) for c in cells if c.finished) if row.get("seconds")]
    measured = (f"; the {len(done)} finished cells took {duration(sum(done) / len(done))} each on average, evaluation "
                f"included" if done else "")
    return ([f"time left, ≈, on this machine ({threads_summary()}): measured step time × the steps still to train "
             f"(each network, batch and precision timed once: the second of two calibration steps on real batches "
             f"of the data, weights thrown away)"] + lines +
            [f"  total ≈ {duration(total)} of training steps and evaluation of the {len(target.test)} test images "
             f"per cell{measured}"])
