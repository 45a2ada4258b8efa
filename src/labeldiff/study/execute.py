"""Running what :mod:`labeldiff.study.plan` planned: train, resume or continue the pretraining runs; select,
fine-tune and evaluate each cell into its folder (``eval/`` written whole, :func:`labeldiff.fs.atomic_folder`,
keeping the predictions of the first :data:`VIEWER_IMAGES` test images for the report's overlay viewer);
score finished cells in 3D, under corruptions and with AJI when it was asked after they finished; read a
finished cell back as a result row; run the cells in several processes side by side."""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

from tqdm.auto import tqdm

from dataclasses import asdict

from labeldiff.config import RunConfig
from labeldiff.evaluate.instances import INSTANCE_METRICS
from labeldiff.evaluate.run import run_evaluate
from labeldiff.evaluate.volume import class_mean, run_evaluate_volumes
from labeldiff.fs import atomic_folder
from labeldiff.pretrain.cost import duration
from labeldiff.pretrain.run import run_pretrain
from labeldiff.resolve import Layer, compose, resolve
from labeldiff.runs import RunFolder
from labeldiff.runtime import resolve_device
from labeldiff.sample.synthetic import ensure_synthetic
from labeldiff.study import report
from labeldiff.study.configs import tuned_layer, write_json
from labeldiff.study.plan import VALIDATION, Cell, Pretraining, Selector, Target, todo_order
from labeldiff.study.prepare import code_state
from labeldiff.study.spec import StudyError, LABELED_METHODS, Study
from labeldiff.study.tuning import point_label
from labeldiff.transfer.run import run_transfer


TIMING = "study_timing.json"  # written by the study into a pretraining folder it trained
VIEWER_IMAGES = 8  # each cell keeps its predictions of the first 8 test images, eval/predictions/ (report.html)


class _Renaming(io.TextIOBase):
    """A text stream that writes to ``stream`` with the path ``tmp`` replaced by ``final``."""

    def __init__(self, stream, tmp: Path, final: Path):
        self.stream, self.tmp, self.final = stream, str(tmp), str(final)

    def write(self, text: str) -> int:
        self.stream.write(text.replace(self.tmp, self.final))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


@contextmanager
def written_whole(folder: Path) -> Iterator[Path]:
    """:func:`labeldiff.fs.atomic_folder`, with what is printed meanwhile naming ``folder``, where the files
    will be, instead of the temporary folder they are written in (``eval.tmp/``, gone once renamed)."""
    with atomic_folder(folder) as tmp, redirect_stdout(_Renaming(sys.stdout, tmp, folder)):
        yield tmp


def start_from(shorter: Pretraining, folder: Path) -> None:
    """Seed ``folder`` with the final checkpoint, config and log of the finished ``shorter`` run."""
    if not shorter.finished:
        raise RuntimeError(f"{shorter.dir} is not finished; it must be before {folder} can continue it")
    info = json.loads((shorter.dir / "latest.json").read_text())
    with atomic_folder(folder) as tmp:
        shutil.copytree(shorter.dir / info["dir"], tmp / info["dir"])
        for name in ("config.json", "latest.json", "log.jsonl"):
            shutil.copyfile(shorter.dir / name, tmp / name)


def run_config(run: Pretraining) -> RunConfig:
    """The resolved config a pretraining run trains with."""
    return resolve("pretrain", run.layers) if run.layers is not None else RunConfig.from_dict(run.cfg.to_dict())


def pretrain(runs: list[Pretraining]) -> None:
    """Train, resume or reuse every pretraining run."""
    for i, run in enumerate(runs, 1):
        if run.reused:
            print(f"[pretrain {i}/{len(runs)}] {run.name}: your run, used as it is: {run.dir}")
        elif run.finished:
            print(f"[pretrain {i}/{len(runs)}] {run.name}: finished, reusing {run.dir}")
        else:
            resume = (run.dir / "latest.json").is_file()
            if not resume and run.continues is not None:
                start_from(run.continues, run.dir)
                resume = True
                print(f"[pretrain {i}/{len(runs)}] {run.name}: continuing {run.continues.name} "
                      f"({run.continues.cfg.train.steps} → {run.cfg.train.steps} steps) → {run.dir}")
            else:
                print(f"[pretrain {i}/{len(runs)}] {run.name}: {'resuming' if resume else 'training'} → {run.dir}")
            result = run_pretrain(run_config(run), run.dir, resume=resume, overwrite=not resume)
            write_json(run.dir / TIMING, {"seconds": result["seconds"], "resumed": resume})


