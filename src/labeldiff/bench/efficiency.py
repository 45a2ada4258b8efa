"""Loop and predict efficiency: what the real commands spend beyond the network itself.

``bench loop``: the bare step (forward + backward + optimizer step of the same network on one fixed,
already-corrupted batch, same precision) divided by a step of the real ``pretrain`` loop (batches
decoded from disk, corruption drawn, gradient clipping, EMA, logging, checkpoints). Bare runs come
before and after each real run, which is divided by their mean. The real loop's step time is read
from its own ``log.jsonl`` (``images_per_s`` over each ``log_every`` window; the first window, with
the start-up, is left out); checkpoints fall every ``checkpoint_every`` steps, more rarely than a short
benchmark runs, so one is written and timed on its own and its time is spread over ``checkpoint_every``
steps. Both sides run in this process, one after the other, with the same threads.

``bench predict``: a bare batched forward over the network inputs that prediction evaluates (the
sliding-window tiles of every test image, ``sw_batch_size`` at a time, or the whole resized image)
divided by ``labeldiff predict`` on the same folder (reading, resizing, sliding window with Gaussian
blending, resizing back, entropy, writing three PNGs per image).
"""
from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from labeldiff.config import RunConfig
from labeldiff.errors import ConfigError, DataError

LOOP_GOAL, PREDICT_GOAL = 0.90, 0.85  # the goals the benchmarks report against


# ---- loop ----------------------------------------------------------------------------------------

def real_step_seconds(log_path: Path, batch_size: int) -> list[float]:
    """Per-step seconds of each logged window of a run (``batch / images_per_s``), in order."""
    records = (json.loads(line) for line in Path(log_path).read_text().splitlines())
    return [batch_size / r["images_per_s"] for r in records if r.get("images_per_s", 0) > 0]


def bench_loop(cfg: RunConfig, steps: int = 30, workers: tuple[int, ...] = (0, 2), profile: bool = False) -> dict:
    """Loop efficiency of ``cfg`` (a pretraining config with its data path) for each worker count.

    Each real run trains ``steps`` steps (a multiple of ``cfg.train.log_every`` past the first window)
    into a temporary folder; the bare side runs as many steps of the same network before the first and
    after every real run. Returns ``{"rows": [{"workers", "bare_s", "bare_around_s", "real_s",
    "checkpoint_s", "real_with_checkpoints_s", "efficiency"}], ...}``.
    """
    from labeldiff.checkpoint import save_checkpoint
    from labeldiff.corruption import build_corruption
    from labeldiff.data.datasets import StepBatches
    from labeldiff.pretrain.cost import step_seconds
    from labeldiff.pretrain.loop import EMA
    from labeldiff.pretrain.run import build_pretrain_network, run_pretrain, training_samples
    from labeldiff.runtime import generator, precision_name, resolve_device, resolve_precision

    every = cfg.train.log_every
    if steps < 2 * every:
        raise ConfigError(f"--steps {steps}: give at least {2 * every} (two log windows of {every} steps; "
                         f"the first, with the start-up, is not counted)")
    steps = steps // every * every
    # the bare side: the network, optimizer and precision the real run uses, one batch corrupted once
    corruption = build_corruption(cfg.corruption)
    device = resolve_device(cfg.train.device)
    model, _frozen = build_pretrain_network(cfg, corruption)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    samples, num_classes = training_samples(cfg, corruption)
    batch = StepBatches(samples, cfg.data, cfg.train.batch_size, cfg.train.seed,
                        labeled=corruption.needs_labels, num_classes=num_classes)[0]
    c = corruption(batch["image"].to(device), generator(0, device),
                   batch["mask"].to(device) if "mask" in batch else None)
    if cfg.train.channels_last:  # the layout the real loop trains in (NHWC weights and inputs)
        model.to(memory_format=torch.channels_last)
        c.input = c.input.contiguous(memory_format=torch.channels_last)
    dtype = resolve_precision(cfg.train.precision, device)

    def bare() -> float:
        return statistics.fmean(step_seconds(model, optimizer, lambda net: corruption.loss(net(c.input, c.t), c),
                                                  steps, dtype)[every:])

    # bare, real, bare, real, …, bare: each real run is divided by the mean of the bare runs beside it, so
    # a machine whose speed drifts (a shared VM: ±10 % over minutes here) biases neither side
    bares, reals = [bare()], []
    for n_workers in workers:
        run_cfg = RunConfig.from_dict(cfg.to_dict())
        run_cfg.train.steps, run_cfg.data.num_workers = steps, n_workers
        with tempfile.TemporaryDirectory(prefix="labeldiff-bench-loop-") as tmp:
            run_pretrain(run_cfg, Path(tmp) / "run")
            reals.append(statistics.fmean(real_step_seconds(Path(tmp) / "run" / "log.jsonl",
                                                            run_cfg.train.batch_size)[1:]))
        bares.append(bare())
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    with tempfile.TemporaryDirectory(prefix="labeldiff-bench-ckpt-") as tmp:
        t0 = time.perf_counter()
        save_checkpoint(Path(tmp), steps, model, optimizer, ema.state if ema else None, {"loss": 0.0})
        checkpoint = time.perf_counter() - t0
    machine = step_utilisation(lambda: corruption.loss(model(c.input, c.t), c).backward(), device, dtype)
    if profile:  # where a bare step's time goes, operator by operator (with the optimizer step)
        from labeldiff.bench.flops import top_operators
        from labeldiff.runtime import autocast

        def one_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, dtype):
                loss = corruption.loss(model(c.input, c.t), c)
            loss.backward()
            optimizer.step()

        machine["profile"] = top_operators(one_step, device)
    rows = []
    for i, n_workers in enumerate(workers):
        real = reals[i] + checkpoint / cfg.train.checkpoint_every
        ref = (bares[i] + bares[i + 1]) / 2
        rows.append({"workers": n_workers, "bare_s": ref, "bare_around_s": (bares[i], bares[i + 1]),
                     "real_s": reals[i], "checkpoint_s": checkpoint, "real_with_checkpoints_s": real,
                     "efficiency": ref / real, "utilisation_bare": machine["flops"] / ref / machine["peak"],
                     "utilisation_real": machine["flops"] / real / machine["peak"]})
    return {"rows": rows, **machine, "steps": steps, "batch_size": cfg.train.batch_size, "size": cfg.data.size,
            "precision": precision_name(dtype) + (", channels-last" if cfg.train.channels_last else ""),
            "device": str(device), "threads": torch.get_num_threads(),
            "checkpoint_every": cfg.train.checkpoint_every, "goal": LOOP_GOAL}


