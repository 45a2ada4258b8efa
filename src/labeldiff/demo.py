"""``labeldiff demo``: the whole story on real data that ships inside a PyPI wheel, run as a study.

The demo is the example study ``demo`` (``labeldiff/examples/demo.yaml``) run by the study runner: its
options (steps, seeds, k, precision) are applied to that file, which is written into the demo folder and
run there; the demo then adds a short report (``report/``): the table below, a bar chart, overlays and the
first pretrained run's prediction of the whole volume as a NIfTI.

Data: the MNI ICBM152 2009c nonlinear symmetric template (T1 volume, grey- and white-matter
probability maps) bundled with nilearn (BSD-3) under ``nilearn/datasets/data/``. The maps are
thresholded at 0.5 into 3 classes (0 background/CSF, 1 grey matter, 2 white matter) and written with
the T1 as an nnU-Net v2 raw dataset (NIfTI, float intensities), which labeldiff reads as volumes:
axial slices along the RAS z axis, each volume clipped to its 0.5 / 99.5 percentiles, resized to
64². Pretraining (DDPM) sees every slice outside the test slab without labels; fine-tuning
(pretrained and from scratch, identical schedules) sees k labeled slices of the lower slab; both are
evaluated on the disjoint upper slab, which pretraining never read — per slice (2D Dice) and as a 3D
slab (Dice, HD95, NSD), and the first pretrained run writes its label volume as a NIfTI.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from labeldiff.data.mni152 import CASE, CLASS_NAMES, build_brain_dataset  # noqa: F401  (the demo's data)


def test_slab(split: dict) -> tuple[int, int]:
    """First and last slice index (along z) of the test slab, from its stems ``mni152_zNNNN``."""
    idx = [int(s.rsplit("_z", 1)[1]) for s in split["test"]]
    return min(idx), max(idx)


def demo_study(pretrain_steps: int | None = None, finetune_steps: int | None = None, seeds: int | None = None,
               labels: int = 2, precision: str = "auto", size: int | None = None) -> dict:
    """The example study ``demo`` with the demo's options applied (None: the study's own value)."""
    from labeldiff.config import read_yaml
    from labeldiff.examples import find

    study = read_yaml(find("demo"))
    method, ft = study["methods"][0]["overrides"], study["finetune"]["overrides"]
    if pretrain_steps is not None:
        method["train.steps"] = pretrain_steps
    if finetune_steps is not None:
        ft["train.steps"] = ft["train.checkpoint_every"] = finetune_steps
    if seeds is not None:
        study["seeds"] = list(range(seeds))
    study["labels"] = [labels]
    if size is not None:
        study["data"]["size"] = size
    method["train.precision"] = ft["train.precision"] = precision
    return study


def run_demo(out: Path, pretrain_steps: int | None = None, finetune_steps: int | None = None,
             seeds: int | None = None, labels: int = 2, overwrite: bool = False, precision: str = "auto",
             size: int | None = None) -> dict:
    """Run the demo study into ``out`` (a run folder: ``--overwrite`` replaces only a demo) and write its
    report; returns the summary :func:`demo_markdown` prints."""
    import yaml

    from labeldiff.checkpoint import prepare_run_dir, release_run_dir
    from labeldiff.runtime import precision_name, resolve_device, resolve_precision, threads_summary
    from labeldiff.study.runner import run_study

    t0 = time.time()
    out = prepare_run_dir(Path(out), overwrite=overwrite, resume=False)
    try:
        study = demo_study(pretrain_steps, finetune_steps, seeds, labels, precision, size)
        (out / "demo.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
        used = precision_name(resolve_precision(precision, resolve_device("auto")))
        print(f"demo: the example study `demo` ({out / 'demo.yaml'}), training in {used} (--precision {precision}) "
              f"with {threads_summary()} (set OMP_NUM_THREADS to change); evaluation in fp32")
        rows = run_study(out / "demo.yaml", out)
        return demo_report(out, rows, study, used, time.time() - t0)
    finally:
        release_run_dir(out)


def demo_report(out: Path, rows: list[dict], study: dict, precision: str, seconds: float) -> dict:
    """``out/report/``: the demo's table (2D and 3D scores of pretrained and scratch over the seeds), a bar
    chart, the first seed's overlays and the first pretrained run's prediction of the whole volume."""
    from labeldiff.evaluate.report import bar_chart
    from labeldiff.evaluate.volume import run_predict_volumes
    from labeldiff.runtime import threads_summary

    arms = {"pretrained": [r for r in rows if r["strategy"] == "full"],
            "scratch": [r for r in rows if r["strategy"] == "scratch"]}
    table = {name: summarize_rows(sorted(rs, key=lambda r: int(r["seed"]))) for name, rs in arms.items()}
    report = out / "report"
    report.mkdir(exist_ok=True)
    first = {name: min(rs, key=lambda r: int(r["seed"]))["cell"] for name, rs in arms.items()}
    data = out / "data" / "brain-demo"
    run_predict_volumes(out / "cells" / first["pretrained"] / "run", data / "imagesTr" / f"{CASE}_0000.nii.gz",
                        report / "prediction", overwrite=True)  # the whole volume, on the template's grid
    for name, cell in first.items():
        shutil.copy(out / "cells" / cell / "eval" / "overlays.png", report / f"overlays_{name}.png")
        shutil.copy(out / "cells" / cell / "eval" / "volume" / "overlays" / f"{CASE}.png", report / f"slab_{name}.png")
    seeds = len(study["seeds"])
    bar_chart({n: (table[n]["dice"]["mean"], table[n]["dice"]["std"]) for n in table}, report / "dice.png",
              title=f"MNI152 brain slices, k={study['labels'][0]}, {seeds} seeds: foreground Dice on the test slab")
    from labeldiff.data.folders import VolumeFolder

    n_pre = len(VolumeFolder(data, axis=2).stems(None)) - len(json.loads((data / "split.json").read_text())["test"])
    summary = {"labels": study["labels"][0], "seeds": seeds,
               "pretrain_steps": study["methods"][0]["overrides"]["train.steps"],
               "finetune_steps": study["finetune"]["overrides"]["train.steps"], "pretrain_slices": n_pre,
               "precision": precision, "threads": threads_summary(), "wall_time_s": round(seconds, 1),
               "results": table}
    (report / "metrics.json").write_text(json.dumps(summary, indent=2))
    md = demo_markdown(summary)
    (report / "summary.md").write_text(md)
    print("\n" + md)
    print(f"report: {report} (summary.md, metrics.json, dice.png, overlays_*.png, slab_*.png, prediction/); the "
          f"study's own pages: {out}/results.md, paired.md, verdict.md; {seconds / 60:.1f} min")
    print(f"next: run it on your own images — docs/getting-started.md; or the study on more seeds: labeldiff study "
          f"{out / 'demo.yaml'} --out {out}")
    return summary


def mean_std(values: list[float | None]) -> dict:
    """Mean ± sample std over the defined values (an HD95 is undefined when a class is predicted nowhere),
    and how many were undefined."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return {"mean": float(v.mean()) if len(v) else None, "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "undefined": len(values) - len(v)}


