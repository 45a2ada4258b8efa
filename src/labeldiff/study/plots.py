"""A study's figures (matplotlib, imported when drawn): Dice against the number of labels, the forest plot
of paired differences, and the overlays of the first test images predicted by each setting."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from labeldiff.study.stats import BASELINE, group_of, groups, label_sizes, mean_std, paired_differences, varying


def plot_dice_vs_labels(rows: list[dict], path: Path, metric: str = "dice", title: str = "") -> None:
    """One line per method × strategy (× select) with std error bars; x = k on a log scale."""
    plt = _pyplot()
    extras = varying(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab20" if len(groups(rows, extras)) > 10 else "tab10").colors
    for i, g in enumerate(groups(rows, extras)):
        by_k: dict[int, list[float]] = defaultdict(list)
        for r in rows:
            if group_of(r, extras) == g:
                by_k[int(r["k"])].append(float(r[metric]))
        ks = sorted(by_k)
        ms = [mean_std(by_k[k]) for k in ks]
        ax.errorbar(ks, [m[0] for m in ms], yerr=[0 if m[2] < 2 else m[1] for m in ms], marker="o", capsize=4,
                    label=" / ".join(g), color=colors[i % len(colors)], linestyle="--" if g[1] == BASELINE else "-")
    ks = label_sizes(rows)
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("labeled images k (log scale)")
    ax.set_ylabel(f"{'Dice' if metric == 'dice' else 'IoU'} (foreground mean, test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    _save(fig, path, dpi=100)


def interval_limits(values, margin: float = 0.08) -> tuple[float, float]:
    """Axis limits that hold every finite value of ``values`` (points and interval ends) and 0, with
    ``margin`` of the span to spare on each side: an interval plot always shows its whole interval and
    whether it crosses 0."""
    v = [float(x) for x in values if x is not None and np.isfinite(x)] + [0.0]
    lo, hi = min(v), max(v)
    pad = margin * (hi - lo) if hi > lo else 0.05
    return lo - pad, hi + pad


def paired_figure(pairs: list[dict], metric: str = "dice", title: str = "", goal: float = 0.05):
    """The forest plot of :func:`plot_paired` for ``pairs`` (:func:`paired_differences` with n > 0), returned."""
    plt = _pyplot()
    shown = [a for a in ("method", "strategy", "protocol", "select") if len({p[a] for p in pairs}) > 1] or ["method"]
    fig, ax = plt.subplots(figsize=(7.5, 2.4 + 0.45 * len(pairs)))
    rng = np.random.default_rng(0)  # vertical jitter of the dots only
    for i, p in enumerate(pairs):
        y = len(pairs) - 1 - i
        ax.scatter(p["diffs"], y + rng.uniform(-0.15, 0.15, len(p["diffs"])), s=12, color="0.55", zorder=2)
        if p["n"] >= 2:
            ax.errorbar([p["mean"]], [y], xerr=[[p["mean"] - p["low"]], [p["high"] - p["mean"]]], fmt="o",
                        color="tab:red" if p["low"] > 0 else "tab:blue" if p["high"] < 0 else "black",
                        capsize=4, zorder=3)
        else:
            ax.plot([p["mean"]], [y], "o", color="black", zorder=3)
    ax.axvline(0, color="0.3", linewidth=1)
    ax.axvline(goal, color="tab:green", linestyle="--", linewidth=1, label=f"goal +{goal:.2f}")
    ax.set_yticks(range(len(pairs)))
    ax.set_yticklabels([" / ".join(str(p[a]) for a in shown) + f"  k={p['k']}  (n={p['n']})" for p in reversed(pairs)],
                       fontsize=8)
    ax.set_xlabel(f"pretrained − scratch, paired {metric} (dots: seeds; bar: mean and 95 % CI)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_ylim(-0.6, len(pairs) - 0.4)
    ends = [v for p in pairs if p["n"] >= 2 for v in (p["low"], p["high"])]
    ax.set_xlim(*interval_limits([d for p in pairs for d in p["diffs"]] + ends + [goal]))
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_paired(rows: list[dict], path: Path, metric: str = "dice", title: str = "", goal: float = 0.05) -> list[dict]:
    """A forest plot of :func:`paired_differences`: one row per pretrained setting × k, each seed's
    difference to scratch as a dot, the mean as a bar with its 95 % CI, lines at 0 and at +``goal``; the
    x-axis spans every dot, every interval, 0 and the goal (:func:`interval_limits`), however wide a CI
    from few seeds is. Returns the pairs it drew (none: no file)."""
    pairs = [p for p in paired_differences(rows, metric) if p["n"] > 0]
    if pairs:
        _save(paired_figure(pairs, metric, title, goal), path, dpi=100)
    return pairs


def run_differences_figure(stems: list[str], diffs: list[float], ci: dict, names: tuple[str, str],
                           metric: str = "dice"):
    """Paired differences A − B of two runs on the same test images: one dot per image (sorted, coloured by
    which run is ahead), the mean with its 95 % t-interval as a band, and 0 marked; the x-axis spans every
    dot, the interval and 0 (:func:`interval_limits`). ``ci``: ``mean``, ``low``, ``high``, ``n`` of
    :func:`labeldiff.study.stats.paired_ci`. Returned, not saved."""
    plt = _pyplot()
    na, nb = names
    order = sorted(range(len(diffs)), key=lambda i: diffs[i])
    n = len(order)
    fig, ax = plt.subplots(figsize=(7.5, min(2.6 + 0.2 * n, 14)), layout="constrained")
    ys = np.arange(n)
    d = np.array([diffs[i] for i in order])
    colours = np.where(d > 0, "tab:red", np.where(d < 0, "tab:blue", "0.5"))
    if ci["n"] >= 2:
        ax.axvspan(ci["low"], ci["high"], color="0.85", zorder=0, label=f"95 % CI [{ci['low']:+.3f}, {ci['high']:+.3f}]")
    if ci["n"] >= 1:
        ax.axvline(ci["mean"], color="black", linewidth=1.5, zorder=1, label=f"mean {ci['mean']:+.3f}")
    ax.axvline(0, color="0.2", linewidth=1, linestyle="--", zorder=1, label="0: no difference")
    ax.scatter(d, ys, c=list(colours), s=18, zorder=3)
    ax.set_yticks(ys)
    ax.set_yticklabels([stems[i][:28] for i in order] if n <= 60 else [""] * n, fontsize=6 if n > 30 else 7)
    ax.set_ylim(-0.8, n - 0.2)
    ax.set_xlim(*interval_limits(list(d) + [ci["low"], ci["high"], ci["mean"]]))
    ax.set_ylabel(f"test images (sorted; red: {na} ahead, blue: {nb} ahead)", fontsize=8)
    ax.set_xlabel(f"{na} − {nb}, per-image {metric}")
    ax.grid(axis="x", alpha=0.3)
    import textwrap

    fig.suptitle(textwrap.fill(f"{na} − {nb} on {n} test images: {na} ahead on {(d > 0).sum()}, {nb} on "
                               f"{(d < 0).sum()}", width=85), fontsize=10)
    fig.legend(fontsize=8, loc="outside lower center", ncol=3, frameon=False)
    return fig


def plot_overlays(images: list[dict], predictions: dict[str, list[np.ndarray]], path: Path, title: str = "",
                  class_names: list[str] | None = None, num_classes: int = 2, ignore_index: int | None = None) -> None:
    """Rows: ``images`` (dicts with ``name``, ``image [C,H,W]``, ``target [H,W]``); columns: image | ground
    truth (class colours) | one prediction per entry of ``predictions`` (label → one mask per image), each
    pixel coloured by its outcome against the ground truth and captioned with that image's foreground Dice
    (:mod:`labeldiff.evaluate.overlays`, as ``labeldiff evaluate`` draws them); a legend names the colours."""
    from labeldiff.evaluate.metrics import confusion_stats, dice_from_stats
    from labeldiff.evaluate.overlays import caption, outcome_legend, outcome_overlay, panel_figure
    from labeldiff.evaluate.report import overlay, save_figure, to_rgb

    grid = []
    for i, im in enumerate(images):
        row = [(caption(im["name"], None), to_rgb(im["image"])), ("ground truth", overlay(im["image"], im["target"]))]
        for label, preds in predictions.items():
            dice = dice_from_stats(confusion_stats(preds[i], im["target"], num_classes, ignore_index))[1:]
            fg = float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan")
            row.append((caption(label, fg), outcome_overlay(im["image"], preds[i], im["target"], ignore_index)))
        grid.append(row)
    masks = [im["target"] for im in images] + [m for preds in predictions.values() for m in preds]
    save_figure(panel_figure(grid, title, lambda fig: outcome_legend(fig, num_classes, class_names, masks)), path,
                dpi=90)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int, rect: tuple | None = None) -> None:
    fig.tight_layout(rect=rect)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
