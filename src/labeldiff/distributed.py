"""Several processes on PyTorch's own engine: ``torchrun`` + ``DistributedDataParallel``.

``torchrun --nproc-per-node N labeldiff pretrain …`` (and ``finetune``) starts N copies of the command;
torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` and its rendezvous flags join several nodes.
:func:`setup` joins the process group (gloo on the CPU, nccl on CUDA, one GPU per local rank). What
stays the same whatever the number of processes:

- **The global batch.** Every rank builds the batch of ``(seed, step)`` that one process would
  (``StepBatches``) and keeps its slice (:func:`shard`): rank r of N takes rows ``r·B/N … (r+1)·B/N``.
  The corruption's random numbers are drawn for the global batch too and sliced the same way
  (:func:`labeldiff.runtime.randn` under :func:`sharded`), so 1 process with batch 16 and 2 with 8
  each train on the same images with the same noise; DDP averages the gradients, so the update is the
  one-process update (up to float summation order).
- **One writer.** Only rank 0 writes the run folder (config, log, checkpoints, weights); every rank
  resumes from it, so a run started on N processes resumes on M.
- **BatchNorm** is synchronised on CUDA only (:func:`wrap`).
- **Agreement.** The logged loss is the global batch's (an all-reduce), so a non-finite loss on any
  rank stops every rank with the same message before the backward pass, and a Ctrl-C on any rank
  stops all of them at the end of the same step.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from labeldiff.errors import ConfigError


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True in a single process and on rank 0: the one process that writes."""
    return rank() == 0


def launch_rank() -> int:
    """This process's torchrun rank before the process group is joined (``RANK``; 0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group once (gloo on the CPU, nccl on CUDA) and return this rank's device
    (``cuda:LOCAL_RANK`` on GPUs). Without torchrun it returns ``device`` and does nothing."""
    if not launched():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def check_batch(batch_size: int, accum: int = 1) -> None:
    """The global batch must split evenly over the processes and their micro-batches."""
    n = world_size() * accum
    if batch_size % n:
        what = " × ".join(([f"{world_size()} processes"] if world_size() > 1 else []) +
                          ([f"--grad-accum {accum} micro-batches"] if accum > 1 else []))
        raise ConfigError(f"--batch-size {batch_size} does not split over {what}; the batch is global "
                         f"(each part takes batch/{n}): use a multiple of {n}")


def parts(accum: int = 1) -> list[tuple[int, int]]:
    """``(index, count)`` of this rank's parts of the global batch, one per micro-batch: rank r of N with
    A micro-batches computes parts r·A … r·A + A − 1 of N·A."""
    n = world_size() * accum
    return [(rank() * accum + j, n) for j in range(accum)]


def shard(batch: dict[str, torch.Tensor], part: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Part ``(index, count)`` of the global batch, consecutive rows (default: this rank's share)."""
    i, n = part if part is not None else (rank(), world_size())
    if n == 1:
        return batch
    return {k: v[i * (len(v) // n):(i + 1) * (len(v) // n)] for k, v in batch.items()}


@contextmanager
def sharded(part: tuple[int, int] | None = None):
    """Random draws with a batch as first axis (``labeldiff.runtime.randn`` / ``rand`` / ``randint``)
    are made for the global batch and sliced to the rows of ``part`` (default: this rank's), inside
    this block."""
    from labeldiff import runtime

    old = runtime.SHARD
    runtime.SHARD = part if part is not None else (rank(), world_size())
    try:
        yield
    finally:
        runtime.SHARD = old


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a scalar (the global batch's loss from each rank's shard loss); a NaN on
    any rank makes it NaN on all."""
    if world_size() == 1:
        return x.detach()
    y = x.detach().float().clone().reshape(1)
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return (y / world_size())[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (a Ctrl-C seen by one process stops all at the same step)."""
    if world_size() == 1:
        return flag
    y = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return bool(y.item() > 0)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel`` when several processes run (gradients averaged over the
    ranks in the backward pass), else itself. Parameters frozen with ``requires_grad=False`` are
    left out; parameters a strategy trains but the forward pass never uses are allowed.

    BatchNorm (the segmentation head's, a trained EfficientNet encoder's) normalises over the batch:
    on CUDA its layers become ``SyncBatchNorm`` (in place: the same parameters), so the statistics are
    the global batch's, as in one process. PyTorch has no SyncBatchNorm on the CPU, so under gloo each
    process normalises over its own shard: close to the one-process run, not equal (docs/guides/distributed.md)."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        assert converted is model, "the network's top module is not a BatchNorm: converted in place"

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)