def pretrain_seconds(runs: list[Pretraining]) -> dict[str, float | None]:
    """Seconds of each pretraining run (of its last session when resumed; None: not trained by a study)."""
    files = {r.name: r.dir / TIMING for r in runs}
    return {name: json.loads(f.read_text())["seconds"] if f.is_file() else None for name, f in files.items()}


def cell_config(cell: Cell, shared: list[Layer], target: Target, pre_config: RunConfig | None = None) -> RunConfig:
    """The resolved config of a cell (:func:`labeldiff.resolve.resolve`): the protocol's ``shared`` layers
    (:func:`~labeldiff.study.configs.finetune_layers`), then the cell's own values, over its pretrained run
    (``pre_config``: that run's config where it is not trained yet, for ``--dry-run``). A cell of a tuned study
    fine-tunes with its grid point (:attr:`Cell.tuned`) on top of the shared layers."""
    own = {"data.split_file": str(target.ds.split_file) if target.ds.split_file.is_file() else None,
           "data.num_classes": target.num_classes, "transfer.strategy": cell.strategy, "transfer.labels": cell.k,
           "train.seed": cell.seed}
    # a protocol's keep_head applies where there is a source head: hybrid / supervised pretraining
    if cell.pre is None or cell.pre.cfg.corruption.method not in LABELED_METHODS:
        own["transfer.keep_head"] = False  # (auto is resolved by the fine-tuning itself)
    pre = None
    if cell.pre is not None:
        own["transfer.pretrained"] = str(cell.pre.dir)
        pre = pre_config or RunFolder.open(cell.pre.dir, flag="--pretrained").config
    else:  # scratch: the pretrained runs' network, built from the config alone
        own["transfer.pretrained"] = None
        own.update({f"model.{k}": v for k, v in asdict(cell.model).items()})
        own["data.channels"] = cell.model.in_channels
    return resolve("segmentation", shared + tuned_layer(cell.tuned) + [Layer(f"cell {cell.id}", own)], pre,
                   str(cell.pre.dir) if cell.pre else None)


def run_cell(cell: Cell, shared: list[Layer], target: Target, selector: Selector) -> float:
    """Select, train, evaluate one cell into its folder (replacing a partial one); returns seconds."""
    t0 = time.time()
    if cell.dir.exists():
        shutil.rmtree(cell.dir)
    key = cell.id.rsplit("-", 1)[1]
    twin = next((c for c in cell.dir.parent.glob(f"*-{key}") if c != cell.dir and (c / "eval" / "metrics.json").is_file()),
                None)
    if twin is not None:  # the same computation under another name: a source cell, or a keep_head that does not apply
        info = json.loads((twin / "cell.json").read_text())
        write_json(cell.dir / "cell.json", {**cell.describe(), "stems": info["stems"], "git": info["git"],
                                            "same_as": twin.name})
        with atomic_folder(cell.dir / "eval") as tmp:
            shutil.copytree(twin / "eval", tmp)
            write_json(tmp / "timing.json", {"seconds": 0.0, "copied_from": twin.name})
            if (twin / "run").exists():
                os.symlink(twin / "run", cell.dir / "run")
        return 0.0
    if cell.strategy == "source":
        return source_cell(cell, compose("segmentation", shared)[0], target, t0)
    stems = selector.stems(cell)
    write_json(cell.dir / "cell.json", {**cell.describe(), "stems": stems, "git": code_state()})
    cfg = cell_config(cell, shared, target)
    run_transfer(cfg, cell.dir / "run", stems)
    with written_whole(cell.dir / "eval") as tmp:
        run_evaluate(cell.dir / "run", tmp, split=VALIDATION if target.validation else cfg.data.test_split,
                     device=cfg.train.device, metrics=list(target.scores), unlabeled_seen=target.validation,
                     predictions=0 if target.validation else VIEWER_IMAGES)
        seconds = time.time() - t0
        write_json(tmp / "timing.json", {"seconds": seconds})
    return seconds


