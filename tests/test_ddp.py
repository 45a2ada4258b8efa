"""torchrun + DistributedDataParallel on the CPU (gloo): 2 processes with the same global batch train
what 1 process trains, a 2-process run resumes on 1, and only rank 0 writes the run folder."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from labeldiff.bench.ddp import torchrun as launch
from labeldiff.checkpoint import load_weights
from labeldiff.cli import main

# float summation order: DDP averages two shards' gradients where one process sums one batch. Losses agree
# to 1e-5 (relative); a weight to 1e-3, because Adam moves a weight by up to ~lr per step whatever the
# gradient's size, so a gradient component near zero whose rounding differs can move it by a fraction of lr
# (5e-4 pretraining, 1e-3 fine-tuning here) at each of the 6 steps: measured up to 2.6e-4.
TOL = 1e-5
WEIGHT_TOL = 1e-3
COMMON = ["--size", "16", "--batch-size", "4", "--precision", "fp32", "--device", "cpu", "--channels", "3",
          "--unet-channels", "8,16", "--attention", "0,0", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "tiny.yaml"  # a constant rate after warm-up: a resumed run that
    path.write_text("model:\n  num_head_channels: 8\ntrain:\n  warmup_steps: 1\n  log_every: 1\n"  # extends
                    "  lr_final_ratio: 1.0\n  ema_decay: 0.9\ntransfer:\n  head_hidden: 8\n")  # equals the long one
    return path


def torchrun(n: int, args: list[str]) -> subprocess.CompletedProcess:
    """``labeldiff ARGS`` under torchrun with n processes of 1 thread (the benchmark's launcher)."""
    return launch(n, ["labeldiff.cli", *args])


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]


def same_run(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb]  # one log line per step: one writer
    for (step, x), (_, y) in zip(la, lb):
        assert abs(x - y) <= TOL * max(1.0, abs(x)), (step, x, y)
    wa, wb = load_weights(a / "model.safetensors"), load_weights(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=WEIGHT_TOL, rtol=0)


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_two_processes_train_what_one_trains_and_resume_on_one(command, labeled_dataset, recipe, tmp_path):
    """pretrain (DDPM) and finetune (full fine-tuning of a supervised source, keeping its head: a network
    with GroupNorm only; the new head's BatchNorm is per process on the CPU, tested below)."""
    extra = []
    if command == "finetune":
        source = tmp_path / "source"
        assert main(["pretrain", "--method", "supervised", "--data", str(labeled_dataset), "--recipe", str(recipe),
                     *COMMON, "--steps", "2", "--out", str(source)]) == 0
        extra = ["--pretrained", str(source), "--keep-head", "1", "--labels", "4"]
    base = [command, "--data", str(labeled_dataset), "--recipe", str(recipe), *COMMON, *extra]
    one, two, half = tmp_path / "one", tmp_path / "two", tmp_path / "half"
    assert main([*base, "--steps", "6", "--out", str(one)]) == 0
    out = torchrun(2, [*base, "--steps", "6", "--out", str(two)])
    same_run(one, two)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert "Traceback" not in out.stderr
    torchrun(2, [*base, "--steps", "4", "--out", str(half)])  # 2 processes, then resumed and extended on 1
    assert main([*base, "--steps", "6", "--out", str(half), "--resume"]) == 0
    same_run(one, half)


def test_the_global_batch_must_split_over_the_processes(labeled_dataset, recipe, tmp_path, monkeypatch, capsys):
    """With 2 processes (the world size every rank sees under torchrun), batch 3 is refused in one line
    before the run folder exists. (No torchrun here: the refusal is the same code on every rank.)"""
    from labeldiff import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    out = tmp_path / "odd"
    assert main(["pretrain", "--data", str(labeled_dataset), "--recipe", str(recipe), *COMMON[:2], "--batch-size",
                 "3", *COMMON[4:], "--steps", "2", "--out", str(out)]) == 2
    assert "--batch-size 3 does not split over 2 processes" in capsys.readouterr().err and not out.exists()