def step_utilisation(step, device: torch.device, dtype: torch.dtype | None) -> dict:
    """The counted FLOPs of ``step()`` (autocast as the run computes it) and the measured peak in its dtype
    (:mod:`labeldiff.bench.flops`): ``{"flops", "peak", "peak_dtype", "datasheet"}``."""
    from labeldiff.bench.flops import count_flops, datasheet, dtype_name, measured_peak, peak_dtype
    from labeldiff.runtime import autocast

    def counted() -> None:
        with autocast(device, dtype):
            step()

    return {"flops": count_flops(counted), "peak": measured_peak(device, peak_dtype(dtype)),
            "peak_dtype": dtype_name(peak_dtype(dtype)), "datasheet": datasheet(device)}


def machine_lines(result: dict, per: str, seconds: dict[str, float]) -> list[str]:
    """How much of the machine: FLOPs counted per ``per``, achieved FLOP/s and utilisation for each of
    ``seconds`` (name → seconds per ``per``), against the measured peak."""
    from labeldiff.bench.flops import tflops

    sheet = f"; datasheet {tflops(result['datasheet'])}FLOP/s (reference)" if result.get("datasheet") else ""
    lines = [f"\n{tflops(result['flops'])}FLOP per {per} (counted: torch.utils.flop_counter, matrix multiplies and "
             f"convolutions, forward{' + backward' if per == 'step' else ''}); measured peak "
             f"{tflops(result['peak'])}FLOP/s ({result['peak_dtype']} matrix multiply{sheet})", "",
             "| | time | achieved | utilisation of the measured peak |", "|---|---|---|---|"]
    for name, s in seconds.items():
        a = result["flops"] / s
        lines.append(f"| {name} | {1000 * s:.1f} ms | {tflops(a)}FLOP/s | **{a / result['peak']:.1%}** |")
    return lines


