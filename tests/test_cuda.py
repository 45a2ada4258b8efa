"""The GPU path on a real GPU. Every test here needs CUDA and is skipped on the CPU machines (CI included);
they ran on the H200 lent to this project (README, "The GPU path", says when and what they gave).

What a CPU cannot show: autocast and the gradient scaler on CUDA kernels, a checkpoint written from the GPU
and resumed onto it, channels-last and pinned-memory workers on CUDA, ``torch.compile`` with its GPU
backend, a run trained on the GPU opened on the CPU with no flags, a study whose cells run on the GPU, and
nccl with two GPUs. Tolerances: CUDA's nearest-neighbour upsampling adds its gradients with atomics, so
two runs of the same steps differ by float rounding (losses to 1e-4 relative; a weight by up to ~lr per
Adam step, as in ``test_ddp.py``); fp32 convolutions use TF32 on Ampere and later (PyTorch's default).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import labeldiff.pretrain.run as pretrain_run
from conftest import interrupt_on_call, read_log, tiny_run, write_labeled_dataset
from labeldiff.checkpoint import load_checkpoint, load_weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LOSS_REL = 1e-4
WEIGHT_TOL = 1e-3


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_log(run).values()]


def same_weights(a: Path, b: Path, atol: float = WEIGHT_TOL) -> None:
    wa, wb = load_weights(a / "model.safetensors"), load_weights(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=atol, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_gpu_run_resumes_where_it_stopped(precision, tmp_path, labeled_dataset, monkeypatch):
    """Interrupted at step 4 and resumed on the GPU, a run with EMA logs the uninterrupted run's losses and ends
    with its weights. The checkpoint is read on the CPU: the EMA's state must go back to the GPU (it once
    stayed on the CPU and the first EMA update after a resume failed). fp16 trains through the gradient
    scaler, whose state the checkpoint keeps."""
    cfg = dict(steps=6, checkpoint_every=3, log_every=1, ema_decay=0.9, warmup_steps=2, device="cuda",
               precision=precision)
    a, b = tmp_path / "A", tmp_path / "B"
    pretrain_run.run_pretrain(tiny_run(labeled_dataset, **cfg), a)
    monkeypatch.setattr(pretrain_run, "pretext_loss", interrupt_on_call(5))
    with pytest.raises(KeyboardInterrupt):
        pretrain_run.run_pretrain(tiny_run(labeled_dataset, **cfg), b)
    monkeypatch.undo()
    assert load_checkpoint(b)["step"] == 4
    pretrain_run.run_pretrain(tiny_run(labeled_dataset, **cfg), b, resume=True)
    assert losses(b) == pytest.approx(losses(a), rel=LOSS_REL)
    same_weights(a, b)
    scaler = load_checkpoint(a)["extra"].get("scaler")
    assert (scaler is not None) == (precision == "fp16")
    if scaler is not None:
        assert load_checkpoint(b)["extra"]["scaler"]["scale"] == scaler["scale"]


def test_auto_precision_on_the_gpu_is_bf16_and_close_to_fp32(tmp_path, labeled_dataset):
    """``--precision auto`` autocasts to bf16 on a GPU that has it; three steps (same initial weights, same
    noise: the step's generator lives on the GPU in both) give the fp32 losses to bf16's rounding. (The
    UNet's output layer starts at zero, so the first step's loss is the same in any precision.)"""
    from labeldiff.runtime import resolve_precision

    assert resolve_precision("auto", torch.device("cuda")) is (
        torch.bfloat16 if torch.cuda.is_bf16_supported() else None)
    cfg = dict(steps=3, log_every=1, device="cuda")
    pretrain_run.run_pretrain(tiny_run(labeled_dataset, precision="fp32", **cfg), tmp_path / "fp32")
    pretrain_run.run_pretrain(tiny_run(labeled_dataset, precision="auto", **cfg), tmp_path / "auto")
    fp32, auto = losses(tmp_path / "fp32"), losses(tmp_path / "auto")
    assert auto == pytest.approx(fp32, rel=0.02)
    assert auto[-1] != fp32[-1]  # it did autocast


@pytest.mark.parametrize("change", [{"channels_last": True}, {"num_workers": 2}])
def test_channels_last_and_pinned_workers_train_the_same_run_on_the_gpu(change, tmp_path, labeled_dataset):
    """NHWC on CUDA kernels, and batches decoded in 2 worker processes into pinned memory and copied with
    ``non_blocking``: the same batches, the same losses and weights as the plain run."""
    cfg = dict(steps=4, log_every=1, ema_decay=0.9, device="cuda", precision="fp32")
    pretrain_run.run_pretrain(tiny_run(labeled_dataset, **cfg), tmp_path / "plain")
    run = tiny_run(labeled_dataset, **cfg, **{k: v for k, v in change.items() if k != "num_workers"})
    run.data.num_workers = change.get("num_workers", 0)
    pretrain_run.run_pretrain(run, tmp_path / "changed")
    assert losses(tmp_path / "changed") == pytest.approx(losses(tmp_path / "plain"), rel=1e-3)
    same_weights(tmp_path / "plain", tmp_path / "changed", atol=3e-3)


def test_compile_on_the_gpu_trains_the_eager_run(tmp_path, labeled_dataset):
    """``--compile 1`` (inductor's GPU kernels) trains what eager mode trains; the weights keep plain names."""
    cfg = dict(steps=3, log_every=1, ema_decay=0.0, device="cuda", precision="fp32")
    pretrain_run.run_pretrain(tiny_run(labeled_dataset, **cfg), tmp_path / "eager")
    pretrain_run.run_pretrain(tiny_run(labeled_dataset, compile=True, **cfg), tmp_path / "compiled")
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-3)
    same_weights(tmp_path / "eager", tmp_path / "compiled", atol=3e-3)


def test_a_gpu_run_opens_on_the_cpu_and_scores_the_same(tmp_path, binary_dataset):
    """A run fine-tuned on the GPU opens on the CPU with no flags (safetensors hold no device) and predicts
    the same masks; ``evaluate`` on either device gives the same Dice."""
    from labeldiff.evaluate.run import run_evaluate
    from labeldiff.runs import open_segmenter
    from labeldiff.transfer.run import run_transfer

    ft = tiny_run(binary_dataset, kind="segmentation", steps=20, device="cuda", precision="auto")
    ft.transfer.strategy, ft.transfer.labels = "scratch", 4
    run_transfer(ft, tmp_path / "ft")
    gpu, _ = open_segmenter(tmp_path / "ft", "cuda")
    cpu, _ = open_segmenter(tmp_path / "ft", "cpu")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        on_gpu, on_cpu = gpu(x.cuda()).cpu(), cpu(x)
    torch.testing.assert_close(on_gpu, on_cpu, atol=2e-2, rtol=2e-2)  # TF32 convolutions on the GPU
    assert (on_gpu.argmax(1) == on_cpu.argmax(1)).float().mean() > 0.99
    a = run_evaluate(tmp_path / "ft", tmp_path / "eval_gpu", split="test", device="cuda")
    b = run_evaluate(tmp_path / "ft", tmp_path / "eval_cpu", split="test", device="cpu")
    assert a["dice"]["mean"] == pytest.approx(b["dice"]["mean"], abs=0.01)


def test_end_to_end_on_the_gpu(tmp_path):
    """ddpm and mdm pretraining, full fine-tuning and the probe, evaluation and sampling, all on the GPU."""
    from labeldiff.evaluate.run import run_evaluate
    from labeldiff.pretrain.run import run_pretrain
    from labeldiff.runs import RunFolder
    from labeldiff.sample.diffusion import sample
    from labeldiff.transfer.run import run_transfer

    data = write_labeled_dataset(tmp_path / "data", n=5, k=3, hw=(32, 32), n_train=3)
    for method in ("ddpm", "mdm"):
        cfg = tiny_run(data, steps=2, device="cuda", precision="auto")
        cfg.corruption.method = method
        run_pretrain(cfg, tmp_path / method)
    for strategy in ("full", "probe"):
        ft = tiny_run(data, kind="segmentation", steps=2, device="cuda")
        ft.transfer.pretrained, ft.transfer.strategy, ft.transfer.labels, ft.transfer.members = (
            str(tmp_path / "ddpm"), strategy, 2, 1)
        run_transfer(ft, tmp_path / strategy)
        metrics = run_evaluate(tmp_path / strategy, tmp_path / f"eval_{strategy}", split="test", device="cuda")
        assert 0.0 <= metrics["dice"]["mean"] <= 1.0
    run = RunFolder.open(tmp_path / "ddpm")
    images = sample(run.pretext_network("cuda"), run.config, n=2, sampler="ddpm", steps=3)
    assert images.is_cuda and torch.isfinite(images).all()


def test_hybrid_pairs_are_sampled_on_the_gpu(tmp_path, labeled_dataset):
    """A hybrid run draws (image, mask) pairs on the GPU: images finite, masks labels in 0..K-1."""
    from labeldiff.runs import RunFolder
    from labeldiff.sample.diffusion import sample, sample_masks

    cfg = tiny_run(labeled_dataset, steps=2, device="cuda", precision="auto")
    cfg.corruption.method = "hybrid"
    pretrain_run.run_pretrain(cfg, tmp_path / "hybrid")
    run = RunFolder.open(tmp_path / "hybrid")
    net = run.pretext_network("cuda")
    images = sample(net, run.config, n=3, sampler="ddim", steps=4)
    masks = sample_masks(net, run.config, images)
    assert images.is_cuda and masks.is_cuda and torch.isfinite(images).all()
    assert int(masks.min()) >= 0 and int(masks.max()) < run.config.num_classes


def test_a_study_runs_its_cells_on_the_gpu(tmp_path):
    """``labeldiff study`` with ``device: auto`` (the default) pretrains and runs its cells on the GPU, two
    workers side by side on it, and writes its reports."""
    from labeldiff.study.runner import run_study

    write_labeled_dataset(tmp_path / "data", n=6, k=3)
    tiny = {"train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "log_every": 1,
                      "checkpoint_every": 100}}
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump({
        **tiny, "model": {"channels": [8, 16], "attention_levels": [False, False], "num_head_channels": 8,
                          "norm_num_groups": 8, "num_res_blocks": 1}, "corruption": {"method": "ddpm"}}))
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump({**tiny, "transfer": {"head_hidden": 8}}))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({
        "data": {"path": str(tmp_path / "data"), "size": 16, "channels": 3},
        "methods": [{"name": "ddpm", "recipe": "pre.yaml", "pretrain_steps": [3]}],
        "strategies": ["full", "scratch"], "labels": [1, 2], "seeds": [0], "finetune": {"recipe": "ft.yaml"}}))
    rows = run_study(tmp_path / "study.yaml", tmp_path / "out", workers=2)
    assert len(rows) == 4 and all(0.0 <= r["dice"] <= 1.0 for r in rows)
    for cell in (tmp_path / "out" / "cells").iterdir():
        assert json.loads((cell / "run" / "config.json").read_text())["train"]["device"] in ("auto", "cuda")
    log = "".join(p.read_text() for p in (tmp_path / "out" / "workers").glob("shard-*.log"))
    assert "cuda" in log, log[-2000:]
    assert (tmp_path / "out" / "verdict.md").is_file()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl needs two GPUs (one process per GPU)")
def test_two_gpus_train_what_one_trains(tmp_path, labeled_dataset):
    """torchrun with 2 processes on 2 GPUs (nccl, SyncBatchNorm) trains the one-GPU run of the same global
    batch, and only rank 0 writes."""
    from labeldiff.bench.ddp import torchrun
    from labeldiff.cli import main

    base = ["pretrain", "--data", str(labeled_dataset), "--size", "16", "--batch-size", "4", "--precision", "fp32",
            "--device", "cuda", "--channels", "3", "--unet-channels", "8,16", "--attention", "0,0", "--steps", "4",
            "--log-every", "1"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    out = torchrun(2, ["labeldiff.cli", *base, "--out", str(tmp_path / "two")])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert [s for s in read_log(tmp_path / "two")] == [1, 2, 3, 4]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-3)
