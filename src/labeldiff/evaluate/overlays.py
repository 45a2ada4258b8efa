"""Overlays that show where a prediction is right and wrong, and which test images to show.

Each pixel is coloured by its outcome against the ground truth: a true positive (foreground in both, the
same class), a false positive (predicted foreground, background in the truth), a false negative (missed
foreground) and, with more than one foreground class, a wrong class (foreground in both, other classes).
The colours are a semi-transparent fill with a solid edge, and a dark rim round all of them, so they read
on any image: teal, yellow and blue stay apart for the common colour-vision deficiencies (Machado et al.
2009 simulation, deutan and protan) and differ from H&E pink and purple, fundus orange and polyp red.

``labeldiff evaluate --overlays worst|best|first|all|STEM,...`` picks the images (:func:`parse_choice`,
:class:`Picker`); :func:`overlay_figure` draws the grid, :func:`overlay_row` the pixels of one image.
"""
from __future__ import annotations

import heapq
import math
from pathlib import Path

import numpy as np

from labeldiff.errors import DataError
from labeldiff.evaluate.report import class_handles, overlay, save_figure, to_rgb

# outcome id → (name, colour)
OUTCOMES = {1: ("true positive", (0, 200, 170)), 2: ("false positive", (255, 230, 0)),
            3: ("false negative", (40, 100, 255)), 4: ("wrong class", (255, 0, 255))}
TP, FP, FN, WRONG = 1, 2, 3, 4
CHOICES = ("first", "worst", "best", "all")


def outcome_map(pred: np.ndarray, target: np.ndarray, ignore_index: int | None = None) -> np.ndarray:
    """``[H, W]`` uint8: 0 background in both (or ignored), :data:`TP`, :data:`FP`, :data:`FN`, :data:`WRONG`
    (foreground in both, another class)."""
    pred, target = np.asarray(pred), np.asarray(target)
    out = np.zeros(pred.shape, dtype=np.uint8)
    p, t = pred > 0, target > 0
    out[p & t & (pred == target)] = TP
    out[p & ~t] = FP
    out[~p & t] = FN
    out[p & t & (pred != target)] = WRONG
    if ignore_index is not None:
        out[target == ignore_index] = 0
    return out


def edge_width(shape: tuple[int, ...]) -> int:
    """Pixels of an outcome's edge: 1 up to 512 pixels a side, then one more per 512 (a 1000² image: 2), so
    that the edge still shows when the image is drawn a few hundred pixels wide."""
    return max(1, math.ceil(max(shape[:2]) / 512))


