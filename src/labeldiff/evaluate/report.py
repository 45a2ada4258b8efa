"""Overlays, grids and charts (matplotlib is imported only here, when a picture is drawn)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from labeldiff.data.io import class_colours


def to_rgb(image: np.ndarray) -> np.ndarray:
    """``[C, H, W]`` in [-1, 1] → ``[H, W, 3]`` uint8."""
    x = np.clip((np.asarray(image, dtype=np.float32) + 1) / 2, 0, 1)
    x = np.repeat(x, 3, axis=0) if x.shape[0] == 1 else x[:3]
    return (x.transpose(1, 2, 0) * 255).round().astype(np.uint8)


def colorize(mask: np.ndarray) -> np.ndarray:
    """``[H, W]`` class ids → ``[H, W, 3]`` uint8 in the colours a predicted mask PNG's palette gives them
    (:func:`labeldiff.data.io.class_colours`)."""
    mask = np.asarray(mask)
    return class_colours(int(mask.max()) + 1 if mask.size else 1)[mask]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend class colours over the image where the mask is not background."""
    rgb = to_rgb(image).astype(np.float32)
    col = colorize(mask).astype(np.float32)
    fg = (np.asarray(mask) > 0)[..., None]
    return np.where(fg, (1 - alpha) * rgb + alpha * col, rgb).round().astype(np.uint8)


def save_png(array: np.ndarray, path: Path) -> None:
    """Write ``array`` as a PNG with zlib level 1. PNG is lossless at every level; level 1 wrote a 1000²
    RGB overlay in 0.14 s against 0.65 s at Pillow's default 6 (2-core EPYC), for a 13 % larger file. On a
    GPU, where ``labeldiff predict`` spent ~1 s of host work per 1000² image, that is much of it."""
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """Write a figure whose layout is set (constrained) and close it."""
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def class_handles(masks: list[np.ndarray], class_names: list[str] | None,
                  below: int | None = None) -> tuple[list, list[str]]:
    """Legend handles and names (``dataset.json`` / ``classes.json`` names, else numbers) of the foreground
    classes present in ``masks`` (ids below ``below`` only, when given), in their overlay colours."""
    from matplotlib.patches import Patch

    present = sorted({int(c) for m in masks if m is not None for c in np.unique(m)
                      if c > 0 and (below is None or c < below)})
    colours = colorize(np.array(present, dtype=np.int64)) / 255.0
    return ([Patch(facecolor=colours[j], edgecolor="black", linewidth=0.5) for j in range(len(present))],
            [class_names[c] if class_names and c < len(class_names) else f"class {c}" for c in present])


def class_legend(fig, masks: list[np.ndarray], class_names: list[str] | None) -> bool:
    """A legend under ``fig`` naming the foreground classes present in ``masks`` (:func:`class_handles`);
    False when none is present."""
    handles, names = class_handles(masks, class_names)
    if not handles:
        return False
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 7), fontsize=7, frameon=False)
    return True


def bar_chart(results: dict[str, tuple[float, float]], path: Path, ylabel: str = "Dice", title: str = "") -> None:
    """``results``: name → (mean, std). Bars with error bars, values written on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    means = [results[n][0] for n in names]
    stds = [results[n][1] for n in names]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.5))
    bars = ax.bar(names, means, yerr=stds, capsize=6, color=["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"][: len(names)])
    for b, m in zip(bars, means):
        ax.text(b.get_x() + b.get_width() / 2, m + 0.01, f"{m:.3f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max([1.05] + [m + s + 0.05 for m, s in zip(means, stds) if np.isfinite(m + s)]))  # whole bars
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_per_image_csv(rows: list[dict], path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
