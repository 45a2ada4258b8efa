"""How much of the machine a step uses: the arithmetic counted, the machine's peak measured, their ratio.

- **FLOPs** are counted, not estimated: :func:`count_flops` runs the step once under
  ``torch.utils.flop_counter.FlopCounterMode``, which adds up the floating-point operations of every matrix
  multiply and convolution, forward and backward (2 per multiply–add). Normalisation, activations and the
  optimizer's element-wise updates are not counted; they are memory-bound, and they are the time the
  utilisation does not explain.
- **Peak** is measured on this machine (:func:`measured_peak`): the best of several large square matrix
  multiplies (2048² on a CPU, 8192² on a GPU) in the step's dtype (bf16 where the step autocasts to bf16,
  else fp32), with the same threads. On a GPU the datasheet's dense figure is printed beside it
  (:data:`DATASHEET`), for reference only.
- **Utilisation** = achieved FLOP/s ÷ measured peak, where achieved = counted FLOPs ÷ the step's time.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

# dense (no sparsity) peak of the SXM parts, TFLOP/s, from NVIDIA's datasheets: for reference beside the measured peak
DATASHEET = {"H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}, "H200": {"bf16": 989.0, "fp16": 989.0,
                                                                          "fp32": 67.0},
             "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` (a forward, or a forward + ``backward()``), counted by PyTorch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None,
                  repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` ``n × n`` matrix multiplies in ``dtype`` on ``device`` (after one
    warm-up): what this machine reaches on the best-shaped work there is."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    torch.mm(a, b)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def dtype_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def peak_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the peak is measured in for a step that autocasts to ``dtype`` (None: fp32)."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def datasheet(device: torch.device) -> float | None:
    """The datasheet's dense peak (FLOP/s) for this GPU in bf16, or None (a CPU, an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v["bf16"] * 1e12 for k, v in DATASHEET.items() if k in name), None)


def utilisation(flops: int, seconds: float, peak: float) -> dict:
    """``{"flops", "seconds", "achieved", "peak", "utilisation"}`` of work of ``flops`` done in ``seconds``."""
    achieved = flops / seconds if seconds > 0 else float("nan")
    return {"flops": flops, "seconds": seconds, "achieved": achieved, "peak": peak, "utilisation": achieved / peak}


def top_operators(fn: Callable[[], object], device: torch.device | str = "cpu", n: int = 12) -> str:
    """The ``n`` operators ``fn()`` spends most of its own time in, from ``torch.profiler`` (a table)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()  # warm-up outside the profile
    _sync(device)
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=n)


def tflops(x: float) -> str:
    """FLOP/s (or FLOPs) as a short figure: ``181 GFLOP/s``-style numbers, in G or T."""
    return f"{x / 1e12:.2f} T" if x >= 1e12 else f"{x / 1e9:.1f} G"
