"""the generative metrics on real images whose answer is known in direction.

Writes "sample" folders (``sample_XXX.png``, as ``labeldiff sample`` would) made of real MoNuSeg
images resized to 64²: the train images themselves (FID ≈ 0 expected), the test images (a small gap),
and the test images with Gaussian noise of growing σ (in [-1, 1] units; FID and KID should grow,
precision fall). Each is scored by ``labeldiff evaluate-samples`` against the train split.

Usage: OMP_NUM_THREADS=1 ../.venv/bin/python experiments/generative_sanity.py [OUT] [DATA]
"""
import json
import sys
from pathlib import Path

import torch

from labeldiff.cli import main
from labeldiff.data.datasets import resize_image
from labeldiff.evaluate.report import save_png, to_rgb
from labeldiff.evaluate.samples import real_samples

torch.set_num_threads(1)
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/out/generative_sanity")
DATA = Path(sys.argv[2] if len(sys.argv) > 2 else "../../shared/datasets/monuseg")
SIGMAS = (0.05, 0.1, 0.2, 0.4)


def write(folder: Path, images: list[torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        save_png(to_rgb(x.numpy()), folder / f"sample_{i:03d}.png")


def images(split: str) -> list[torch.Tensor]:
    return [resize_image(torch.from_numpy(s.read_image(3)), (64, 64)) for s in real_samples(DATA, split)]


train, test = images("train"), images("test")
rng = torch.Generator().manual_seed(0)
folders = {"train (itself)": train, "test": test}
folders |= {f"test + noise σ={s:g}": [(x + s * torch.randn(x.shape, generator=rng)).clamp(-1, 1) for x in test]
            for s in SIGMAS}
rows = []
for name, imgs in folders.items():
    folder = OUT / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "").replace("σ=", "")
    write(folder, imgs)
    assert main(["evaluate-samples", "--samples", str(folder), "--data", str(DATA), "--split", "train",
                 "--device", "cpu", "--out", str(folder / "report.json")]) == 0
    r = json.loads((folder / "report.json").read_text())
    rows.append(f"| {name} | {r['n_samples']} | {r['n_real']} | {r['fid']:.2f} | {r['kid']:.4f} ± {r['kid_se']:.4f} "
                f"| {r['precision']:.2f} | {r['recall']:.2f} |")
print("| samples (64²) | n | real (train, 64²) | FID | KID ± s.e. | precision | recall |")
print("|---|---|---|---|---|---|---|")
print("\n".join(rows))