def source_cell(cell: Cell, ft: RunConfig, target: Target, t0: float) -> float:
    """``source``: the hybrid / supervised run as it is, with no target label, on the target's test
    split. Its key leaves out k, seed and protocol, so :func:`run_cell` evaluates it once per
    pretraining run and copies it into the other cells."""
    write_json(cell.dir / "cell.json", {**cell.describe(), "stems": [], "git": code_state()})
    split_file = str(target.ds.split_file) if target.ds.split_file.is_file() else None
    with written_whole(cell.dir / "eval") as tmp:
        run_evaluate(cell.pre.dir, tmp, data=str(target.ds.root), split=ft.data.test_split, split_file=split_file,
                     device=ft.train.device, metrics=list(target.scores), predictions=VIEWER_IMAGES)
        seconds = time.time() - t0
        write_json(tmp / "timing.json", {"seconds": seconds})
    return seconds


def volume_evaluations(cells: list[Cell], target: Target, device: str = "auto") -> None:
    """``metrics: volume``: score every finished cell's model on the test slab of each case in 3D (Dice,
    HD95, NSD; :func:`~labeldiff.evaluate.volume.run_evaluate_volumes`) into ``eval/volume/``, once."""
    if target.slabs is None:
        return
    todo = [c for c in cells if c.finished and not (c.dir / "eval" / "volume" / "metrics.json").is_file()]
    for cell in tqdm(todo, desc="3D slab scores", unit="cell", disable=not todo):
        model = cell.pre.dir if cell.strategy == "source" else cell.dir / "run"
        with atomic_folder(cell.dir / "eval" / "volume") as tmp:
            run_evaluate_volumes(model, target.ds.root, tmp, slabs=target.slabs, device=device, quiet=True)


def viewer_predictions(cells: list[Cell], target: Target, device: str = "auto") -> None:
    """Finished cells evaluated without their per-image predictions (by a labeldiff before the report's overlay
    viewer): predict the first :data:`VIEWER_IMAGES` test images with the cell's model into
    ``eval/predictions/`` (:func:`~labeldiff.evaluate.run.save_prediction`), once, as their evaluation does now."""
    import torch

    from labeldiff.evaluate.predict import predict_logits
    from labeldiff.evaluate.run import save_prediction

    todo = [c for c in cells if c.finished and not (c.dir / "eval" / "predictions").is_dir()]
    samples = target.ds.samples(target.test[:VIEWER_IMAGES])
    for cell in tqdm(todo, desc="predictions for the report's viewer", unit="cell", disable=not todo):
        run = RunFolder.open(cell.run_dir)
        model, cfg = run.segmenter(resolve_device(device)), run.config
        with atomic_folder(cell.dir / "eval" / "predictions") as tmp:
            for s in samples:
                logits = predict_logits(model, torch.from_numpy(s.read_image(cfg.data.channels)), cfg.data)
                save_prediction(tmp, s.stem, logits, logits.argmax(0).numpy(), target.num_classes)


def evaluate_again(cell: Cell, target: Target, ft: RunConfig, folder: str, **options) -> None:
    """``labeldiff evaluate`` of a finished cell's model (a ``source`` cell's: its pretraining run, on the
    target) on the test split into ``eval/<folder>/``, written whole, with ``options`` of
    :func:`~labeldiff.evaluate.run.run_evaluate`."""
    split_file = str(target.ds.split_file) if target.ds.split_file.is_file() else None
    where = ({"data": str(target.ds.root), "split_file": split_file} if cell.strategy == "source" else {})
    with written_whole(cell.dir / "eval" / folder) as tmp:
        run_evaluate(cell.pre.dir if cell.strategy == "source" else cell.dir / "run", tmp,
                     split=ft.data.test_split, device=ft.train.device, overlay_count=1, **where, **options)


