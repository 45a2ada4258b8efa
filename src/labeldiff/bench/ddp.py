"""``labeldiff bench ddp``: 1 vs 2 processes of the real ``pretrain`` under torchrun (gloo, one thread
each), the all-reduce of the model's gradient on its own, and a paper estimate for 8 GPUs.

On a 2-core CPU two processes are not a speed-up test: each process gets one core either way, so this
shows what the distributed layer costs (start-up, the loss all-reduce, DDP's gradient all-reduce) beside
the compute. The all-reduce is timed apart: ``python -m labeldiff.bench.ddp NUMEL REPEATS OUT`` under
torchrun all-reduces a float32 tensor of the gradient's size (one bucket: DDP splits it into 25 MB
buckets and overlaps them with the backward pass, so this is the unoverlapped cost).

The 8-GPU estimate counts the floating-point operations of one training step of a config
(``torch.utils.flop_counter`` on the meta device: nothing is computed) and its gradient bytes; the GPU
throughput and interconnect bandwidth it divides by are assumptions, printed with it; a step measured on one
GPU (``--gpu-step-seconds``) replaces the assumed throughput.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from labeldiff.config import RunConfig

# assumptions of the paper estimate (printed with it): an H100/H200-class GPU's dense bf16 peak, the
# fraction a convolutional UNet reaches, and NCCL's all-reduce bus bandwidth over NVLink within one node
GPU_PEAK_TFLOPS, GPU_UTILISATION, NVLINK_BUS_GBPS = 989.0, 0.4, 400.0


def torchrun(n: int, module_args: list[str], threads: int = 1) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node n -m …`` with ``threads`` torch threads per process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                           "-m", *module_args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun with {n} processes failed:\n{done.stderr[-3000:]}")
    return done


def allreduce_seconds(numel: int, processes: int = 2, repeats: int = 10) -> float:
    """Median seconds of one gloo all-reduce of ``numel`` float32 values over ``processes`` processes."""
    with tempfile.TemporaryDirectory(prefix="labeldiff-bench-allreduce-") as tmp:
        out = Path(tmp) / "allreduce.json"
        torchrun(processes, ["labeldiff.bench.ddp", str(numel), str(repeats), str(out)])
        return json.loads(out.read_text())["median_s"]


def step_cost(cfg: RunConfig) -> dict:
    """FLOPs of one training step (forward + backward at ``cfg.train.batch_size``) and gradient bytes."""
    from torch.utils.flop_counter import FlopCounterMode

    from labeldiff.corruption import build_corruption
    from labeldiff.pretrain.run import build_pretrain_network

    corruption = build_corruption(cfg.corruption)
    with torch.device("meta"):
        model, _ = build_pretrain_network(cfg, corruption)
        b, s = cfg.train.batch_size, cfg.data.size
        x = torch.empty(b, cfg.model.in_channels, s, s)
        t = torch.zeros(b, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(x, t).float().pow(2).mean().backward()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"flops": counter.get_total_flops(), "grad_bytes": 4 * trained, "params": trained,
            "batch_size": b, "size": s}


def paper_estimate(cost: dict, steps: int, gpus: int = 8, one_gpu_s: float | None = None) -> dict:
    """Seconds per step on 1 and ``gpus`` GPUs of one node from a :func:`step_cost`, under the module's
    assumptions; the all-reduce is a ring (``2(n−1)/n`` of the gradient bytes through each link),
    counted once unoverlapped (upper bound) and fully hidden behind the backward (lower bound).
    ``one_gpu_s``: a step of the config measured on one GPU (``bench loop``'s bare step there), which
    replaces the assumed utilisation; each of ``gpus`` GPUs is then taken to do 1/gpus of it."""
    one = one_gpu_s if one_gpu_s is not None else cost["flops"] / (GPU_PEAK_TFLOPS * 1e12 * GPU_UTILISATION)
    compute = one / gpus
    comm = 2 * (gpus - 1) / gpus * cost["grad_bytes"] / (NVLINK_BUS_GBPS * 1e9)
    return {"gpus": gpus, "one_gpu_s": one, "measured": one_gpu_s is not None,
            "utilisation": cost["flops"] / one / (GPU_PEAK_TFLOPS * 1e12), "compute_s": compute, "allreduce_s": comm,
            "step_s": (max(compute, comm), compute + comm),
            "speedup": (one / (compute + comm), one / max(compute, comm)),
            "hours_one": one * steps / 3600, "hours": ((max(compute, comm)) * steps / 3600, (compute + comm) * steps / 3600)}


def bench_ddp(cfg: RunConfig, pretrain_args: list[str], steps: int = 30, processes: tuple[int, ...] = (1, 2)) -> dict:
    """Throughput of ``labeldiff pretrain PRETRAIN_ARGS --steps STEPS`` under torchrun for each process
    count (1 thread each; the first log window, with the start-up, not counted), and the all-reduce."""
    from labeldiff.bench.efficiency import real_step_seconds

    rows = []
    for n in processes:
        with tempfile.TemporaryDirectory(prefix="labeldiff-bench-ddp-") as tmp:
            t0 = time.perf_counter()
            torchrun(n, ["labeldiff.cli", "pretrain", *pretrain_args, "--steps", str(steps), "--out", f"{tmp}/run"])
            wall = time.perf_counter() - t0
            per_step = statistics.fmean(real_step_seconds(Path(tmp) / "run" / "log.jsonl", cfg.train.batch_size)[1:])
        rows.append({"processes": n, "step_s": per_step, "images_per_s": cfg.train.batch_size / per_step,
                     "wall_s": wall})
    cost = step_cost(cfg)
    reduce_s = allreduce_seconds(cost["params"], processes=2)
    for r in rows:
        r["allreduce_share"] = reduce_s / r["step_s"] if r["processes"] > 1 else 0.0
    return {"rows": rows, "allreduce_s": reduce_s, "cost": cost, "steps": steps}


def format_ddp(result: dict, title: str) -> str:
    c = result["cost"]
    lines = [title, f"{result['steps']} steps of global batch {c['batch_size']} at {c['size']}², "
                    f"{c['params'] / 1e6:.2f}M trained parameters ({c['grad_bytes'] / 1e6:.1f} MB of float32 gradient), "
                    f"1 thread per process", "",
             "| processes | step | images/s | wall (with start-up) | all-reduce share of a step |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        share = f"{100 * r['allreduce_share']:.1f} %" if r["processes"] > 1 else "–"
        lines.append(f"| {r['processes']} | {r['step_s']:.3f} s | {r['images_per_s']:.2f} | {r['wall_s']:.0f} s | {share} |")
    lines.append(f"\ngloo all-reduce of the gradient over 2 processes: {1000 * result['allreduce_s']:.1f} ms (median)")
    return "\n".join(lines)


def format_estimate(cost: dict, est: dict, steps: int, title: str) -> str:
    lo, hi = est["step_s"]
    if est.get("measured"):
        basis = (f"measured: {1000 * est['one_gpu_s']:.1f} ms for a step on one GPU, {100 * est['utilisation']:.1f} % "
                 f"of {GPU_PEAK_TFLOPS:.0f} TFLOP/s bf16; assumed: each of {est['gpus']} GPUs does 1/{est['gpus']} "
                 f"of it, ")
    else:
        basis = f"assumed: {GPU_PEAK_TFLOPS:.0f} TFLOP/s bf16 peak per GPU at {100 * GPU_UTILISATION:.0f} % utilisation, "
    return "\n".join([
        title,
        f"one step (batch {cost['batch_size']} at {cost['size']}², forward + backward): {cost['flops'] / 1e12:.2f} TFLOP "
        f"counted; gradient {cost['grad_bytes'] / 1e6:.0f} MB float32",
        basis + f"all-reduce bus bandwidth {NVLINK_BUS_GBPS:.0f} GB/s (NVLink, one node)",
        f"1 GPU: {1000 * est['one_gpu_s']:.1f} ms/step, {est['hours_one']:.1f} h for {steps} steps",
        f"{est['gpus']} GPUs (batch {cost['batch_size'] / est['gpus']:g} each): compute {1000 * est['compute_s']:.1f} ms + "
        f"all-reduce {1000 * est['allreduce_s']:.1f} ms → {1000 * lo:.1f}–{1000 * hi:.1f} ms/step "
        f"(hidden behind the backward … not at all), speed-up {est['speedup'][0]:.1f}–{est['speedup'][1]:.1f}×, "
        f"{est['hours'][0]:.1f}–{est['hours'][1]:.1f} h"])


def _allreduce_main(numel: int, repeats: int, out: str) -> None:
    """One torchrun rank of :func:`allreduce_seconds`: all-reduce ``numel`` float32 values ``repeats``
    times (after one warm-up), check the sum, and on rank 0 write the median time to ``out``."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.full((numel,), float(rank + 1))
    dist.all_reduce(x)
    times = []
    for _ in range(repeats):
        x.fill_(float(rank + 1))
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - t0)
    expected = world * (world + 1) / 2
    if not torch.all(x == expected):
        raise RuntimeError(f"all-reduce gave {x[:3].tolist()}…, expected {expected}")
    if rank == 0:
        Path(out).write_text(json.dumps({"median_s": statistics.median(times), "world": world, "numel": numel}))
    dist.destroy_process_group()


if __name__ == "__main__":
    _allreduce_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
