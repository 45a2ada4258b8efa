"""kill -9 loses nothing: ``pretrain`` killed with SIGKILL at random points (one of them inside a checkpoint
write) and resumed ends with exactly the losses and weights of an uninterrupted run."""
from __future__ import annotations

import pytest

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from labeldiff.checkpoint import damage, load_checkpoint, load_weights
from labeldiff.cli import main

STEPS = 24
ARGS = ["--size", "16", "--steps", str(STEPS), "--batch-size", "2", "--precision", "fp32", "--device", "cpu",
        "--channels", "3", "--checkpoint-every", "1", "--unet-channels", "8,16", "--attention", "0,0"]


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)  # a torn line would fail here: resume must have trimmed it
        out[rec["step"]] = rec["loss"]
    return out


def logged_steps(run: Path) -> int:
    try:
        lines = (run / "log.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return len(lines)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; False when it finished first."""
    t0 = time.time()
    while proc.poll() is None:
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if time.time() - t0 > timeout:
            proc.kill()
            raise TimeoutError("pretrain did not get going")
        time.sleep(0.002)
    return False


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tmp_path, labeled_dataset):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("model:\n  num_head_channels: 8\ntrain:\n  warmup_steps: 1\n  log_every: 1\n  ema_decay: 0.9\n")
    ref, run = tmp_path / "ref", tmp_path / "run"
    base = ["pretrain", "--data", str(labeled_dataset), *ARGS, "--recipe", str(recipe)]
    assert main([*base, "--out", str(ref)]) == 0  # the uninterrupted run, in this process

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "labeldiff.cli", *base, "--out", str(run)]
    rng = random.Random(0)
    kills = []
    # kill 1: inside a checkpoint write (its temporary folder exists); kills 2-3: after a random step
    conditions = [lambda: any(p.name.endswith(".tmp") for p in (run / "checkpoints").glob("step_*"))
                  if (run / "checkpoints").is_dir() else False]
    for _ in range(2):
        target = rng.randint(3, STEPS - 3)
        conditions.append(lambda target=target: logged_steps(run) >= target)
    for ready in conditions:
        proc = subprocess.Popen(cmd + (["--resume"] if run.exists() else []), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not kill_when(proc, ready):
            break
        kills.append(proc.returncode)
        if (run / "latest.json").is_file():  # what a resume would read is whole
            info = json.loads((run / "latest.json").read_text())
            assert damage(run / info["dir"]) is None
            assert load_checkpoint(run)["step"] == info["step"]
    assert kills == [-signal.SIGKILL] * 3
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    a, b = losses(ref), losses(run)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    wa, wb = load_weights(ref / "model.safetensors"), load_weights(run / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