def format_loop(result: dict, title: str) -> str:
    lines = [title,
             f"{result['steps']} steps of batch {result['batch_size']} at {result['size']}², {result['precision']}, "
             f"{result['device']}, {result['threads']} threads; a checkpoint every {result['checkpoint_every']} steps",
             "", "| data workers | bare step (before, after) | real step | checkpoint (spread) | loop efficiency |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        before, after = r["bare_around_s"]
        lines.append(f"| {r['workers']} | {1000 * r['bare_s']:.1f} ms ({1000 * before:.0f}, {1000 * after:.0f}) | "
                     f"{1000 * r['real_with_checkpoints_s']:.1f} ms | {r['checkpoint_s']:.2f} s / "
                     f"{result['checkpoint_every']} | **{r['efficiency']:.3f}** |")
    lines.append(f"\ngoal ≥ {result['goal']:.2f} (bare / real)")
    r = result["rows"][0]
    if result.get("profile"):
        lines += ["\nwhere a bare step's time goes (torch.profiler, self time):", "```", result["profile"], "```"]
    lines += machine_lines(result, "step", {"bare step": r["bare_s"],
                                            f"real step ({r['workers']} workers)": r["real_with_checkpoints_s"]})
    return "\n".join(lines)


# ---- predict -------------------------------------------------------------------------------------

def window_starts(length: int, roi: int, overlap: float) -> list[int]:
    """Start offsets of the tiles MONAI's ``sliding_window_inference`` takes along one axis of ``length``
    ≥ ``roi``: interval ``int(roi·(1 − overlap))``, the last tile flush with the end."""
    if length == roi:
        return [0]
    interval = max(int(roi * (1 - overlap)), 1)
    n = math.ceil((length - roi) / interval) + 1
    return [min(i * interval, length - roi) for i in range(n)]


def network_inputs(image: torch.Tensor, cfg, whole_image: bool, overlap: float = 0.25) -> list[torch.Tensor]:
    """The ``[C, h, w]`` inputs prediction feeds the network for ``image [C, H, W]`` (see
    :func:`labeldiff.evaluate.predict.predict_logits`): the resized image, or its sliding-window tiles."""
    from labeldiff.data.datasets import network_hw, resize_image

    x = resize_image(image, network_hw(tuple(image.shape[-2:]), cfg))
    if cfg.mode == "resize" or whole_image:
        return [x]
    s, (h, w) = cfg.size, x.shape[-2:]  # network_hw: no side is shorter than the tile
    return [x[:, i:i + s, j:j + s] for i in window_starts(h, s, overlap) for j in window_starts(w, s, overlap)]


def bench_predict(model_dir: Path, inputs: Path, sw_batch_size: int = 8, repeats: int = 1,
                  device: str = "cpu", io_threads: int = 2) -> dict:
    """Predict efficiency of a segmenter run on a folder of images: bare batched forward / ``predict``.

    The bare side stacks ``sw_batch_size`` inputs of one shape per forward (whole resized images too,
    which ``predict`` runs one at a time), copied to ``device`` as ``predict`` copies them; each side is
    timed ``repeats`` times and the fastest kept. On a GPU the bare side waits for the device before its
    clock stops (``predict`` waits anyway: it writes the masks)."""
    from labeldiff.data.folders import list_images
    from labeldiff.data.io import read_image
    from labeldiff.evaluate.run import run_predict
    from labeldiff.runs import open_segmenter
    from labeldiff.runtime import INFERENCE_PRECISION, autocast, resolve_precision

    model, cfg = open_segmenter(Path(model_dir), device)
    inputs = Path(inputs)
    files = list_images(inputs / "images" if (inputs / "images").is_dir() else inputs)
    if not files:
        raise DataError(f"{inputs} holds no images")
    real = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="labeldiff-bench-predict-") as tmp:
            t0 = time.perf_counter()
            run_predict(Path(model_dir), inputs, Path(tmp), device=device, io_threads=io_threads)
            real.append(time.perf_counter() - t0)

    whole = cfg.data.mode == "resize" or getattr(model, "whole_image", False)
    tiles = [t for path in files.values()
             for t in network_inputs(torch.from_numpy(read_image(path, cfg.data.channels)), cfg.data, whole)]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tiles:  # batch inputs of one shape together
        groups.setdefault(tuple(t.shape), []).append(t)
    device = next(model.parameters()).device
    dtype = resolve_precision(INFERENCE_PRECISION, device)
    bare = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for same in groups.values():
                for s in range(0, len(same), sw_batch_size):
                    with autocast(device, dtype):
                        model(torch.stack(same[s:s + sw_batch_size]).to(device)).float()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            bare.append(time.perf_counter() - t0)
    real_s, bare_s = min(real), min(bare)
    from labeldiff.bench.flops import count_flops, datasheet, dtype_name, measured_peak, peak_dtype

    def forwards() -> None:
        with torch.no_grad():
            for same in groups.values():
                for s in range(0, len(same), sw_batch_size):
                    with autocast(device, dtype):
                        model(torch.stack(same[s:s + sw_batch_size]).to(device))

    machine = {"flops": count_flops(forwards), "peak": measured_peak(device, peak_dtype(dtype)),
               "peak_dtype": dtype_name(peak_dtype(dtype)), "datasheet": datasheet(device)}
    return {**machine, "images": len(files), "network_inputs": len(tiles), "real_s": real_s, "bare_s": bare_s,
            "efficiency": bare_s / real_s, "goal": PREDICT_GOAL, "threads": torch.get_num_threads(), "device": str(device),
            "mode": f"{'whole images' if whole else f'{cfg.data.size}² tiles'}, batch {sw_batch_size}",
            "io_threads": io_threads}


def format_predict(result: dict, title: str) -> str:
    n = result["images"]
    return "\n".join([
        title, f"{n} images, {result['network_inputs']} network inputs ({result['mode']}), "
               f"{result['device']}, {result['threads']} threads; predict reads and writes on "
               f"{result['io_threads'] or 'no'} I/O thread(s) beside the network", "",
        "| | total | per image |", "|---|---|---|",
        f"| bare batched forward | {result['bare_s']:.3f} s | {result['bare_s'] / n:.4f} s |",
        f"| `labeldiff predict` | {result['real_s']:.3f} s | {result['real_s'] / n:.4f} s |",
        f"\npredict efficiency **{result['efficiency']:.3f}** (goal ≥ {result['goal']:.2f})",
        *machine_lines(result, "folder", {"bare batched forward": result["bare_s"],
                                          "`labeldiff predict`": result["real_s"]})])