def object_evaluations(cells: list[Cell], target: Target, ft: RunConfig) -> None:
    """``metrics: [..., aji]`` asked after some cells finished without it: evaluate each of those again with
    ``--metrics aji`` into ``eval/aji/``, once (a cell run with ``aji`` asked has it in ``eval/metrics.json``)."""
    if not target.scores:
        return
    todo = [c for c in cells if c.finished and set(_scored(c, target.scores)) != set(target.scores)]
    for cell in tqdm(todo, desc="AJI of cells finished without it", unit="cell", disable=not todo):
        evaluate_again(cell, target, ft, "aji", metrics=list(target.scores))


def _scored(cell: Cell, names: tuple[str, ...]) -> dict:
    """The entries among ``names`` that the cell's evaluation has, from ``eval/metrics.json``, else from
    ``eval/aji/metrics.json`` (:func:`object_evaluations`)."""
    found: dict = {}
    for path in (cell.dir / "eval" / "metrics.json", cell.dir / "eval" / "aji" / "metrics.json"):
        if path.is_file():
            m = json.loads(path.read_text())
            found.update({n: m[n] for n in names if n in m and n not in found})
    return found


def robustness_evaluations(cells: list[Cell], study: Study, target: Target, ft: RunConfig) -> None:
    """``robustness:``: ``labeldiff evaluate --corruptions`` of every finished cell's model on the test split
    into ``eval/robustness/``, once per setting (a cell scored under other settings is scored again)."""
    if study.robustness is None:
        return

    def done(c: Cell) -> bool:
        path = c.dir / "eval" / "robustness" / "robustness.json"
        if not path.is_file():
            return False
        r = json.loads(path.read_text())
        return {k: r.get(k) for k in study.robustness} == study.robustness

    todo = [c for c in cells if c.finished and not done(c)]
    for cell in tqdm(todo, desc="robustness", unit="cell", disable=not todo):
        evaluate_again(cell, target, ft, "robustness", corruptions=study.robustness["corruptions"],
                       severities=study.robustness["severities"], corruption_seed=study.robustness["seed"])


def cell_row(cell: Cell) -> dict:
    info = json.loads((cell.dir / "cell.json").read_text())
    m = json.loads((cell.dir / "eval" / "metrics.json").read_text())
    timing = cell.dir / "eval" / "timing.json"
    row = {"cell": cell.id, "method": cell.method, "pretrain_steps": info.get("pretrain_steps"), "arch": cell.arch,
           "strategy": cell.strategy, "protocol": cell.protocol, "k": cell.k, "seed": cell.seed, "select": cell.select,
           "stems": ";".join(info["stems"]), "dice": m["dice"]["mean"], "iou": m["iou"]["mean"]}
    if cell.pre is not None and cell.pre.seed is not None:  # pretrain_seeds: which pretraining run
        row["pretrain_seed"] = cell.pre.seed
    if cell.tuned:  # tune: the grid point it fine-tuned with
        row["tuned"] = point_label(cell.tuned)
    row.update({f"dice_{c}": v for c, v in enumerate(m["dice"]["per_class"].values())})  # keyed by class names
    row["seconds"] = json.loads(timing.read_text())["seconds"] if timing.is_file() else None
    row.update({name: score["mean"] for name, score in _scored(cell, INSTANCE_METRICS).items()})  # metrics: aji
    robust = cell.dir / "eval" / "robustness" / "robustness.json"
    if robust.is_file():  # robustness: the mean Dice over corruption × severity, and clean − that
        r = json.loads(robust.read_text())
        row.update({"dice_corrupted": r["mean_dice"], "dice_drop": r["drop"]})
    volume = cell.dir / "eval" / "volume" / "metrics.json"
    if volume.is_file():  # metrics: volume
        v = json.loads(volume.read_text())
        row.update({"dice_3d": v["dice"], "hd95_mm": class_mean(v["per_class"], "hd95_mm"),
                    "nsd": class_mean(v["per_class"], "nsd")})
    return row


