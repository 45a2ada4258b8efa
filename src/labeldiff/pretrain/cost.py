"""What a training run will cost, said before it is paid: a measured step time × the steps planned.

Nothing here guesses from FLOPs or a table: the time of a step is measured on this machine, with the
network, batch, precision and threads the run trains with, and every estimate is printed as ``≈`` with
what it is based on.

- A training run (:func:`labeldiff.pretrain.loop.train`) times its own **first step** and prints the
  estimate before the second (:class:`StepClock`). The first step also pays for start-up (the first
  images decoded, kernels chosen), so that estimate leans high; when the second step is more than twice
  as fast, a corrected estimate follows it.
- A study's ``--dry-run`` trains nothing, so it runs **calibration steps** (:func:`calibrate`): two
  steps of the same network, batch and precision on real batches of the data, with weights that are
  then thrown away; the second step is the figure (the first pays start-up).

Evaluation, checkpoints and data-loading workers are not in these figures.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from labeldiff.runtime import autocast

CALIBRATION_BUDGET_S = 30.0  # a first calibration step slower than this is the figure: no second one


def duration(seconds: float | None) -> str:
    """``"45 s"``, ``"3.2 min"``, ``"2.1 h"``; ``"unknown"`` for None."""
    if seconds is None:
        return "unknown"
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def per_step(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def step_seconds(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[..., torch.Tensor],
                 steps: int, dtype: torch.dtype | None, draw: Callable[[], dict] | None = None) -> list[float]:
    """Seconds of each of ``steps`` bare steps: ``loss_fn(model)`` → backward → ``optimizer.step()``. With
    ``draw``, each step first draws its batch (timed too, outside autocast, as the loop draws it) and the
    loss is ``loss_fn(model, batch)``."""
    device = next(model.parameters()).device
    model.train()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = draw() if draw is not None else None
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = loss_fn(model) if draw is None else loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        loss.item()  # the real loop reads the loss every step too (and on a GPU this waits for it)
        out.append(time.perf_counter() - t0)
    return out


def calibrate(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[torch.nn.Module, dict],
              torch.Tensor], draw: Callable[[], dict], dtype: torch.dtype | None) -> float:
    """Seconds of one training step, its batch drawn by ``draw``: the second of two calibration steps (the
    first pays start-up), or the first alone when it took longer than :data:`CALIBRATION_BUDGET_S`.
    ``model`` and ``optimizer`` are changed: give ones made for this and throw them away."""
    first = step_seconds(model, optimizer, loss_fn, 1, dtype, draw)[0]
    if first > CALIBRATION_BUDGET_S:
        return first
    return step_seconds(model, optimizer, loss_fn, 1, dtype, draw)[0]


def first_item(desc: str, took: float, n: int, what: str) -> str:
    """``"probe: features of image 1 took 1.2 s → ≈ 24 s for the 20 images (…)"``: the time of the first of
    ``n`` like items × ``n``, said after the first (``what``: how the n items are named, and how counted)."""
    return f"{desc}: features of image 1 took {duration(took)} → ≈ {duration(took * n)} for {what}"


def estimate(step_s: float, steps: int) -> str:
    """``"≈ 8.5 min for 300 steps (1.70 s a step)"``."""
    return f"≈ {duration(step_s * steps)} for {steps} step{'s' if steps != 1 else ''} ({per_step(step_s)} a step)"


class StepClock:
    """The estimate a run prints about itself: after its first step (before the second), the time of
    that step × the steps of this session. The first step also pays for start-up (and the first steps for
    decoding images the cache does not hold yet), so the estimate is said again after the second step when
    that one was more than twice as fast, and after the tenth when the mean of steps 2–10 is more than 1.25×
    off the last estimate. ``say``: where the lines go."""

    CHECK_AT = 10  # the step whose mean pace is checked against the estimate

    def __init__(self, steps: int, desc: str, say: Callable[[str], None] = print):
        self.steps, self.desc, self.say = steps, desc, say
        self.times: list[float] = []
        self.said: float | None = None  # the step time of the last estimate printed

    @property
    def watching(self) -> bool:
        return len(self.times) < min(self.CHECK_AT, self.steps)

    def step_done(self, seconds: float) -> None:
        self.times.append(seconds)
        n = len(self.times)
        if n == 1 and self.steps > 1:
            self.said = seconds
            self.say(f"{self.desc}: {estimate(seconds, self.steps)}: the first step, timed (start-up included, "
                     f"so this leans high); the bar's rate follows the run")
        elif n == 2 and self.steps > 2 and seconds < self.times[0] / 2:
            self.said = seconds
            self.say(f"{self.desc}: {estimate(seconds, self.steps)}: the second step, timed (the first, "
                     f"{per_step(self.times[0])}, was start-up)")
        elif n == self.CHECK_AT and self.steps > n and self.said:
            pace = sum(self.times[1:]) / (n - 1)
            if not 1 / 1.25 <= pace / self.said <= 1.25:
                self.said = pace
                self.say(f"{self.desc}: {estimate(pace, self.steps)}: steps 2–{n}, timed")
