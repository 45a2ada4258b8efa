"""Cost before commitment: every training command says, before its second step, what its steps will take
on this machine (from its first step, timed), with the device, precision and threads it trains with; a
study's --dry-run times each network once and says what is left. Not timing tests: the estimate must be
printed, positive and of the right order of magnitude against the run's measured time."""
from __future__ import annotations

import re
import time
from types import SimpleNamespace

import pytest

import labeldiff.pretrain.loop as loop
import labeldiff.pretrain.run as pretrain_run
from labeldiff.cli import main
from labeldiff.pretrain.cost import StepClock, duration, estimate

from conftest import write_labeled_dataset, write_tiny_study

TINY = ["--size", "16", "--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--channels", "3",
        "--unet-channels", "8,16", "--attention", "0,0", "--head-channels", "8", "--checkpoint-every", "100"]
ESTIMATE = re.compile(r"≈ ([\d.]+) (s|min|h) for (\d+) steps? \(")


def seconds(match: re.Match) -> float:
    return float(match.group(1)) * {"s": 1, "min": 60, "h": 3600}[match.group(2)]


def test_duration_and_estimate_read_as_a_person_says_them():
    assert duration(0.26) == "0.3 s" and duration(45) == "45 s" and duration(600) == "10.0 min"
    assert duration(3 * 3600) == "3.0 h" and duration(None) == "unknown"
    assert estimate(0.5, 300) == "≈ 2.5 min for 300 steps (500 ms a step)"


def test_step_clock_estimates_after_the_first_step_and_corrects_a_slow_start():
    lines: list[str] = []
    clock = StepClock(100, "pretrain ddpm", say=lines.append)
    clock.step_done(2.0)
    assert len(lines) == 1 and "≈ 3.3 min for 100 steps" in lines[0] and "the first step, timed" in lines[0]
    clock.step_done(0.5)  # four times as fast: the first step was start-up
    assert len(lines) == 2 and "≈ 50 s for 100 steps" in lines[1] and "the second step" in lines[1]
    for _ in range(8):
        clock.step_done(0.5)
    assert len(lines) == 2  # steps 2–10 kept the pace of the last estimate: nothing more to say
    steady: list[str] = []
    clock = StepClock(100, "x", say=steady.append)
    clock.step_done(1.0)
    clock.step_done(0.9)
    assert len(steady) == 1  # no correction when the second step is like the first
    for _ in range(8):
        clock.step_done(0.3)  # the first steps were decoding images: the pace is 3× the estimate's
    assert len(steady) == 2 and "≈ 37 s for 100 steps (367 ms a step): steps 2–10, timed" in steady[1]
    assert not clock.watching
    for pace, said_again in ((0.85, False), (0.75, True)):  # the threshold: more than 1.25× off the estimate
        lines = []
        clock = StepClock(100, "x", say=lines.append)
        for _ in range(10):
            clock.step_done(1.0 if not lines else pace)
        assert (len(lines) == 2) is said_again, (pace, lines)


@pytest.mark.slow
def test_pretrain_and_finetune_say_what_their_steps_cost_before_the_second_step(tmp_path, capsys, monkeypatch):
    """The estimate line is out before the second step's loss is computed; it names the device, the
    precision and the threads; the estimate is the first step's time × the steps. The loop's clock is a
    fake one that advances 0.25 s per reading, so the figure does not depend on how busy the machine is."""
    data = write_labeled_dataset(tmp_path / "data", n=6, k=3)
    real = pretrain_run.pretext_loss
    seen_before_step_2: list[str] = []

    def watching(corruption):
        fn, calls = real(corruption), [0]

        def loss(model, batch, g):
            calls[0] += 1
            if calls[0] == 2:
                seen_before_step_2.append(capsys.readouterr().out)
            return fn(model, batch, g)
        return loss

    readings = iter(range(10**6))
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: 0.25 * next(readings), time=time.time))
    monkeypatch.setattr(pretrain_run, "pretext_loss", watching)
    steps = 30
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "pre"), "--steps", str(steps), *TINY]) == 0
    monkeypatch.setattr(pretrain_run, "pretext_loss", real)
    before = seen_before_step_2[0]
    assert "on cpu, fp32, 1 thread" in before  # the device, precision and threads, as it starts (conftest: 1 thread)
    found = ESTIMATE.search(before)
    assert found and int(found.group(3)) == steps and "the first step, timed" in before
    assert seconds(found) == pytest.approx(0.25 * steps)

    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "ft"), "--pretrained", str(tmp_path / "pre"),
                 "--labels", "2", "--steps", str(steps), "--head-hidden", "8", "--size", "16", "--batch-size", "2",
                 "--precision", "fp32", "--device", "cpu", "--checkpoint-every", "100"]) == 0
    out = capsys.readouterr().out
    assert "of batch 2 on cpu, fp32, 1 thread" in out
    found = ESTIMATE.search(out)
    assert found and int(found.group(3)) == steps and seconds(found) == pytest.approx(0.25 * steps)
    assert len(ESTIMATE.findall(out)) == 1  # every step took as long as the first: no correction


