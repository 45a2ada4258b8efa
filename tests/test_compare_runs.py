"""``labeldiff compare RUN_A RUN_B``: two tiny runs scored on the same 8 generated test images, their
per-image differences against a hand computation, the plot's axis, and the refusals (another split,
another dataset, a study against a run)."""
from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_labeled_dataset
from scipy import stats

from labeldiff.cli import main
from labeldiff.study.paired_runs import open_evaluation, paired_runs
from labeldiff.study.plots import run_differences_figure

TRAIN = ["--size", "16", "--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--channels", "3",
         "--unet-channels", "8,16", "--attention", "0,0", "--head-hidden", "8", "--strategy", "scratch",
         "--labels", "2"]


def _error(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two scratch runs (12 and 3 steps, seeds 0 and 1) on a K = 2 dataset of 4 train / 8 test images."""
    root = tmp_path_factory.mktemp("compare")
    data = write_labeled_dataset(root / "data", n=12, k=2, n_train=4)
    recipe = root / "tiny.yaml"
    recipe.write_text("model:\n  num_head_channels: 8\n  num_res_blocks: 1\ntrain:\n  warmup_steps: 1\n")
    for name, steps, seed in (("a", 12, 0), ("b", 3, 1)):
        assert main(["finetune", "--data", str(data), "--out", str(root / name), "--steps", str(steps),
                     "--seed", str(seed), "--recipe", str(recipe), *TRAIN]) == 0
    return root, data


def _dice(folder: Path) -> dict[str, float]:
    with open(folder / "per_image.csv", newline="") as f:
        return {r["stem"]: float(r["dice_1"]) for r in csv.DictReader(f)}


@pytest.mark.slow
def test_compare_two_runs_against_a_hand_computation(runs, capsys):
    """compare evaluates a run that has no eval_test/ yet, then prints mean Δ, the 95 % t-interval and the
    counts that a hand computation from the two per_image.csv gives; --out writes the table and the plot."""
    root, data = runs
    assert not (root / "b" / "eval_test").exists()
    assert main(["evaluate", "--model", str(root / "a"), "--device", "cpu"]) == 0
    capsys.readouterr()
    out = root / "report" / "a_vs_b.md"
    assert main(["compare", str(root / "a"), str(root / "b"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{root / 'b'} has no eval_test/ yet: evaluating it" in printed
    a, b = _dice(root / "a" / "eval_test"), _dice(root / "b" / "eval_test")
    test = json.loads((data / "split.json").read_text())["test"]
    assert sorted(a) == sorted(b) == sorted(test)
    d = np.array([a[s] - b[s] for s in a])  # K = 2: the foreground Dice is dice_1
    assert np.ptp(d) > 0  # the two runs differ image by image: a real interval
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    mean = d.mean()
    row = (f"| {np.mean(list(a.values())):.3f} | {np.mean(list(b.values())):.3f} | {mean:+.3f} | "
           f"[{mean - half:+.3f}, {mean + half:+.3f}] |")
    assert row in printed, (row, printed)
    assert f"| {(d > 0).sum()} | {(d < 0).sum()} | {(d == 0).sum()} | {len(d)} |" in printed
    assert out.read_text() in printed
    worst = min(a, key=lambda s: a[s] - b[s])  # the per-image table is sorted by Δ
    assert f"| {worst} | {a[worst]:.3f} | {b[worst]:.3f} | {a[worst] - b[worst]:+.3f} |" in out.read_text()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same through the evaluation folders themselves, and the library's numbers
    p = paired_runs(open_evaluation(root / "a" / "eval_test"), open_evaluation(root / "b" / "eval_test"))
    assert p["mean"] == pytest.approx(mean) and p["low"] == pytest.approx(mean - half)
    assert p["n"] == len(d) and p["ahead_a"] == (d > 0).sum()


@pytest.mark.slow
def test_compare_page_holds_the_interval_and_the_images_each_run_is_most_ahead_on(runs, capsys):
    """--out FILE.md also writes FILE.html: the summary row with its interval, the plot, and the 3 images where
    A is most behind and the 3 where it is most ahead, each predicted again by both runs — the predictions the
    evaluations scored (their Dice is per_image.csv's) — with nothing loaded from the network."""
    from test_report_html import external_references

    from labeldiff.evaluate.metrics import confusion_stats, dice_from_stats
    from labeldiff.study.html_report import extreme_images

    root, _ = runs
    out = root / "page" / "a_vs_b.md"
    assert main(["compare", str(root / "a"), str(root / "b"), "--out", str(out)]) == 0
    page = out.with_suffix(".html")
    assert f"and {page} (" in capsys.readouterr().out
    text = page.read_text()
    assert not external_references(text), external_references(text)
    a, b = open_evaluation(root / "a"), open_evaluation(root / "b")
    p = paired_runs(a, b)
    assert f'<td class="num">{p["mean"]:+.3f}</td><td>[{p["low"]:+.3f}, {p["high"]:+.3f}]</td>' in text
    assert "a_vs_b.png: the per-image differences" in text
    order = sorted(range(p["n"]), key=lambda i: p["diffs"][i])
    shown = re.findall(r"<h3>(\w+): Δ ([-+][\d.]+)</h3>", text)
    assert [s for s, _ in shown] == [p["stems"][i] for i in order[:3] + order[-3:]]
    assert text.count('<img class="plot" src="data:image/png;base64,') == 1
    assert text.count('<img src="data:image/') == 4 * 6  # image, truth, A, B per image
    images, note = extreme_images(a, b, p)
    assert note == "" and [im["stem"] for im in images] == [s for s, _ in shown]
    for im in images:
        for pred, want in ((im["pred_a"], im["a"]), (im["pred_b"], im["b"])):
            dice = dice_from_stats(confusion_stats(pred, im["target"], 2))[1]
            assert dice == pytest.approx(want, abs=1e-6)


def test_compare_plot_spans_every_image_the_interval_and_zero():
    """The compare plot's x-axis holds every per-image difference, the whole interval and 0, even when all
    differences lie on one side of 0 far from it, or the interval is wider than the dots."""
    for diffs, ci in (([0.30, 0.32, 0.35], {"mean": 0.323, "low": 0.26, "high": 0.39, "n": 3}),
                      ([-0.01, 0.06, 0.02], {"mean": 0.019, "low": -0.055, "high": 0.093, "n": 3})):
        fig = run_differences_figure(["x", "y", "z"], diffs, ci, ("A", "B"))
        lo, hi = fig.axes[0].get_xlim()
        assert lo < min(diffs + [ci["low"], 0]) and hi > max(diffs + [ci["high"], 0])
        assert any(list(line.get_xdata()) == [0, 0] for line in fig.axes[0].get_lines())  # 0 is marked
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        boxes = [fig._suptitle.get_window_extent(r), fig.legends[0].get_window_extent(r),
                 fig.axes[0].xaxis.label.get_window_extent(r), fig.axes[0].get_window_extent(r)]
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])  # title, legend, axis apart


