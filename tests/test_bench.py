"""``labeldiff bench loop | predict``: the tiles the predict benchmark feeds are MONAI's, the loop's step
times are read from its log as written, and both commands run end to end on tiny runs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from monai.inferers import sliding_window_inference

from labeldiff.bench.efficiency import network_inputs, real_step_seconds
from labeldiff.cli import main
from labeldiff.config import DataConfig, RunConfig
from labeldiff.data.datasets import network_hw, resize_image

TINY = ["--size", "16", "--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--channels", "3",
        "--unet-channels", "8,16", "--attention", "0,0"]


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"  # num_head_channels has no flag (see test_cli)
    path.write_text("model:\n  num_head_channels: 8\ntrain:\n  warmup_steps: 1\n")
    return path


@pytest.mark.parametrize("hw", [(50, 37), (16, 40), (16, 16), (9, 40)])
def test_network_inputs_are_the_tiles_monai_evaluates(hw):
    """The bare forward of `bench predict` sees exactly the tiles, in their order, that MONAI's sliding
    window hands the network in `predict` (after the same resize: a 9-pixel side is enlarged to 16)."""
    image = torch.rand(3, *hw)
    seen = []

    def record(batch):
        seen.extend(batch.clone())
        return batch[:, :1].clone()  # MONAI weights the output in place

    cfg = DataConfig(size=16, mode="crop", scale=1.0)
    scaled = resize_image(image, network_hw(hw, cfg))
    sliding_window_inference(scaled[None], roi_size=(16, 16), sw_batch_size=3, predictor=record, overlap=0.25,
                             mode="gaussian")
    ours = network_inputs(image, cfg, whole_image=False)
    assert len(ours) == len(seen)
    assert all(torch.equal(a, b) for a, b in zip(ours, seen))
    assert network_inputs(image, DataConfig(size=16, mode="resize"), whole_image=False)[0].shape == (3, 16, 16)


def test_real_step_seconds_reads_each_logged_window(tmp_path):
    """Seconds per step of a window = window steps · batch / images_per_s / window steps."""
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 10, "loss": 1.0, "images_per_s": 4.0}, {"step": 20, "loss": 0.9, "images_per_s": 8.0},
        {"step": 25, "loss": 0.8, "stopped": "plateau"}, {"step": 30, "loss": 0.8, "images_per_s": 16.0}]))
    assert real_step_seconds(log, batch_size=8) == pytest.approx([2.0, 1.0, 0.5])


def _row(out: str, first_cell: str) -> list[str]:
    return next([c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
                if line.startswith(f"| {first_cell} |"))


def test_bench_loop_runs_the_real_loop_and_the_bare_step(module_dataset, tiny_recipe, capsys):
    assert main(["bench", "loop", "--data", str(module_dataset), "--recipe", str(tiny_recipe), *TINY,
                 "--steps", "20", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    bare, real, _ckpt, eff = _row(out, "0")[1:]
    bare_s, real_s = float(bare.split()[0]), float(real.split()[0])
    before, after = (float(v) for v in re.search(r"\((\d+), (\d+)\)", bare).groups())
    assert 0 < bare_s and 0 < real_s and abs(bare_s - (before + after) / 2) <= 1  # ms, rounded
    assert float(eff.strip("*")) == pytest.approx(bare_s / real_s, rel=0.01)
    assert "20 steps of batch 2 at 16², fp32" in out


def test_bench_predict_times_both_sides_on_the_same_images(module_dataset, tiny_recipe, tmp_path, capsys):
    run = tmp_path / "scratch"
    assert main(["finetune", "--data", str(module_dataset), "--strategy", "scratch", "--labels", "2", "--steps", "2",
                 "--head-hidden", "8", "--recipe", str(tiny_recipe), *TINY, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["bench", "predict", "--model", str(run), "--input", str(module_dataset)]) == 0
    out = capsys.readouterr().out
    n = len(list((module_dataset / "images").glob("*.png")))
    tiles = int(re.search(rf"{n} images, (\d+) network inputs \(16² tiles, batch 8\)", out).group(1))
    assert tiles >= n  # 40×48 images: 3×2 tiles of 16² each
    bare, real = (float(_row(out, side)[1].split()[0]) for side in ("bare batched forward", "`labeldiff predict`"))
    assert float(re.search(r"efficiency \*\*([\d.]+)", out).group(1)) == pytest.approx(bare / real, rel=0.02)


def test_allreduce_under_torchrun_sums_and_is_timed():
    """The all-reduce timer runs 2 gloo processes; each checks the sum (1 + 2 = 3 everywhere) before
    rank 0 reports a median time."""
    from labeldiff.bench.ddp import allreduce_seconds

    assert 0 < allreduce_seconds(100_000, processes=2, repeats=3) < 5


def test_step_cost_counts_flops_per_image_and_gradient_bytes(tiny_run_config, tmp_path):
    from labeldiff.bench.ddp import step_cost

    cfg = tiny_run_config(tmp_path)
    one, four = step_cost(cfg), step_cost(RunConfig.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"],
                                                                                          "batch_size": 4}}))
    from labeldiff.models.unet import build_network

    params = sum(p.numel() for p in build_network(cfg.model, out_channels=3).parameters())
    assert one["grad_bytes"] == four["grad_bytes"] == 4 * params
    assert four["flops"] == 2 * one["flops"] > 0  # batch 2 → 4: twice the work


def test_paper_estimate_by_hand():
    from labeldiff.bench import ddp

    cost = {"flops": 2e15, "grad_bytes": 8e8}
    est = ddp.paper_estimate(cost, steps=3600, gpus=4)
    one = 2e15 / (ddp.GPU_PEAK_TFLOPS * 1e12 * ddp.GPU_UTILISATION)
    comm = 2 * 3 / 4 * 8e8 / (ddp.NVLINK_BUS_GBPS * 1e9)
    assert est["one_gpu_s"] == pytest.approx(one) and est["allreduce_s"] == pytest.approx(comm)
    assert est["step_s"] == pytest.approx((max(one / 4, comm), one / 4 + comm))
    assert est["hours_one"] == pytest.approx(one) and est["speedup"][1] == pytest.approx(one / max(one / 4, comm))


def test_a_measured_gpu_step_replaces_the_assumed_utilisation():
    from labeldiff.bench import ddp

    cost = {"flops": 2e15, "grad_bytes": 8e8, "batch_size": 16, "size": 256}
    est = ddp.paper_estimate(cost, steps=3600, gpus=4, one_gpu_s=10.0)
    assert est["one_gpu_s"] == 10.0 and est["compute_s"] == 2.5 and est["hours_one"] == pytest.approx(10.0)
    assert est["utilisation"] == pytest.approx(2e15 / 10.0 / (ddp.GPU_PEAK_TFLOPS * 1e12))
    text = ddp.format_estimate(cost, est, 3600, "t")
    assert "measured: 10000.0 ms" in text and "% utilisation" not in text
    assumed = ddp.format_estimate(cost, ddp.paper_estimate(cost, steps=3600, gpus=4), 3600, "t")
    assert "assumed: 989 TFLOP/s bf16 peak per GPU at 40 % utilisation" in assumed
