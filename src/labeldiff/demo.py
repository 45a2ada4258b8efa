"""``labeldiff demo``: the whole story on real data that ships inside a PyPI wheel.

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

from labeldiff.config import DataConfig, ModelConfig, RunConfig, TrainConfig, TransferConfig
from labeldiff.errors import SetupError

CLASS_NAMES = ["background/CSF", "grey matter", "white matter"]
# Sized so that the whole demo takes ≤ 10 min on 2 cores whichever precision the CPU gives: the time
# is all in the network's forward and backward (data, corruption, AdamW and EMA are ~1 % of a step), so
# the UNet is (16, 32, 64), 3× faster than the recipes' (32, 64, 128), and the segmentation head is 32
# wide (its two full-resolution 3×3 convs at the default 128 cost more than this backbone).
DEMO_CHANNELS = (16, 32, 64)
DEMO_HEAD_HIDDEN = 32
DEMO_PRETRAIN_STEPS = 350
DEMO_FINETUNE_STEPS = 150
DEMO_FINETUNE_BATCH = 4  # k = 2 slices × 2 flips: a batch of 8 held each variant twice
DEMO_SEEDS = 3
DEMO_SIZE = 64


def template_files() -> dict[str, Path]:
    """Paths of the MNI152 files inside the installed nilearn package (no download)."""
    import nilearn

    root = Path(nilearn.__file__).parent / "datasets" / "data"
    files = {k: root / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SetupError(f"nilearn is installed but lacks {missing[0]}; reinstall it with `pip install nilearn`")
    return files


CASE = "mni152"
TRAIN_FRACTION, GAP = 0.4, 4


def build_brain_dataset(out: Path) -> Path:
    """Write the template as an nnU-Net v2 raw dataset (``imagesTr/mni152_0000.nii.gz``,
    ``labelsTr/mni152.nii.gz``, ``dataset.json``) with a ``split.json`` of two axial slabs: the lower
    40 % of the labeled slices train, the rest after a gap of 4 test."""
    import nibabel as nib

    from labeldiff.checkpoint import atomic_write_text
    from labeldiff.data.splits import write_split

    files = template_files()
    gm = np.asarray(nib.load(str(files["gm"])).dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(nib.load(str(files["wm"])).dataobj, dtype=np.float32) / 255.0
    labels = np.zeros(gm.shape, dtype=np.uint8)
    labels[(gm >= 0.5) & (gm >= wm)] = 1
    labels[(wm >= 0.5) & (wm > gm)] = 2
    t1 = nib.load(str(files["t1"]))
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj, dtype=np.float32), t1.affine), str(out / "imagesTr" / f"{CASE}_0000.nii.gz"))
    nib.save(nib.Nifti1Image(labels, t1.affine), str(out / "labelsTr" / f"{CASE}.nii.gz"))
    atomic_write_text(out / "dataset.json", json.dumps({
        "name": "MNI ICBM152 2009c (nilearn, BSD-3)", "channel_names": {"0": "T1"},
        "labels": {name: i for i, name in enumerate(CLASS_NAMES)}, "numTraining": 1, "file_ending": ".nii.gz"},
        indent=2))
    write_split(out, out / "split.json", slab_train=TRAIN_FRACTION, gap=GAP, axis=2, overwrite=True)
    return out


def test_slab(split: dict) -> tuple[int, int]:
    """First and last slice index (along z) of the test slab, from its stems ``mni152_zNNNN``."""
    idx = [int(s.rsplit("_z", 1)[1]) for s in split["test"]]
    return min(idx), max(idx)


def demo_configs(data: Path, pretrain_steps: int, finetune_steps: int, size: int = DEMO_SIZE) -> tuple[RunConfig, RunConfig]:
    model = ModelConfig(in_channels=1, channels=DEMO_CHANNELS, num_res_blocks=1,
                        attention_levels=(False,) * len(DEMO_CHANNELS), norm_num_groups=8, num_head_channels=16)
    dcfg = DataConfig(path=str(data), size=size, mode="resize", channels=1, axis=2,
                      intensity={"scheme": "percentile"})
    pre = RunConfig(kind="pretrain", model=model, data=dcfg,
                    train=TrainConfig(steps=pretrain_steps, batch_size=16, lr=1e-3, warmup_steps=100,
                                      ema_decay=0.999, checkpoint_every=500))
    ft = RunConfig(kind="segmentation", model=model, data=DataConfig(**{**dcfg.__dict__}),
                   train=TrainConfig(steps=finetune_steps, batch_size=DEMO_FINETUNE_BATCH, lr=2e-4, warmup_steps=20,
                                     ema_decay=0.0, checkpoint_every=finetune_steps),
                   # no augmentation: measured at this setting (research/studies/demo_protocol.yaml, 20 seeds), strong
                   # augmentation cost the pretrained network 0.122 Dice at 150 steps; random slices (typical
                   # picks were +0.045, CI containing 0): research/notebook/demo.md.
                   transfer=TransferConfig(labels=2, head_hidden=DEMO_HEAD_HIDDEN, augment="none"))
    return pre, ft


def run_demo(out: Path, pretrain_steps: int | None = None, finetune_steps: int | None = None,
             seeds: int | None = None, labels: int = 2, overwrite: bool = False, precision: str = "auto",
             size: int = DEMO_SIZE) -> dict:
    from labeldiff.checkpoint import prepare_run_dir, release_run_dir

    pretrain_steps = pretrain_steps or DEMO_PRETRAIN_STEPS
    finetune_steps = finetune_steps or DEMO_FINETUNE_STEPS
    seeds = seeds or DEMO_SEEDS
    t0 = time.time()
    out = prepare_run_dir(Path(out), overwrite=overwrite, resume=False)
    try:
        return _demo(out, pretrain_steps, finetune_steps, seeds, labels, precision, size, t0)
    finally:
        release_run_dir(out)


def _demo(out: Path, pretrain_steps: int, finetune_steps: int, seeds: int, labels: int, precision: str, size: int,
          t0: float) -> dict:
    from labeldiff.data.folders import VolumeFolder
    from labeldiff.evaluate.report import bar_chart
    from labeldiff.evaluate.run import run_evaluate
    from labeldiff.evaluate.volume import run_evaluate_volumes, run_predict_volumes
    from labeldiff.pretrain.run import run_pretrain
    from labeldiff.runtime import precision_name, resolve_device, resolve_precision, threads_summary
    from labeldiff.transfer.run import run_transfer

    print(f"[1/4] writing the MNI152 template as an nnU-Net v2 raw dataset (NIfTI) → {out / 'data'}")
    data = build_brain_dataset(out / "data")
    splits = json.loads((data / "split.json").read_text())
    slab = test_slab(splits)
    n_all = len(VolumeFolder(data, axis=2).stems(None))
    print(f"      {n_all} axial slices; labeled slices: train slab {len(splits['train'])}, test slab "
          f"{len(splits['test'])} (z = {slab[0]}–{slab[1]})")
    pre_cfg, ft_cfg = demo_configs(data, pretrain_steps, finetune_steps, size)
    pre_cfg.train.precision = ft_cfg.train.precision = precision
    device = resolve_device(pre_cfg.train.device)
    used = precision_name(resolve_precision(precision, device))
    print(f"      training on {device} in {used} (--precision {precision}) with {threads_summary()} "
          f"(set OMP_NUM_THREADS to change); evaluation in fp32")
    n_pre = n_all - len(splits["test"])
    print(f"[2/4] DDPM pretraining on the {n_pre} slices outside the test slab, no labels ({pretrain_steps} steps)")
    run_pretrain(pre_cfg, out / "pretrain")
    results: dict[str, list[dict]] = {"pretrained": [], "scratch": []}
    print(f"[3/4] fine-tuning with k={labels} labeled slices, {seeds} seeds, pretrained vs scratch")
    for seed in range(seeds):
        for name in ("pretrained", "scratch"):
            cfg = RunConfig.from_dict(ft_cfg.to_dict())
            cfg.train.seed = seed
            cfg.transfer.labels = labels
            cfg.transfer.pretrained = str(out / "pretrain")
            cfg.transfer.strategy = "full" if name == "pretrained" else "scratch"
            run_dir = out / "runs" / f"{name}_seed{seed}"
            run_transfer(cfg, run_dir)
            scores = run_evaluate(run_dir, run_dir / "eval_test", split="test")
            scores["volume"] = run_evaluate_volumes(run_dir, data, run_dir / "eval_slab", split="train", slab=slab)
            results[name].append(scores)
    print("[4/4] report")
    table = summarize_demo(results)
    (out / "report").mkdir(exist_ok=True)
    run_predict_volumes(out / "runs" / "pretrained_seed0", data / "imagesTr" / f"{CASE}_0000.nii.gz",
                        out / "report" / "prediction")  # the whole volume, on the template's grid
    for name in results:
        src = out / "runs" / f"{name}_seed0" / "eval_test" / "overlays.png"
        shutil.copy(src, out / "report" / f"overlays_{name}.png")
        shutil.copy(out / "runs" / f"{name}_seed0" / "eval_slab" / "overlays" / f"{CASE}.png",
                    out / "report" / f"slab_{name}.png")
    bar_chart({n: (table[n]["dice"]["mean"], table[n]["dice"]["std"]) for n in table}, out / "report" / "dice.png",
              title=f"MNI152 brain slices, k={labels}, {seeds} seeds: foreground Dice on the test slab")
    elapsed = time.time() - t0
    summary = {"labels": labels, "seeds": seeds, "pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps,
               "pretrain_slices": n_pre, "precision": used, "threads": threads_summary(),
               "wall_time_s": round(elapsed, 1), "results": table}
    (out / "report" / "metrics.json").write_text(json.dumps(summary, indent=2))
    md = demo_markdown(summary)
    (out / "report" / "summary.md").write_text(md)
    print("\n" + md)
    print(f"report: {out / 'report'} (summary.md, metrics.json, dice.png, overlays_*.png, slab_*.png, "
          f"prediction/); {elapsed / 60:.1f} min")
    return summary


def mean_std(values: list[float | None]) -> dict:
    """Mean ± sample std over the defined values (an HD95 is undefined when a class is predicted nowhere),
    and how many were undefined."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return {"mean": float(v.mean()) if len(v) else None, "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "undefined": len(values) - len(v)}


def summarize_demo(results: dict[str, list[dict]]) -> dict:
    """Per init: 2D Dice / IoU (mean over test slices and foreground classes) and the 3D slab's Dice,
    HD95 and NSD, as mean ± sample std over seeds; per-class means."""
    from labeldiff.evaluate.volume import class_mean

    table = {}
    for name, runs in results.items():
        dice = np.array([r["dice"]["mean"] for r in runs])
        per_class = {c: float(np.mean([list(r["dice"]["per_class"].values())[i] for r in runs]))
                     for i, c in enumerate(CLASS_NAMES)}
        vol = [r["volume"] for r in runs]
        table[name] = {"dice": {**mean_std(dice), "per_seed": dice.round(4).tolist()},
                       "iou": mean_std([r["iou"]["mean"] for r in runs]),
                       "dice_per_class": per_class,
                       "dice_3d": mean_std([v["dice"] for v in vol]),
                       "hd95_mm": mean_std([class_mean(v["per_class"], "hd95_mm") for v in vol]),
                       "nsd": mean_std([class_mean(v["per_class"], "nsd") for v in vol])}
    return table


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