@pytest.mark.slow
def test_the_probe_says_what_its_features_and_members_cost(tmp_path, capsys):
    data = write_labeled_dataset(tmp_path / "data", n=6, k=3)
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "pre"), "--steps", "2", *TINY]) == 0
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "probe"), "--pretrained",
                 str(tmp_path / "pre"), "--strategy", "probe", "--labels", "2", "--members", "2", "--size", "16",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "MLPs on the CPU, in fp32, with 1 thread" in out
    assert re.search(r"probe: features of image 1 took [\d.]+ s → ≈ [\d.]+ s for the 2 images", out)
    assert re.search(r"probe: member 1 took [\d.]+ s \(\d+ epochs\) → ≈ [\d.]+ s for the other 1", out)


@pytest.mark.slow
def test_study_dry_run_times_each_network_once_and_says_what_is_left(tmp_path, capsys):
    """--dry-run prints ≈ per pretraining run and per cell, trains and writes nothing; the pretraining
    estimate is the right order of magnitude against the run the study then trains."""
    root = tmp_path
    write_tiny_study(root, pretrain_steps=40, finetune_steps=3, strategies=["full", "lp-ft", "probe", "scratch"],
                     labels=[1, 2], finetune={"recipe": "ft.yaml", "overrides": {"transfer.lp_steps": 2}})
    out = root / "out"
    assert main(["study", str(root / "s.yaml"), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not (out / "pretrain").exists() and not (out / "cells").exists()
    assert "time left, ≈, on this machine" in text and "the second of two calibration steps" in text
    pre_line = re.search(r"pretraining ddpm: ≈ ([\d.]+) (s|min|h) for 40 steps \(", text)
    assert pre_line and seconds(pre_line) > 0
    evaluation = r", evaluation [\d.]+ s \([\d.]+ ms an image\)"  # the test images, timed as evaluation predicts
    assert re.search(r"cells ddpm full: 2 to run × ≈ [\d.]+ s each \(3 steps, [\d.]+ ms a step, fp32" + evaluation +
                     r"\)", text)
    assert re.search(r"cells ddpm lp-ft: 2 to run × ≈ [\d.]+ s each \(5 steps, [\d.]+ ms a step \(linear\), "
                     r"[\d.]+ ms a step \(lp-ft\), fp32" + evaluation + r"\)", text)
    assert "cells ddpm probe: 2 to run, not estimated (a probe's MLPs stop on their own loss)" in text
    assert re.search(r"cells none scratch: 2 to run", text) and re.search(r"total ≈ [\d.]+ (s|min) of training steps and evaluation of the \d+ test images per cell", text)
    assert main(["study", str(root / "s.yaml"), "--out", str(out), "--pretrain-only"]) == 0
    import json

    took = json.loads(next((out / "pretrain").glob("ddpm-*/study_timing.json")).read_text())["seconds"]
    assert took / 10 < seconds(pre_line) < 10 * took
    capsys.readouterr()
    assert main(["study", str(root / "s.yaml"), "--out", str(out), "--dry-run"]) == 0
    assert "pretraining ddpm" not in capsys.readouterr().out  # finished: nothing left to estimate