@pytest.mark.slow
def test_compare_refuses_runs_scored_on_other_test_images(runs, capsys):
    """Another split file whose test split holds other images is refused, naming the images on each side;
    a copy of the same split under another name is paired, with a note; another dataset is refused."""
    root, data = runs
    split = json.loads((data / "split.json").read_text())
    moved = split["test"][0]
    other = {"train": split["train"] + [moved], "test": split["test"][1:]}
    (root / "other_split.json").write_text(json.dumps(other))
    for name in ("a", "b"):
        if not (root / name / "eval_test").exists():
            assert main(["evaluate", "--model", str(root / name), "--device", "cpu"]) == 0
    assert main(["evaluate", "--model", str(root / "b"), "--split-file", str(root / "other_split.json"),
                 "--out", str(root / "b_other"), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["compare", str(root / "a"), str(root / "b_other")]) == 2
    line = _error(capsys)
    assert "scored different test images" in line and f"only in A: {moved}" in line and "only in B: none" in line
    assert f"split 'test' of {(data / 'split.json').resolve()}: 8" in line and "other_split.json: 7" in line
    assert f"`labeldiff evaluate --model RUN_B --split test --split-file {(data / 'split.json').resolve()}`" in line

    shutil.copy(data / "split.json", root / "same_split.json")
    (root / "same_split.json").write_text((data / "split.json").read_text() + "\n")  # other bytes, same images
    assert main(["evaluate", "--model", str(root / "b"), "--split-file", str(root / "same_split.json"),
                 "--out", str(root / "b_same"), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["compare", str(root / "a" / "eval_test"), str(root / "b_same")]) == 0
    assert "read different split files" in capsys.readouterr().out

    copy = root / "data_copy"
    shutil.copytree(data, copy)
    assert main(["evaluate", "--model", str(root / "b"), "--data", str(copy), "--out", str(root / "b_copy"),
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["compare", str(root / "a"), str(root / "b_copy")]) == 2
    line = _error(capsys)
    assert f"scored the dataset {data.resolve()}" in line and str(copy.resolve()) in line


def test_compare_says_what_each_form_expects(tmp_path, capsys):
    """A folder that is no run, evaluation or study, a run against a study, and a metric that is no column:
    one line each that says what to give."""
    from labeldiff.study.report import write_csv

    evaluation = tmp_path / "eval_test"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps({"dice": {"mean": 0.5, "per_class": {"0": 0.9, "1": 0.5}},
                                                         "data": str(tmp_path), "split": "test"}))
    (evaluation / "per_image.csv").write_text("stem,dice_0,dice_1,iou_0,iou_1\nx,0.9,0.5,0.8,0.3\ny,0.9,,0.8,\n")
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(evaluation), str(tmp_path / "empty")]) == 2
    line = _error(capsys)
    assert "is none of these" in line and "a run folder (config.json" in line and "a study folder (results.csv" in line
    write_csv([{"cell": "c0", "method": "m", "strategy": "full", "k": 1, "seed": 0, "stems": "a", "dice": 0.5}],
              tmp_path / "study" / "results.csv")
    assert main(["compare", str(tmp_path / "study"), str(evaluation)]) == 2
    assert "is a study and" in _error(capsys)
    assert main(["compare", str(evaluation), str(evaluation), "--metric", "hd95"]) == 2
    line = _error(capsys)
    assert "--metric hd95" in line and "dice_1" in line
    assert main(["compare", str(evaluation), str(evaluation), "--split", "val"]) == 2
    assert "--split picks a run folder's eval_<split>/" in _error(capsys)
    assert main(["compare", str(evaluation), str(evaluation), "--metric", "iou"]) == 0  # y has no IoU: left out
    out = capsys.readouterr().out
    assert "| +0.000 | n/a | n/a | 0 | 0 | 1 | 1 |" in out and "1 image(s) left out: no iou in one run" in out


