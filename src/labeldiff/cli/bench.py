"""``labeldiff bench …``: the benchmarks' options (measurements for developers, not in the everyday
command list)."""
from __future__ import annotations

import argparse
from pathlib import Path

from labeldiff.cli.options import (NON_NEGATIVE, POSITIVE, VOCABULARY, _ints, add_settings, number)


def add_bench(sub) -> None:
    """``labeldiff bench …``: measurements for developers, not in the everyday command list."""
    from labeldiff.cli import commands as c

    bench = sub.add_parser("bench", description="Measurements, not tests: run one and quote its table.")
    bsub = bench.add_subparsers(dest="what", required=True, metavar="{probe-memory,loop,predict,ddp}")
    p = bsub.add_parser("probe-memory", help="streamed pixel-MLP probe vs the in-RAM reference",
                        description="Train the pixel-MLP probe the reference way (all pixel features in RAM) and the "
                                    "labeldiff way (float16 disk cache, streamed) on the same images, features and "
                                    "seed, each in its own process; print peak RSS, their ratio, wall time and test "
                                    "IoU of each.")
    p.add_argument("--pretrained", required=True, type=Path, help="a pretraining run (diffusion UNet)")
    p.add_argument("--data", required=True, type=Path, help="a labeled dataset root (train and test splits)")
    p.add_argument("--labels", type=POSITIVE, default=3, help="labeled training images [3]")
    p.add_argument("--size", type=number(int, 8), default=256, help="images and masks resized to size² [256]")
    p.add_argument("--members", type=POSITIVE, default=10, help="MLPs in the ensemble [10]")
    p.add_argument("--max-epochs", type=POSITIVE, default=50, help="epochs per member at most [50]")
    p.add_argument("--patience", type=POSITIVE, default=3, help="stop a member after this many epochs without "
                                                          "improvement of its training loss [3]")
    p.add_argument("--threads", type=POSITIVE, default=1, help="torch threads in each child process [1]")
    p.add_argument("--train-split", default="train", help="split.json entry of the labeled images [train]")
    p.add_argument("--test-split", default="test", help="split.json entry evaluated [test]")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="labeled-image choice and MLP seeds [0]")
    p.set_defaults(func=c.cmd_bench)

    p = bsub.add_parser("loop", help="bare training step / step of the real pretrain loop",
                        description="Loop efficiency: the bare forward + backward + optimizer step of the network, "
                                    "batch and precision of a pretraining config, divided by a step of the real "
                                    "`labeldiff pretrain` loop, for each --workers count. Takes the pretrain options; "
                                    "--steps is the length of each timed run [30].")
    add_run_settings(p)
    p.add_argument("--workers", type=_ints, default=(0, 2), help="data-loading worker counts to measure [0,2]")
    p.add_argument("--profile", action="store_true", help="also the profiler's top operators of a bare step")
    p.set_defaults(func=c.cmd_bench)

    p = bsub.add_parser("ddp", help="1 vs 2 torchrun processes of pretrain, the all-reduce, an 8-GPU estimate",
                        description="Throughput of `labeldiff pretrain` under torchrun with 1 and 2 processes (gloo, "
                                    "1 thread each), the gloo all-reduce of the model's gradient on its own, and with "
                                    "--estimate-recipe an estimate of a recipe on --gpus GPUs from its counted FLOPs "
                                    "and gradient size. Takes the pretrain options; --steps is the length of each "
                                    "timed run [30].")
    add_run_settings(p)
    p.add_argument("--estimate-recipe", help="recipe to estimate on GPUs, e.g. ddpm (the CT paper's)")
    p.add_argument("--gpus", type=POSITIVE, default=8, help="GPUs of the estimate [8]")
    p.add_argument("--gpu-step-seconds", type=number(float, 0, lo_open=True), default=None,
                   help="a step of --estimate-recipe measured on one GPU; it replaces the assumed GPU utilisation")
    p.set_defaults(func=c.cmd_bench)

    p = bsub.add_parser("predict", help="bare batched forward / `labeldiff predict`",
                        description="Predict efficiency: a bare batched forward over the network inputs that "
                                    "prediction evaluates for a folder of images, divided by `labeldiff predict` on "
                                    "that folder (reading, sliding window, writing PNGs), on --device; the fastest of "
                                    "--repeats runs of each.")
    p.add_argument("--model", required=True, type=Path, help="a segmenter run folder (finetune / probe)")
    p.add_argument("--input", required=True, type=Path, help="a folder of images (or a dataset root with images/)")
    p.add_argument("--sw-batch-size", type=POSITIVE, default=8, help="inputs per forward, as predict's sliding "
                                                                     "window uses [8]")
    p.add_argument("--repeats", type=POSITIVE, default=1, help="timed runs of each side; the fastest counts [1]")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] [cpu]")
    p.add_argument("--io-threads", type=NON_NEGATIVE, default=2, help="threads that read and write beside the "
                                                                      "network in predict; 0: serial [2]")
    p.set_defaults(func=c.cmd_bench)


def add_run_settings(p: argparse.ArgumentParser) -> None:
    """A benchmark that runs `labeldiff pretrain`: its data, recipe, --set and settings."""
    p.add_argument("--data", required=True, type=Path, help=VOCABULARY["--data"])
    p.add_argument("--recipe", help="settings from a recipe: a shipped name or a YAML file")
    p.add_argument("--set", dest="set_values", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any setting; repeatable")
    add_settings(p, "pretrain")
