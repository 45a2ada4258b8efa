"""The one training loop, shared by pretraining and transfer.

AdamW/Adam with linear warm-up and linear decay, optional EMA of the weights, gradient
clipping, optional bf16 or fp16 autocast (fp16 with a gradient scaler), channels-last and
torch.compile as opt-ins, a non-finite-loss guard, JSONL logging, atomic checkpoints
and exact resume (a batch depends only on (seed, step); see ``StepBatches``).
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from labeldiff import distributed, tracking
from labeldiff.checkpoint import load_checkpoint, rename_weights, save_checkpoint, save_weights
from labeldiff.config import RunConfig, TrainConfig
from labeldiff.pretrain.cost import StepClock
from labeldiff.data.datasets import StepBatches, step_loader
from labeldiff.errors import ConfigError, NonFiniteError
from labeldiff.runtime import autocast, generator, grad_scaler, resolve_precision

LossFn = Callable[[torch.nn.Module, dict, torch.Generator], torch.Tensor]


class NonFiniteLossError(NonFiniteError):
    """The loss became NaN or infinite: training stops before the backward pass of that step."""


def trim_log(path: Path, step: int) -> None:
    """Keep the log records of steps ≤ ``step`` (the checkpoint a resume starts from): the steps after it
    are trained again, and a process killed mid-write may have left a torn last line."""
    if not path.is_file():
        return
    from labeldiff.checkpoint import atomic_write_text

    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{ln}\n" for ln in kept))


class DeferredInterrupt:
    """Ctrl-C (SIGINT) during a step is remembered and raised at the end of that step, so the weights, the
    optimizer and the EMA a checkpoint saves are always those of its step number (an interrupt between
    ``optimizer.step()`` and the step counter once saved a step's update under the previous number, and
    a resume applied it twice). A second Ctrl-C interrupts at once. Outside the main thread (where signal
    handlers cannot be set) it does nothing."""

    def __init__(self):
        self.hit = False
        self.previous = None

    def __enter__(self) -> "DeferredInterrupt":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then decay to ``lr_final_ratio``: linear, or along half a
    cosine (``lr_schedule: cosine``)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.lr_schedule == "cosine":
        frac = (1.0 - math.cos(math.pi * frac)) / 2.0
    return 1.0 - (1.0 - cfg.lr_final_ratio) * frac


class EMA:
    """Exponential moving average of parameters and buffers (float tensors), warm-started."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                      for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """avg ← d·avg + (1 − d)·current for float tensors (in a few fused kernels: a GPU would otherwise
        launch two per tensor), a copy for the others."""
        d = min(self.decay, (1 + step) / (10 + step))
        floats, current = [], []
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                floats.append(self.state[k])
                current.append(v.detach().float())
            else:
                self.state[k].copy_(v)
        torch._foreach_mul_(floats, d)
        torch._foreach_add_(floats, current, alpha=1 - d)


def extend_config(run_dir: Path, config: RunConfig, start: int) -> None:
    """On resume: a longer ``train.steps`` than the run was started with extends it (recorded in
    ``config.extended`` and ``config.json``); a length below the checkpoint's step is an error.

    The schedule (:func:`lr_factor`) is spread over the new length, so a run whose learning rate decays
    (``lr_final_ratio < 1``) warms back up at the step it is extended from; with a constant rate after
    warm-up the extended run is the run that would have been trained at the new length from the start.
    """
    from labeldiff.runs import RunFolder

    saved = RunFolder.open(run_dir, flag="--resume").config
    steps, was = config.train.steps, saved.train.steps
    if steps < start:
        raise ConfigError(f"{run_dir} is at step {start}, past --steps {steps}; give --steps {start} or more "
                         f"(or use its model.safetensors as it is)")
    extended = list(saved.extended or [])
    if steps != was:
        extended.append({"at_step": start, "from_steps": was, "to_steps": steps})
        before, after = lr_factor(max(start - 1, 0), saved.train), lr_factor(start, config.train)
        print(f"extending {run_dir} from {was} to {steps} steps at step {start}: learning rate "
              f"×{before:.3f} → ×{after:.3f} of the base (the schedule is spread over {steps} steps)")
        weights = run_dir / "model.safetensors"
        distributed.barrier()  # every rank has read the saved config before rank 0 rewrites the folder
        if weights.is_file() and distributed.is_main():  # the shorter run's weights stay, under their step
            rename_weights(weights, run_dir / f"model-step{start}.safetensors")
    config.extended = extended or None
    if steps != was and distributed.is_main():
        config.save(run_dir / "config.json")


def train(run_dir: Path, config: RunConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          loss_fn: LossFn, batches: StepBatches, resume: bool = False, desc: str = "train",
          frozen: list[torch.nn.Module] | None = None, stop: Callable[[int, float], bool] | None = None,
          at_checkpoint: Callable[[int, torch.nn.Module], None] | None = None) -> dict:
    """Train ``model`` for ``config.train.steps`` steps, writing everything into ``run_dir``.

    ``frozen`` modules are put in ``eval()`` after every ``model.train()`` so their BatchNorm
    statistics and dropout stay fixed. ``stop(step, loss)``, called after every step, may end the run
    early (fine-tuning's ``steps_rule: plateau``); the step it stopped at is logged. ``at_checkpoint(step,
    weights)`` runs on rank 0 after every checkpoint and at the end, with the weights saved (the EMA's when
    there is one, as a state dict): pretraining's preview samples. Before its second
    step the run prints what its steps will take, from its first step's time
    (:class:`labeldiff.pretrain.cost.StepClock`). Returns
    ``{"step", "loss", "seconds", "stopped"}`` (``stopped``: True when ``stop`` ended it).

    Under torchrun (:mod:`labeldiff.distributed`) each rank trains on its shard of the same global
    batch through ``DistributedDataParallel``; only rank 0 writes into ``run_dir``.
    """
    cfg = config.train
    run_dir = Path(run_dir)
    device = next(model.parameters()).device
    distributed.check_batch(batches.batch_size, cfg.grad_accum)
    main = distributed.is_main()
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net = distributed.wrap(model, device)  # what the loss calls: gradients averaged over the ranks
    if cfg.compile:
        net = torch.compile(net)  # the weights stay model's: checkpoints need no prefix stripping
    autocast_dtype = resolve_precision(cfg.precision, device)
    scaler = grad_scaler(device, autocast_dtype)  # fp16 only; otherwise a pass-through
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    start = 0
    if resume and not (run_dir / "latest.json").is_file():
        print(f"{run_dir} has no checkpoint yet (stopped before the first one): starting at step 0")
        resume = False
    if resume:
        ck = load_checkpoint(run_dir)
        model.load_state_dict(ck["model"], strict=True)
        optimizer.load_state_dict(ck["optimizer"])
        if ema is not None and ck["ema"] is not None:
            ema.state = {k: v.to(device) for k, v in ck["ema"].items()}  # read on the CPU; the model may not be
        torch.set_rng_state(ck["rng"]["torch_cpu"])
        start = ck["step"]
        if stop is not None and hasattr(stop, "load") and "stop" in ck["extra"]:
            stop.load(ck["extra"]["stop"])
        if scaler.is_enabled() and "scaler" in ck["extra"]:
            scaler.load_state_dict(ck["extra"]["scaler"])
        extend_config(run_dir, config, start)
        if main:
            trim_log(run_dir / "log.jsonl", start)
        print(f"resuming {run_dir} at step {start}/{cfg.steps}")
    elif main:
        config.save(run_dir / "config.json")

    def set_train_mode() -> None:
        model.train()
        for m in frozen or []:
            m.eval()

    def extra() -> dict:  # what a checkpoint records besides the tensors: the loss, the stop rule, the fp16 scale
        return {"loss": loss_value, **({"stop": stop.state()} if hasattr(stop, "state") else {}),
                **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {})}

    set_train_mode()
    log = open(run_dir / "log.jsonl", "a") if main else open(os.devnull, "w")
    tracker = tracking.Tracker(run_dir, cfg.track if main else None, cfg.tracking_uri, resume=resume)
    tracker.params(config.to_dict())
    finished = False
    last_good = start
    loss_value = ck["extra"].get("loss", math.nan) if resume else math.nan
    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=not main)
    tick, tick_step = time.time(), start
    clock = StepClock(cfg.steps - start, desc, say=tqdm.write if main else lambda line: None)
    step = start
    stopped = False
    interrupt = DeferredInterrupt()
    try:
        interrupt.__enter__()
        loader = step_loader(batches, start, cfg.steps, config.data.num_workers, pin_memory=device.type == "cuda")
        began = time.perf_counter()  # a step's time includes waiting for its batch
        for step, batch in zip(range(start, cfg.steps), loader):
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(step, cfg)
            optimizer.zero_grad(set_to_none=True)
            global_loss = 0.0
            for j, part in enumerate(distributed.parts(cfg.grad_accum)):  # this rank's rows, in micro-batches
                micro = {k: v.to(device, non_blocking=True) for k, v in distributed.shard(batch, part).items()}
                if cfg.channels_last and micro["image"].dim() == 4:
                    micro["image"] = micro["image"].contiguous(memory_format=torch.channels_last)
                g = generator(cfg.seed * 7_919 + step, device)  # corruption noise, drawn on the model's device
                with autocast(device, autocast_dtype), distributed.sharded(part):  # the draws: the global
                    loss = loss_fn(net, micro, g) / cfg.grad_accum                # batch's, these rows
                part_loss = distributed.mean_over_ranks(loss)  # every rank agrees on it, before any backward
                if not torch.isfinite(part_loss):
                    where = (f"the last good checkpoint (step {last_good}) is in {run_dir}; " if last_good > 0 else
                             "no checkpoint was written before it; ")
                    raise NonFiniteLossError(
                        f"loss became {part_loss.item() * cfg.grad_accum} at step {step}; {where}lower --lr, raise "
                        f"--warmup-steps, or use --precision fp32, then "
                        f"{'--resume or --overwrite' if last_good > 0 else '--overwrite'}")
                global_loss = global_loss + part_loss
                last = j == cfg.grad_accum - 1  # DDP averages the gradients over the ranks once, on the last
                with (nullcontext() if last or net is model else net.no_sync()):
                    scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)  # clip the true gradients
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)  # fp16: skipped when a gradient overflowed, and the scale is halved
            scaler.update()
            if ema is not None:
                ema.update(model, step)
            loss_value = float(global_loss)
            done = step + 1
            if clock.watching:
                now = time.perf_counter()
                clock.step_done(now - began)
                began = now
            if done % cfg.log_every == 0 or done == cfg.steps:
                now = time.time()
                ips = (done - tick_step) * batches.batch_size / max(now - tick, 1e-9)
                tick, tick_step = now, done
                record = {"step": done, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                          "images_per_s": round(ips, 2)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                tracker.log(done, record)
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{ips:.1f}")
            bar.update(1)
            if stop is not None and done < cfg.steps and stop(done, loss_value):
                stopped = True
                log.write(json.dumps({"step": done, "loss": loss_value, "stopped": "plateau"}) + "\n")
                print(f"\n{desc}: the training loss stopped falling; stopping at step {done} of {cfg.steps}")
                step = done
                break
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                if main:
                    save_checkpoint(run_dir, done, model, optimizer, ema.state if ema else None, extra())
                    tracking.write_progress(run_dir)
                    if at_checkpoint is not None:
                        at_checkpoint(done, ema.state if ema is not None else model.state_dict())
                        set_train_mode()
                last_good = done
            step = done
            if distributed.any_rank(interrupt.hit, device):  # a Ctrl-C during this step (on any rank) stops here,
                raise KeyboardInterrupt                       # with the state of step `done`
        finished = True
    except KeyboardInterrupt:
        bar.close()
        if step > last_good and main:
            save_checkpoint(run_dir, step, model, optimizer, ema.state if ema else None, extra())
        print(f"\ninterrupted: state of step {step} saved in {run_dir}; run the same command with --resume to continue")
        raise
    finally:
        interrupt.__exit__()
        bar.close()
        log.close()
        if not finished:
            tracker.close(finished=False)
    if main:
        if step > start or not resume:  # a resume at the last step only writes the result it lacked
            save_checkpoint(run_dir, step, model, optimizer, ema.state if ema else None, extra())
        final = ema.state if ema is not None else model.state_dict()
        save_weights(final, run_dir / "model.safetensors", metadata={"step": str(step), "ema": str(ema is not None)})
        if at_checkpoint is not None:
            at_checkpoint(step, final)
        for artifact in (tracking.write_progress(run_dir), run_dir / "config.json"):
            if artifact is not None:
                tracker.artifact(artifact)
    tracker.close()
    distributed.barrier()  # the run folder is whole before any rank returns
    return {"step": step, "loss": loss_value, "seconds": time.time() - t0, "stopped": stopped}