def test_batchnorm_on_the_cpu_is_per_process_close_to_one_process(labeled_dataset, recipe, tmp_path):
    """The new segmentation head's BatchNorm sees each process's half of the batch under gloo (no
    SyncBatchNorm on the CPU): the losses are close to one process's, not equal."""
    base = ["finetune", "--data", str(labeled_dataset), "--recipe", str(recipe), *COMMON, "--strategy", "scratch",
            "--labels", "4", "--steps", "4"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    torchrun(2, [*base, "--out", str(tmp_path / "two")])
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b]
    gaps = [abs(x - y) / x for (_, x), (_, y) in zip(a, b)]
    assert max(gaps) < 0.05 and max(gaps) > TOL, gaps


def test_a_shards_draws_are_its_rows_of_the_global_batchs(monkeypatch):
    """Inside sharded(), rank r of n draws for the global batch and keeps rows r·b … (r+1)·b: the noise
    of its images is the noise one process gives them. Without a batch axis nothing is sliced."""
    from labeldiff import runtime

    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    whole = runtime.randn((4, 2, 3), g()), runtime.randint(0, 1000, (4,), g()), runtime.rand((4, 5), g())
    for r in (0, 1):
        monkeypatch.setattr(runtime, "SHARD", (r, 2))
        part = runtime.randn((2, 2, 3), g()), runtime.randint(0, 1000, (2,), g()), runtime.rand((2, 5), g())
        for w, p in zip(whole, part):
            torch.testing.assert_close(p, w[2 * r:2 * r + 2], rtol=0, atol=0)
    from labeldiff import distributed

    assert distributed.shard({"image": torch.arange(4)})["image"].tolist() == [0, 1, 2, 3]  # one process: all


def test_gradient_accumulation_computes_the_same_step(labeled_dataset, recipe, tmp_path, capsys):
    """--grad-accum 2 computes each batch of 4 as 2 micro-batches of 2 (with their rows of the global
    batch's noise): the losses and weights of one pass; a batch that does not split is refused."""
    base = ["pretrain", "--data", str(labeled_dataset), "--recipe", str(recipe), *COMMON, "--steps", "4"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    assert main([*base, "--grad-accum", "2", "--out", str(tmp_path / "acc")]) == 0
    same_run(tmp_path / "one", tmp_path / "acc")
    assert main([*base, "--grad-accum", "3", "--out", str(tmp_path / "odd")]) == 2
    assert "does not split over --grad-accum 3 micro-batches" in capsys.readouterr().err and not (tmp_path / "odd").exists()


def test_the_probe_under_two_processes_is_the_one_process_probe(labeled_dataset, recipe, tmp_path):
    """finetune --strategy probe under torchrun: rank r computes the features of images r, r + 2, … and
    trains members r, r + 2, …; the saved ensemble is the one-process ensemble, bit for bit (each image
    and each member is computed by one process with one thread in both runs), and the shared cache is
    gone from the run folder."""
    pre = tmp_path / "pre"
    assert main(["pretrain", "--data", str(labeled_dataset), "--recipe", str(recipe), *COMMON, "--steps", "2",
                 "--out", str(pre)]) == 0
    base = ["finetune", "--strategy", "probe", "--pretrained", str(pre), "--data", str(labeled_dataset),
            "--labels", "3", "--members", "3", "--probe-stop-iters", "1", "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process
    try:
        assert main([*base, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    torchrun(2, [*base, "--out", str(tmp_path / "two")])
    one, two = load_weights(tmp_path / "one" / "probe.safetensors"), load_weights(tmp_path / "two" / "probe.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    labeled = [json.loads((tmp_path / r / "labeled.json").read_text()) for r in ("one", "two")]
    assert labeled[0]["member_epochs"] == labeled[1]["member_epochs"] and all(labeled[0]["member_epochs"])
    assert (tmp_path / "one" / "log.jsonl").read_text() == (tmp_path / "two" / "log.jsonl").read_text()