def paint(image: np.ndarray, labels: np.ndarray, colours: dict[int, tuple[int, int, int]],
          alpha: float = 0.4) -> np.ndarray:
    """``image [C, H, W]`` in [-1, 1] with each region ``labels == id`` filled in ``colours[id]`` at
    ``alpha``, its edge in the solid colour and a dark rim just outside all regions: ``[H, W, 3]`` uint8."""
    from scipy.ndimage import binary_dilation, binary_erosion

    rgb = to_rgb(image).astype(np.float32)
    labels = np.asarray(labels)
    width = edge_width(labels.shape)
    out = rgb.copy()
    for i, colour in colours.items():
        region = labels == i
        if not region.any():
            continue
        c = np.array(colour, dtype=np.float32)
        out[region] = (1 - alpha) * rgb[region] + alpha * c
        edge = region & ~binary_erosion(region, iterations=width, border_value=1)
        out[edge] = c
    shown = np.isin(labels, list(colours))
    rim = binary_dilation(shown, iterations=max(1, width // 2)) & ~shown
    out[rim] = 0.25 * out[rim]
    return out.round().astype(np.uint8)


def outcome_overlay(image: np.ndarray, pred: np.ndarray, target: np.ndarray,
                    ignore_index: int | None = None) -> np.ndarray:
    """``[H, W, 3]`` uint8: ``image`` with every pixel coloured by its outcome (:data:`OUTCOMES`)."""
    return paint(image, outcome_map(pred, target, ignore_index), {i: c for i, (_, c) in OUTCOMES.items()})


def panels(image: np.ndarray, pred: np.ndarray, target: np.ndarray, num_classes: int,
           ignore_index: int | None = None) -> list[tuple[str, np.ndarray]]:
    """The panels of one image: image | outcome (K = 2); image | ground truth | prediction | outcome (K > 2,
    where the outcome cannot say which class; the class panels do)."""
    out = [("image", to_rgb(image))]
    if num_classes > 2:
        out += [("ground truth", overlay(image, np.where(target == ignore_index, 0, target)
                                         if ignore_index is not None else target)),
                ("prediction", overlay(image, pred))]
    return out + [("outcome", outcome_overlay(image, pred, target, ignore_index))]


def overlay_row(image: np.ndarray, pred: np.ndarray, target: np.ndarray, num_classes: int,
                ignore_index: int | None = None, gap: int = 4) -> np.ndarray:
    """The :func:`panels` of one image side by side at its own resolution, ``gap`` white pixels apart:
    what ``--overlays all`` writes per image."""
    pics = [p for _, p in panels(image, pred, target, num_classes, ignore_index)]
    white = np.full((pics[0].shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([x for p in pics for x in (p, white)][:-1], axis=1)


def outcome_legend(fig, num_classes: int, class_names: list[str] | None, masks: list[np.ndarray]) -> None:
    """A legend under ``fig`` naming the outcome colours (and, K > 2, the classes shown)."""
    from matplotlib.patches import Patch

    shown = [TP, FP, FN] + ([WRONG] if num_classes > 2 else [])
    handles = [Patch(facecolor=np.array(OUTCOMES[i][1]) / 255, edgecolor="black", linewidth=0.5) for i in shown]
    names = [OUTCOMES[i][0] for i in shown]
    if num_classes > 2:
        more, more_names = class_handles(masks, class_names, below=num_classes)
        handles, names = handles + more, names + more_names
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 4), fontsize=8, frameon=False)


def caption(stem: str, dice: float | None, width: int = 30) -> str:
    """``"stem\\nDice 0.412"``, a long stem shortened in the middle to ``width`` characters."""
    if len(stem) > width:
        stem = stem[: width // 2 - 1] + "…" + stem[-(width - width // 2):]
    return stem if dice is None else f"{stem}\nDice {dice:.3f}" if math.isfinite(dice) else f"{stem}\nDice – (empty)"


def panel_figure(rows: list[list[tuple[str, np.ndarray]]], title: str = "", legend=None):
    """A grid of pictures, one list of ``(caption, [H, W, 3] uint8)`` per row, every caption over its own
    panel and the ``title`` over all (constrained layout: they never overlap); ``legend(fig)`` draws a
    legend under it. Returned, not saved, so tests can measure it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.8 * cols, 2.8 * len(rows) + 1.0), squeeze=False,
                             layout="constrained")
    for ax_row, row in zip(axes, rows):
        for ax in ax_row:
            ax.axis("off")
        for ax, (name, pic) in zip(ax_row, row):
            ax.imshow(pic)
            ax.set_title(name, fontsize=8)
    if title:  # wrapped to the figure's width (about 0.6 em per character): a title never runs off its edges
        import textwrap

        fig.suptitle(textwrap.fill(title, width=int(2.8 * cols * 72 / (10 * 0.6))), fontsize=10)
    if legend is not None:
        legend(fig)
    return fig


def overlay_figure(rows: list[dict], num_classes: int, title: str = "", class_names: list[str] | None = None,
                   ignore_index: int | None = None):
    """The figure of :func:`overlay_grid` (returned, not saved)."""
    grid = []
    for r in rows:
        row = panels(r["image"], r["pred"], r["target"], num_classes, ignore_index)
        grid.append([(caption(r["name"], r.get("dice")), row[0][1]), *row[1:]])
    masks = [r["target"] for r in rows] + [r["pred"] for r in rows]
    return panel_figure(grid, title, lambda fig: outcome_legend(fig, num_classes, class_names, masks))


def overlay_grid(rows: list[dict], path: Path, num_classes: int, title: str = "",
                 class_names: list[str] | None = None, ignore_index: int | None = None) -> None:
    """One row per image: image (captioned with its stem and foreground Dice) | outcome (and, K > 2, ground
    truth and prediction in class colours), a legend naming the colours. ``rows``: dicts with ``name``,
    ``image [C, H, W]``, ``target [H, W]``, ``pred [H, W]``, ``dice`` (None: not shown)."""
    save_figure(overlay_figure(rows, num_classes, title, class_names, ignore_index), path, dpi=110)


def parse_choice(text: str | None) -> tuple[str, list[str]]:
    """``--overlays``: ``(how, stems)``, how one of :data:`CHOICES` or ``"named"`` (then ``stems``)."""
    text = (text or "first").strip()
    if text in CHOICES:
        return text, []
    stems = [s.strip() for s in text.split(",") if s.strip()]
    if not stems:
        raise DataError(f"--overlays {text!r}: give worst, best, first, all, or test image stems STEM,STEM,...")
    return "named", stems


def check_named(stems: list[str], available: list[str], where: str) -> None:
    """Refuse ``--overlays STEM,...`` naming images that are not among those scored."""
    missing = [s for s in stems if s not in set(available)]
    if missing:
        raise DataError(f"--overlays names {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}, not in {where} "
                        f"({len(available)} images, e.g. {', '.join(available[:3])}); name images of that split, or "
                        f"use worst, best, first or all")


class Picker:
    """Keeps the images an overlay grid shows while they stream past: the first ``count``, the ``count``
    worst or best by foreground Dice (images without one, empty in truth and prediction, come last), or
    the named stems in their order. At most ``count`` (or the named) images are held at a time."""

    def __init__(self, how: str, count: int, stems: list[str] | None = None):
        self.how, self.count, self.stems = how, count, list(stems or [])
        self.kept: list = []  # heap of (key, order, row) for worst/best; rows in order otherwise
        self.seen = 0

    def offer(self, row: dict) -> None:
        order, self.seen = self.seen, self.seen + 1
        if self.how == "named":
            if row["name"] in self.stems:
                self.kept.append(row)
            return
        if self.how in ("first", "all"):
            if len(self.kept) < self.count:
                self.kept.append(row)
            return
        dice = row.get("dice")
        score = dice if dice is not None and math.isfinite(dice) else math.inf  # no Dice: never worst or best
        key = -score if self.how == "worst" else (score if math.isfinite(score) else -math.inf)
        item = (key, -order, row)  # the heap drops the smallest key: the best (worst) image seen so far
        if len(self.kept) < self.count:
            heapq.heappush(self.kept, item)
        elif item[:2] > self.kept[0][:2]:
            heapq.heapreplace(self.kept, item)

    def rows(self) -> list[dict]:
        if self.how == "named":
            by = {r["name"]: r for r in self.kept}
            return [by[s] for s in self.stems if s in by]
        if self.how in ("first", "all"):
            return list(self.kept)
        return [row for *_, row in sorted(self.kept, key=lambda it: it[:2], reverse=True)]

    def describe(self) -> str:
        """What the grid shows, in words: "the 6 worst by foreground Dice"."""
        if self.how == "named":
            return f"the {len(self.kept)} named image(s)"
        n = min(self.count, self.seen)
        return f"the first {n}" if self.how in ("first", "all") else f"the {n} {self.how} by foreground Dice"