def _evaluation(folder: Path, data: Path, dice: dict[str, float]) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"dice": {"mean": 0.5, "per_class": {"0": 0.9, "1": 0.5}},
                                                     "data": str(data), "split": "test"}))
    (folder / "per_image.csv").write_text("stem,dice_0,dice_1\n" + "".join(f"{s},0.9,{v}\n" for s, v in dice.items()))
    return folder


def test_compare_by_group_treats_each_video_as_one_observation(tmp_path, capsys):
    """Frames of one video move together: with the dataset's sequences.json (or --groups) the interval is
    also computed over the groups' mean differences (checked by hand), printed beside the per-image one;
    a test image with no group is refused by name; two studies take no --groups; the terminal shows the 5
    images most behind and most ahead, --out every image."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    stems = [f"f{i:02d}" for i in range(24)]
    video = {s: f"v{i // 6}" for i, s in enumerate(stems)}  # 4 videos of 6 frames
    shift = {"v0": 0.10, "v1": -0.04, "v2": 0.06, "v3": 0.00}  # the videos differ, their frames alike
    b = {s: float(rng.uniform(0.3, 0.6)) for s in stems}
    a = {s: b[s] + shift[video[s]] + float(rng.normal(0, 0.005)) for s in stems}
    ea, eb = _evaluation(tmp_path / "a", data, a), _evaluation(tmp_path / "b", data, b)
    (data / "sequences.json").write_text(json.dumps(video))
    assert main(["compare", str(ea), str(eb), "--names", "A,B"]) == 0
    printed = capsys.readouterr().out
    means = np.array([np.mean([a[s] - b[s] for s in stems if video[s] == v]) for v in ("v0", "v1", "v2", "v3")])
    half = stats.t.ppf(0.975, 3) * means.std(ddof=1) / 2
    assert f"by group: {means.mean():+.3f} [{means.mean() - half:+.3f}, {means.mean() + half:+.3f}] (95 % CI over 4 groups" \
        in printed
    d = np.array([a[s] - b[s] for s in stems])
    per_image_half = stats.t.ppf(0.975, 23) * d.std(ddof=1) / math.sqrt(24)
    assert half > 2 * per_image_half  # 24 alike frames pretend to be more sure than 4 videos can be
    assert f"of {data / 'sequences.json'}" in printed
    assert "the 5 most behind and the 5 most ahead of 24" in printed and "| … 14 more | | | |" in printed
    out = tmp_path / "a_vs_b.md"
    assert main(["compare", str(ea), str(eb), "--out", str(out)]) == 0
    capsys.readouterr()
    assert all(f"| {s} |" in out.read_text() for s in stems) and "more | | | |" not in out.read_text()
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({s: v for s, v in video.items() if s != "f03"}))
    assert main(["compare", str(ea), str(eb), "--groups", str(groups)]) == 2
    line = _error(capsys)
    assert "names no group for 1 scored image(s) (f03)" in line
    from labeldiff.study.report import write_csv

    for name in ("s1", "s2"):
        write_csv([{"cell": "c0", "method": "m", "strategy": "full", "k": 1, "seed": 0, "stems": "a", "dice": 0.5}],
                  tmp_path / name / "results.csv")
    assert main(["compare", str(tmp_path / "s1"), str(tmp_path / "s2"), "--groups", str(groups)]) == 2
    assert "leave --groups out" in _error(capsys)
