"""What a training step of a shipped preset costs on this machine: the CPU seconds one thread spends per step
(a figure other jobs on the machine do not inflate) and the wall seconds per step, after the images are
decoded and two warm-up steps. Measures the step the training loop takes — a batch drawn (and augmented, for
fine-tuning), forward, backward, optimizer — with the preset's network, batch and the given precision.

    .venv/bin/python tools/cost_per_step.py --data ../shared/datasets/monuseg --scale 0.25 ddpm-quick bf16 1 8

The recipes page (tools/pages.py, QUICK_COSTS) quotes its output.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from labeldiff.config import load_recipe, recipe_values
from labeldiff.corruption import build_corruption
from labeldiff.data.augment import Augment
from labeldiff.data.datasets import StepBatches
from labeldiff.data.folders import open_labeled
from labeldiff.models.unet import SegmentationNet
from labeldiff.pretrain.cost import step_seconds
from labeldiff.pretrain.run import build_pretrain_network, pretext_loss, training_samples
from labeldiff.resolve import Layer, resolve
from labeldiff.runtime import generator, resolve_precision
from labeldiff.transfer.finetune import param_groups, segmentation_loss

NETWORK_OF = {"finetune-quick": "ddpm-quick", "finetune-cpu": "ddpm-cpu", "finetune": "ddpm"}  # what each fine-tunes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset", help="a shipped pretraining recipe, or a fine-tuning one (finetune-quick, finetune-cpu)")
    p.add_argument("precision", choices=("auto", "bf16", "fp32"))
    p.add_argument("threads", type=int)
    p.add_argument("steps", type=int, help="timed steps")
    p.add_argument("--data", required=True, help="a labeled dataset root")
    p.add_argument("--scale", type=float, default=1.0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    given = {"data.path": args.data, "data.scale": args.scale, "train.precision": args.precision}
    network = NETWORK_OF.get(args.preset, args.preset)
    pre = resolve("pretrain", [Layer(f"recipe {network}", recipe_values(load_recipe(network))), Layer("given", given)])
    if network == args.preset:
        cfg, corruption = pre, build_corruption(pre.corruption)
        model, _ = build_pretrain_network(cfg, corruption)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
        batches = StepBatches(training_samples(cfg, corruption, quiet=True)[0], cfg.data, cfg.train.batch_size, 0,
                              labeled=False)
        loss_fn = pretext_loss(corruption)
    else:
        cfg = resolve("segmentation", [Layer(f"recipe {args.preset}", recipe_values(load_recipe(args.preset))),
                                       Layer("given", given)], pre, network)
        ds, t = open_labeled(cfg.data, split_file=None), cfg.transfer
        model = SegmentationNet(cfg.model, 2, t=t.t, head_hidden=t.head_hidden)
        optimizer = torch.optim.Adam(param_groups(model, cfg))
        batches = StepBatches(ds.samples(ds.stems(cfg.data.train_split)[:4]), cfg.data, cfg.train.batch_size, 0,
                              labeled=True, num_classes=2, flips=t.flips,
                              augment=Augment(t.augment, cfg.data.size) if t.augment != "none" else None)
        loss_fn = segmentation_loss(t.ce_weight)
    for i in range(40):  # every image decoded into the cache: a run's steady state
        batches[i]
    drawn = iter(range(10**9))

    def draw() -> dict:
        i = next(drawn) % 40  # batches whose images are decoded
        return {"i": i, **batches[i]}

    def loss(net: torch.nn.Module, batch: dict) -> torch.Tensor:
        return loss_fn(net, batch, generator(batch.pop("i"), "cpu"))

    dtype = resolve_precision(args.precision, torch.device("cpu"))
    step_seconds(model, optimizer, loss, 2, dtype, draw)  # warm-up
    t0 = time.process_time()
    walls = step_seconds(model, optimizer, loss, args.steps, dtype, draw)
    cpu = (time.process_time() - t0) / args.steps
    print(f"{args.preset}, {args.precision}, {args.threads} thread(s), batch {cfg.train.batch_size} at "
          f"{cfg.data.size}²: {cpu:.3f} CPU s a step; wall {min(walls):.3f} s (fastest), "
          f"{statistics.median(walls):.3f} s (median); load average {open('/proc/loadavg').read().split()[0]}")


if __name__ == "__main__":
    main()
