"""FLOPs counted, peak measured, utilisation their ratio: the count of a tiny network equals a hand count, and the
benchmarks print them."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from labeldiff.bench.flops import count_flops, measured_peak, tflops, utilisation


def test_the_count_of_a_tiny_network_equals_a_hand_count():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Flatten(),
                        nn.Linear(8 * 16 * 16, 10))
    x = torch.randn(2, 3, 16, 16)
    conv = 2 * 2 * (3 * 9) * 8 * 16 * 16  # 2 FLOPs per multiply–add, batch 2, 27 inputs per output, 8×16×16 outputs
    linear = 2 * 2 * (8 * 16 * 16) * 10
    assert count_flops(lambda: net(x)) == conv + linear  # normalisation and activations are not counted
    # backward: the gradients of the inputs and of the weights, each as much as the forward (the first conv's
    # input needs none)
    x.requires_grad_(False)
    assert count_flops(lambda: net(x).sum().backward()) == conv + linear + conv + 2 * linear


def test_utilisation_is_achieved_over_measured_peak():
    peak = measured_peak("cpu", torch.float32, n=256, repeats=2)
    assert peak > 1e8  # any CPU multiplies 256² matrices at more than 0.1 GFLOP/s
    u = utilisation(10**9, 0.5, peak)
    assert u["achieved"] == 2e9 and u["utilisation"] == pytest.approx(2e9 / peak)
    assert tflops(181e9) == "181.0 G" and tflops(1.14e14) == "114.00 T"


@pytest.mark.slow
def test_bench_loop_and_predict_print_flops_peak_and_utilisation(tmp_path, capsys):
    from labeldiff.cli import main

    from conftest import write_labeled_dataset

    data = write_labeled_dataset(tmp_path / "data", n=6, k=3)
    tiny = ["--size", "16", "--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--channels", "3",
            "--unet-channels", "8,16", "--attention", "0,0", "--head-channels", "8"]
    assert main(["bench", "loop", "--data", str(data), "--steps", "20", "--workers", "0", "--profile", *tiny]) == 0
    out = capsys.readouterr().out
    assert re.search(r"[\d.]+ GFLOP per step \(counted", out) and "measured peak" in out
    assert re.search(r"\| bare step \| [\d.]+ ms \| [\d.]+ GFLOP/s \| \*\*[\d.]+%\*\* \|", out)
    assert "convolution" in out  # the profiler's table names the operators
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "pre"), "--steps", "2", *tiny]) == 0
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "ft"), "--pretrained", str(tmp_path / "pre"),
                 "--labels", "2", "--steps", "2", "--head-hidden", "8", "--size", "16", "--batch-size", "2",
                 "--precision", "fp32", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["bench", "predict", "--model", str(tmp_path / "ft"), "--input", str(data / "images")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| `labeldiff predict` \| [\d.]+ ms \| [\d.]+ GFLOP/s \| \*\*[\d.]+%\*\* \|", out)


@pytest.mark.slow
def test_predict_with_io_threads_writes_what_the_serial_path_writes(tmp_path):
    """Reading and writing on threads beside the network changes nothing: every file is byte-identical."""
    from labeldiff.cli import main
    from labeldiff.evaluate.run import run_predict

    from conftest import write_labeled_dataset

    data = write_labeled_dataset(tmp_path / "data", n=8, k=3)
    tiny = ["--size", "16", "--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--channels", "3",
            "--unet-channels", "8,16", "--attention", "0,0", "--head-channels", "8"]
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "pre"), "--steps", "2", *tiny]) == 0
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "ft"), "--pretrained", str(tmp_path / "pre"),
                 "--labels", "2", "--steps", "2", "--head-hidden", "8", "--size", "16", "--batch-size", "2",
                 "--precision", "fp32", "--device", "cpu"]) == 0
    for threads in (0, 3):
        run_predict(tmp_path / "ft", data / "images", tmp_path / f"out{threads}", device="cpu", io_threads=threads,
                    probabilities=True)
    serial = sorted(p.relative_to(tmp_path / "out0") for p in (tmp_path / "out0").rglob("*.png"))
    assert len(serial) == 8 * (1 + 2 + 3)  # mask, overlay, uncertainty, 3 class maps per image
    for rel in serial:
        assert (tmp_path / "out3" / rel).read_bytes() == (tmp_path / "out0" / rel).read_bytes(), rel


def test_overlapped_keeps_order_and_raises_a_worker_error():
    from labeldiff.evaluate.run import overlapped

    seen = []
    overlapped(list(range(20)), lambda i: i * 2, lambda i, x: x + 1, lambda i, y: seen.append((i, y)), threads=3)
    assert sorted(seen) == [(i, 2 * i + 1) for i in range(20)]

    def broken(i, y):
        if i == 7:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        overlapped(list(range(20)), lambda i: i, lambda i, x: x, broken, threads=2)