def summarize_rows(rows: list[dict]) -> dict:
    """One arm's study rows (one per seed): 2D Dice / IoU (mean over test slices and foreground classes)
    and the 3D slab's Dice, HD95 and NSD, as mean ± sample std over seeds; per-class means."""
    def num(r: dict, key: str) -> float | None:
        v = r.get(key)
        return None if v in (None, "") else float(v)

    dice = np.array([num(r, "dice") for r in rows])
    return {"dice": {**mean_std(list(dice)), "per_seed": dice.round(4).tolist()},
            "iou": mean_std([num(r, "iou") for r in rows]),
            "dice_per_class": {c: float(np.mean([num(r, f"dice_{i}") for r in rows])) for i, c in enumerate(CLASS_NAMES)},
            "dice_3d": mean_std([num(r, "dice_3d") for r in rows]),
            "hd95_mm": mean_std([num(r, "hd95_mm") for r in rows]),
            "nsd": mean_std([num(r, "nsd") for r in rows])}


def demo_markdown(s: dict) -> str:
    def ms(r: dict, key: str, f: str = ".3f") -> str:
        m = r[key]
        if m["mean"] is None:
            return "undefined"
        return f"{m['mean']:{f}} ± {m['std']:{f}}" + (f" ({m['undefined']} undefined)" if m.get("undefined") else "")

    lines = [f"# labeldiff demo: MNI152 brain volume, k = {s['labels']} labeled axial slices, {s['seeds']} seeds",
             "", f"DDPM pretraining {s['pretrain_steps']} steps on the {s['pretrain_slices']} slices outside the test "
             f"slab; fine-tuning {s['finetune_steps']} steps per run; training in {s['precision']} with "
             f"{s['threads']}; wall time {s['wall_time_s'] / 60:.1f} min.", "",
             "| init | Dice 2D (GM+WM mean) | IoU 2D | Dice GM | Dice WM | 3D slab Dice | HD95 (mm) | NSD@2mm "
             "| Dice 2D per seed |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in s["results"].items():
        lines.append(f"| {name} | {ms(r, 'dice')} | {ms(r, 'iou')} | {r['dice_per_class']['grey matter']:.3f} | "
                     f"{r['dice_per_class']['white matter']:.3f} | {ms(r, 'dice_3d')} | {ms(r, 'hd95_mm', '.1f')} | "
                     f"{ms(r, 'nsd')} | {r['dice']['per_seed']} |")
    lines += ["", "Dice 2D: per test slice, mean over slices, then over the two foreground classes. 3D slab: the "
              "test slab's label volume on the template's 1 mm grid, Dice / HD95 / NSD per class (MONAI), mean "
              "over GM and WM. Mean ± sample std over seeds. The first pretrained run's prediction of the whole "
              "volume is `prediction/mni152.nii.gz` (the input's shape and affine)."]
    return "\n".join(lines) + "\n"
