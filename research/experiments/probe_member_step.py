"""Time one training step of one probe member (labeldiff.models.probe.PixelMLP, Adam, cross-entropy) on a
1024-pixel batch, in fp32 and under bf16 autocast: is the probe's 10 × 50-epoch budget within reach
of a CPU's bf16 kernels? Prints the median of 5 rounds of 200 steps after 50 warm-up steps.

    ../.venv/bin/python experiments/probe_member_step.py [--features 288] [--classes 2]
"""
import argparse
import time

import torch
import torch.nn.functional as F

from labeldiff.models.probe import PixelMLP, hidden_sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=288, help="features per pixel (the probe's default for ddpm: 288)")
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1024, help="pixels per batch (the probe's default)")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.features, generator=g)
    y = torch.randint(0, args.classes, (args.batch,), generator=g)
    print(f"{torch.get_num_threads()} threads, {args.features} features, {args.classes} classes, batch {args.batch}")
    for mode in ("fp32", "bf16"):
        net = PixelMLP(args.features, args.classes, hidden_sizes(args.classes), seed=0)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(50):
            step()
        rounds = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(200):
                step()
            rounds.append((time.perf_counter() - t) / 200)
        print(f"{mode}: {sorted(rounds)[2] * 1e3:.2f} ms per member step (median of 5 rounds of 200)")


if __name__ == "__main__":
    main()
