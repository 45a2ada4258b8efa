"""Where and how tensors run: device, autocast precision, threads and random generators.

Everything that runs on the model's device stays there. Random numbers come from a
:func:`generator` on that device where the device has one (CPU, CUDA) and are drawn with
:func:`randn` / :func:`rand` / :func:`randint`, which return them on the device asked for.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import torch
from labeldiff.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
INFERENCE_PRECISION = "fp32"  # evaluate / predict / study evaluation: the same numbers on every CPU


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` → CUDA when present, else the CPU; anything else as torch names it."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def memory_bytes(device: torch.device) -> int | None:
    """The memory a step on ``device`` can use at most: the GPU's, or the machine's RAM; None if unknown."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        import os

        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bf16 in hardware (AMX or AVX512-BF16); reads /proc/cpuinfo by default.

    Without it bf16 autocast is emulated and several times slower than fp32.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return "amx_bf16" in cpuinfo or "avx512_bf16" in cpuinfo


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32. ``auto``: bf16 on CUDA and on CPUs with AMX/AVX512-BF16.
    ``fp16`` is for GPUs without bf16 (V100, T4); training with it scales the loss (:func:`grad_scaler`)."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if name != "auto":
        raise ConfigError(f"precision {name!r} is unknown; use {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else None
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` on ``device`` with ``dtype``, or a disabled one for fp32 (``dtype=None``)."""
    return torch.autocast(device.type if device.type in ("cpu", "cuda") else "cpu",
                          dtype=dtype or torch.float32, enabled=dtype is not None)


def precision_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(dtype, "fp32")


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> "torch.amp.GradScaler":
    """A gradient scaler, enabled for fp16 autocast only (fp16's range needs the loss scaled so small
    gradients do not flush to zero; a step whose gradients overflow is skipped and the scale halved).
    Disabled, it passes the loss and the optimizer step through unchanged."""
    return torch.amp.GradScaler(device.type if device.type in ("cpu", "cuda") else "cpu",
                                enabled=dtype == torch.float16)


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with ``seed`` on ``device`` where that device has generators (CPU, CUDA),
    else on the CPU (e.g. the ``meta`` device, which the device-mismatch tests run on)."""
    device = torch.device(device)
    on = device if device.type == "cuda" else torch.device("cpu")
    return torch.Generator(device=on).manual_seed(int(seed))


SHARD = (0, 1)  # (rank, world size) inside labeldiff.distributed.sharded(); draws are then for the global batch


def _draw(make, shape) -> torch.Tensor:
    """``make(shape)``, or under a shard the rows of this rank from ``make`` of the global batch's shape."""
    r, n = SHARD
    shape = tuple(shape)
    if n == 1 or not shape:
        return make(shape)
    return make((shape[0] * n, *shape[1:]))[r * shape[0]:(r + 1) * shape[0]]


def randn(shape, g: torch.Generator, device: torch.device | str | None = None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal numbers drawn by ``g`` (on its device), returned on ``device`` (default: ``g``'s)."""
    x = _draw(lambda s: torch.randn(s, generator=g, device=g.device, dtype=dtype), shape)
    return x if device is None else x.to(device)


def rand(shape, g: torch.Generator, device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn by ``g``, returned on ``device``."""
    x = _draw(lambda s: torch.rand(s, generator=g, device=g.device), shape)
    return x if device is None else x.to(device)


def randint(low: int, high: int, shape, g: torch.Generator, device: torch.device | str | None = None) -> torch.Tensor:
    """Integers in [low, high) drawn by ``g``, returned on ``device``."""
    x = _draw(lambda s: torch.randint(low, high, s, generator=g, device=g.device), shape)
    return x if device is None else x.to(device)


def threads_summary() -> str:
    """``"2 threads"``: what torch computes with on the CPU (``OMP_NUM_THREADS`` / ``torch.set_num_threads``)."""
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n != 1 else ''}"


def compute_summary(device: torch.device, precision: str) -> str:
    """``"cpu, bf16 autocast (--precision auto), 2 threads"``: where and how a run trains, as it starts."""
    how = precision_name(resolve_precision(precision, device))
    return f"{device}, {how}{f' (--precision {precision})' if precision == 'auto' else ''}, {threads_summary()}"