def run_cells(cells: list[Cell], shared: dict[str, list[Layer]], target: Target, out: Path,
              selector: Selector, todo: list[Cell] | None = None, kind: str = "cell",
              table: str = "results.csv") -> int:
    """Run the unfinished cells (or those of ``todo``: a shard's) with progress and ETA; returns how many
    were computed. ``table`` (``results.csv``; ``tuning.csv`` for tuning cells, ``kind`` "tuning cell") lists
    every finished cell, whoever computed it."""
    done = [c for c in cells if c.finished]
    times = [s for s in (cell_row(c)["seconds"] for c in done) if s is not None]
    todo = todo_order(cells) if todo is None else todo
    print(f"{kind}s: {len(cells)} in the study, {len(done)} finished, {len(todo)} to run")
    for i, cell in enumerate(todo):
        eta = sum(times) / len(times) * (len(todo) - i) if times else None
        print(f"[{kind} {len(done) + i + 1}/{len(cells)}] {cell.short()} — {len(done) + i} done, "
              f"ETA {duration(eta)} → {cell.dir}")
        try:
            times.append(run_cell(cell, shared[cell.protocol], target, selector))
        except KeyboardInterrupt:
            print(f"\ninterrupted in {kind} {cell.id}: {len(done) + i}/{len(cells)} {kind}s finished; run the same "
                  f"command again to continue (finished cells and pretraining runs are reused)")
            report.write_csv([cell_row(c) for c in cells if c.finished], out / table)
            raise
        report.write_csv([cell_row(c) for c in cells if c.finished], out / table)
    return len(todo)


def run_workers(path: Path, out: Path, pre_dir: Path, workers: int, log: str = "shard") -> None:
    """Run the cells in ``workers`` processes side by side (``labeldiff study --shard i/N``), each with an
    equal share of the CPU threads and, where there are GPUs, GPU ``i mod #GPUs``; their output goes to
    ``out/workers/shard-i.log`` (``log``: ``tune-shard`` while they run a study's tuning cells). Cells are
    independent, so this needs no communication; a cell is small (k images, a batch of 8), so one per device
    beats one split over devices with DDP."""
    import subprocess
    import sys

    import torch

    logs = out / "workers"
    logs.mkdir(exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // workers)
    gpus = torch.cuda.device_count()
    procs = []
    for i in range(workers):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        stream = open(logs / f"{log}-{i}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "labeldiff.cli", "study", str(path), "--out", str(out),
                                        "--pretrain-dir", str(pre_dir), "--shard", f"{i}/{workers}"],
                                       stdout=stream, stderr=subprocess.STDOUT, env=env), stream))
    print(f"cells in {workers} processes side by side ({threads} thread{'s' if threads > 1 else ''} each"
          f"{f', GPU i mod {gpus}' if gpus else ''}); their output: {logs}/{log}-*.log")
    failed = []
    for i, (proc, stream) in enumerate(procs):
        if proc.wait() != 0:
            failed.append(i)
        stream.close()
    if failed:
        tail = (logs / f"{log}-{failed[0]}.log").read_text(errors="replace")[-3000:]
        raise StudyError(f"study worker(s) {failed} failed; the end of {logs}/{log}-{failed[0]}.log:\n{tail}\n"
                           f"Finished cells are kept: run the same command again to continue")


def synthetic_first(fts: dict[str, RunConfig]) -> None:
    """Sample the synthetic pairs each protocol asks for (``transfer.synthetic``) before any cell, so that
    cells in several worker processes read one cache instead of each sampling it."""
    for ft in fts.values():
        if ft.transfer.synthetic:
            ensure_synthetic(ft.transfer.synthetic, resolve_device(ft.train.device))
