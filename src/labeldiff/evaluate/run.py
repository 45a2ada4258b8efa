"""``labeldiff evaluate`` and ``labeldiff predict``: each decides here whether its input is 2D images or
volumes and scores or predicts accordingly (volumes: :mod:`labeldiff.evaluate.volume`)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from labeldiff.checkpoint import atomic_write_text
from labeldiff.data import provenance
from labeldiff.data.folders import list_images, open_labeled
from labeldiff.data.guard import check_output_folder, refuse_existing
from labeldiff.data.io import DataError, check_decodes, read_image, write_mask
from labeldiff.data.nnunet import dataset_class_names, is_nnunet_raw
from labeldiff.data.validation import validate_samples
from labeldiff.errors import ConfigError
from labeldiff.evaluate.instances import aji_stats, per_image_columns, summarize_aji
from labeldiff.evaluate.metrics import dice_from_stats, iou_from_stats, summarize
from labeldiff.evaluate.predict import entropy_map, predict_and_score, predict_logits
from labeldiff.evaluate.overlays import Picker, check_named, overlay_grid, overlay_row, parse_choice
from labeldiff.evaluate.report import colorize, overlay, save_png, write_per_image_csv
from labeldiff.runs import open_segmenter
from labeldiff.runtime import INFERENCE_PRECISION


def evaluate(model_dir: Path, out: Path | None = None, data: str | Path | None = None, split: str | None = None, *,
             split_file: str | None = None, corruptions: list[str] | None = None, severities: list[int] | None = None,
             corruption_seed: int = 0, slab: tuple[int, int] | None = None, axis: int | None = None,
             intensity: str | None = None, hu_window: tuple[float, float] | None = None, device: str = "auto",
             precision: str = INFERENCE_PRECISION, tta: bool = False, overlays: str | None = None,
             overlay_count: int = 6, metrics: list[str] | None = None) -> dict:
    """``labeldiff evaluate``: score the run ``model_dir`` on ``split`` of the labeled dataset ``data`` (the
    one it trained on when not given) into ``out``; returns the metrics.

    An nnU-Net raw volume dataset as ``data`` is scored per case and class in 3D
    (:func:`~labeldiff.evaluate.volume.run_evaluate_volumes`; ``slab``, ``axis``, ``intensity`` and
    ``hu_window`` apply; ``out`` defaults to ``MODEL/eval_volumes_SPLIT``, ``split`` to ``test``); anything
    else image by image at the original mask resolution (:func:`run_evaluate`; ``split_file`` and the
    ``corruptions``, the ``overlays`` choice and the extra ``metrics`` apply; ``out`` defaults to
    ``MODEL/eval_SPLIT``). An option of the other kind is refused."""
    if data is not None and is_nnunet_raw(Path(data)):
        from labeldiff.evaluate.volume import run_evaluate_volumes

        if corruptions:
            raise ConfigError("--corruptions evaluates 2D image datasets only; volume datasets (nnU-Net raw) are not "
                              "supported yet: evaluate the volumes without it")
        if overlays is not None:
            raise ConfigError("--overlays chooses among 2D test images; a volume dataset's overlays are strips of "
                              "slices of each case: evaluate the volumes without it")
        if metrics:
            raise ConfigError(f"--metrics {','.join(metrics)} scores 2D images; a volume dataset is scored in 3D "
                              f"(Dice, HD95, NSD): evaluate the volumes without it")
        split = split or "test"
        return run_evaluate_volumes(model_dir, Path(data), out or Path(model_dir) / f"eval_volumes_{split}",
                                    split=split, axis=axis, intensity=intensity, hu_window=hu_window, slab=slab,
                                    device=device, precision=precision, tta=tta)
    if slab is not None:
        raise ConfigError("--slab applies to volume datasets (an nnU-Net raw folder as --data)")
    return run_evaluate(model_dir, out or Path(model_dir) / f"eval_{split or 'test'}", data=data, split=split,
                        device=device, split_file=split_file, tta=tta, precision=precision, corruptions=corruptions,
                        severities=severities, corruption_seed=corruption_seed, overlays=overlays,
                        overlay_count=overlay_count, metrics=metrics)


def run_evaluate(model_dir: Path, out: Path, data: str | None = None, split: str | None = None,
                 device: str = "auto", overlays: str | None = None, overlay_count: int = 6,
                 split_file: str | None = None, tta: bool = False,
                 precision: str = INFERENCE_PRECISION, corruptions: list[str] | None = None,
                 severities: list[int] | None = None, corruption_seed: int = 0,
                 metrics: list[str] | None = None, unlabeled_seen: bool = False, predictions: int = 0) -> dict:
    """Evaluate a fine-tuned run on a named split at the original mask resolution.

    Writes ``metrics.json`` (with ``test_images``: the dataset, split file and stems scored, which
    ``labeldiff compare`` pairs by), ``per_image.csv`` and ``overlays.png`` into ``out``. The overlays
    (:mod:`labeldiff.evaluate.overlays`) show ``overlay_count`` images chosen by ``overlays``: ``first``
    [default], ``worst`` or ``best`` by foreground Dice, ``all`` (every image also as
    ``out/overlays/<stem>.png``; the grid shows the first), or ``STEM,STEM,...``. ``precision``:
    fp32 by default, whatever the run trained with, so the numbers do not depend on the CPU.
    ``corruptions`` (names of :mod:`labeldiff.evaluate.corruptions`): then evaluate again on each
    corrupted copy of the images at each of ``severities`` [1..5] and write ``robustness.json``,
    ``robustness.csv`` and ``robustness.png``; their summary goes into ``metrics["robustness"]``.
    ``metrics``: scores besides Dice and IoU (:data:`~labeldiff.evaluate.instances.INSTANCE_METRICS`): ``aji``
    adds the Aggregated Jaccard Index of each image's connected components (:mod:`labeldiff.evaluate.instances`)
    to per_image.csv (``aji``, and ``aji_<c>`` per foreground class when K > 2) and its mean to
    ``metrics["aji"]``. ``unlabeled_seen``: score images that the run's pretraining read without their masks
    (a study's validation images, part of the train split pretraining reads); images the run itself trained
    on are refused all the same. ``predictions``: keep the first that many images' predictions, each as
    ``predictions/<stem>.png`` and ``predictions/uncertainty/<stem>.png`` (:func:`save_prediction`; a study's
    cells keep the first 8 for the overlay viewer of its ``report.html``).
    """
    model, cfg = open_segmenter(Path(model_dir), device)
    data_path = Path(data or cfg.data.path)
    split = split or cfg.data.test_split
    ds = open_labeled(cfg.data, data_path, split_file or (cfg.data.split_file if data is None else None))
    stems = ds.stems(split)
    refuse_trained_on(Path(model_dir), split, ds, stems, cfg.data.train_split, unlabeled_seen)
    how, named = parse_choice(overlays)
    check_named(named, stems, f"split {split!r} of {ds.root}")
    samples = ds.samples(stems)
    k = cfg.num_classes
    validate_samples(samples, k, hint=f"the run predicts {k} classes: evaluate it on data labeled with its classes")
    out = check_output_folder(Path(out))
    out.mkdir(parents=True, exist_ok=True)
    all_stats, objects, rows, picker = [], [], [], Picker(how, overlay_count, named)
    aji = "aji" in (metrics or ())
    ignore = ds.ignore_index
    scored = dataclasses.replace(cfg.data, ignore_index=ignore)  # a region of interest ignores its outside
    for i, (s, image, target, logits, pred, stats) in enumerate(predict_and_score(model, scored, samples, k, precision,
                                                                                  tta, desc=f"evaluate {split}")):
        all_stats.append(stats)
        if i < predictions:
            save_prediction(out / "predictions", s.stem, logits, pred, k)
        dice, iou = dice_from_stats(stats), iou_from_stats(stats)
        row = {"stem": s.stem}
        row.update({f"dice_{c}": round(float(dice[c]), 6) for c in range(k)})
        row.update({f"iou_{c}": round(float(iou[c]), 6) for c in range(k)})
        if aji:
            objects.append(aji_stats(pred, target, k, ignore))
            row.update(per_image_columns(objects[-1]))
        rows.append(row)
        fg = float(np.nanmean(dice[1:])) if np.any(np.isfinite(dice[1:])) else math.nan
        picker.offer({"name": s.stem, "image": image.numpy(), "target": target, "pred": pred, "dice": fg})
        if how == "all":
            save_png(overlay_row(image.numpy(), pred, target, k, ignore), out / "overlays" / f"{s.stem}.png")
    names = dataset_class_names(ds.root)  # dataset.json / classes.json names
    metrics = summarize(np.stack(all_stats), names)
    if aji:
        metrics["aji"] = summarize_aji(np.stack(objects), names)
    metrics.update({"model": str(model_dir), "data": str(data_path), "split": split, "tta": tta,
                    "precision": precision, "ignore_index": ignore, "roi": bool(getattr(ds, "has_roi", False)),
                    "num_classes": k, "test_images": provenance.scored(ds.root, ds.split_file, split, stems)})
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    from labeldiff.tracking import log_evaluation

    log_evaluation(Path(model_dir), {"dice": metrics["dice"], "iou": metrics["iou"],
                                     **({"aji": metrics["aji"]} if aji else {})}, step=cfg.train.steps)
    write_per_image_csv(rows, out / "per_image.csv")
    overlay_grid(picker.rows(), out / "overlays.png", k, class_names=names, ignore_index=ignore,
                 title=f"{Path(model_dir).name} on {split} ({len(samples)} images, mean foreground Dice "
                       f"{metrics['dice']['mean']:.3f}): {picker.describe()}")
    each = f", overlays/ (all {len(samples)}, one PNG each)" if how == "all" else ""
    if predictions:
        each += f", predictions/ (the first {min(predictions, len(samples))})"
    shown = [r["name"] for r in picker.rows()]
    objects_said = f", AJI {metrics['aji']['mean']:.4f}" if aji else ""
    print(f"{split}: {len(samples)} images, Dice {metrics['dice']['mean']:.4f} (foreground mean), "
          f"IoU {metrics['iou']['mean']:.4f}{objects_said}; wrote {out}/metrics.json, per_image.csv, overlays.png "
          f"({picker.describe()}: {', '.join(shown[:6])}{' …' if len(shown) > 6 else ''}){each}")
    if corruptions:
        from labeldiff.evaluate.robustness import run_robustness

        metrics["robustness"] = run_robustness(model, cfg, samples, metrics, out, corruptions, severities,
                                               seed=corruption_seed, precision=precision, tta=tta, class_names=names)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def save_prediction(folder: Path, stem: str, logits: torch.Tensor, pred: np.ndarray, num_classes: int) -> None:
    """Keep one image's prediction in ``folder``: ``<stem>.png``, the class ids (a palette PNG,
    :func:`~labeldiff.data.io.write_mask`), and ``uncertainty/<stem>.png``, the entropy of its class
    probabilities (:func:`~labeldiff.evaluate.predict.entropy_map`, 255 = log K)."""
    write_mask(pred, folder / f"{stem}.png", num_classes)
    save_png(entropy_map(logits), folder / "uncertainty" / f"{stem}.png")


def refuse_trained_on(model_dir: Path, split: str, ds, stems: list[str], train_split: str,
                      unlabeled_seen: bool = False) -> None:
    """Refuse to score images the run (or the run it was pretrained from) trained on: a split file that
    changed after training, or another dataset split over the same images. Scoring the run's own
    training split is allowed, with a note saying what the numbers are; with ``unlabeled_seen``, so are
    images its pretraining read without their masks."""
    from labeldiff.runs import RunFolder

    for how, rec in RunFolder.open(model_dir).trained_on():
        if unlabeled_seen and how == "was pretrained on" and not rec.get("labeled"):
            continue
        seen = provenance.leaked(rec, ds.root, stems)
        if not seen:
            continue
        if split == train_split:
            print(f"note: split {split!r} is the one {model_dir} trained on; {len(seen)} of its images were seen in "
                  f"training, so these scores are no test")
            return
        if how == "was trained on" or rec.get("labeled"):
            fix = "restore the split the run used, or train the run again on this split"
        else:
            fix = ("pretrain again with this split (its test images are left out by default), or with --include-test "
                   "if you mean the transductive protocol")
        raise DataError(f"split {split!r} of {ds.root} holds {len(seen)} image(s) that {model_dir} {how} "
                        f"({', '.join(seen[:3])}{', ...' if len(seen) > 3 else ''}){provenance.changed_split(rec)}; "
                        f"scores on them would not be a test: {fix}")


def overlapped(items: list, read, work, write, threads: int = 2) -> None:
    """``write(item, work(item, read(item)))`` for every item, in order of ``work``: with ``threads`` > 0 the
    next items are read and the last results written on worker threads while ``work`` (the network) runs on
    this one, at most ``threads + 1`` reads ahead and ``2 · threads`` writes behind; 0: one after the other.
    The results are the same either way; an error in any step is raised here."""
    if threads == 0:
        for item in items:
            write(item, work(item, read(item)))
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pending, writes, it = deque(), deque(), iter(items)
    with ThreadPoolExecutor(threads, thread_name_prefix="read") as readers, \
            ThreadPoolExecutor(threads, thread_name_prefix="write") as writers:
        def ahead() -> None:
            item = next(it, None)
            if item is not None:
                pending.append((item, readers.submit(read, item)))

        for _ in range(threads + 1):
            ahead()
        while pending:
            item, data = pending.popleft()
            data = data.result()
            ahead()
            writes.append(writers.submit(write, item, work(item, data)))
            while len(writes) > 2 * threads:
                writes.popleft().result()
        for w in writes:
            w.result()


def run_predict(model_dir: Path, inputs: Path, out: Path, device: str = "auto", tta: bool = False,
                precision: str = INFERENCE_PRECISION, axis: int | None = None, intensity: str | None = None,
                hu_window: tuple[float, float] | None = None, overwrite: bool = False,
                probabilities: bool = False, io_threads: int = 2) -> list[Path]:
    """Write ``<stem>.png`` (the class ids: a palette PNG up to 256 classes, coloured for viewers; 16-bit grey
    above, :func:`~labeldiff.data.io.write_mask`), ``overlays/<stem>.png`` and ``uncertainty/<stem>.png``;
    with ``probabilities`` also ``probabilities/class_<c>/<stem>.png`` per class c: its softmax probability
    as a 16-bit grey PNG (65535 = 1).

    Volumes (a NIfTI file, a DICOM series folder, an nnU-Net dataset or ``imagesTs/`` folder) go to
    :func:`labeldiff.evaluate.volume.run_predict_volumes` instead: one label NIfTI per case, on the
    input's grid, predicted slice by slice along ``axis`` after the ``intensity`` scheme.

    Nothing is written into the input folder or a dataset's image or mask folders
    (:func:`~labeldiff.data.guard.check_output_folder`), and no existing file is replaced unless
    ``overwrite``: both are refused before the first prediction.

    The uncertainty map is the entropy of the predicted class probabilities (for the probe: of the
    ensemble's mean probability), scaled so that 255 = log K (a uniform guess).

    ``io_threads`` threads read the next images and write the last results while the network predicts
    (:func:`overlapped`; 0: one after the other), so a GPU is not left waiting on PNG decoding and encoding.
    """
    from labeldiff.evaluate.volume import run_predict_volumes, volume_cases

    inputs = Path(inputs)
    out = check_output_folder(Path(out), reads=(inputs,))
    if volume_cases(inputs):
        if probabilities:
            raise ConfigError(f"--probabilities writes per-class PNG maps of 2D images; {inputs} holds volumes, "
                              f"which predict writes as label NIfTIs: leave --probabilities out")
        return run_predict_volumes(model_dir, inputs, out, axis=axis, intensity=intensity, hu_window=hu_window,
                                   device=device, tta=tta, precision=precision, overwrite=overwrite)
    model, cfg = open_segmenter(Path(model_dir), device)
    files = {inputs.stem: inputs} if inputs.is_file() else list_images(inputs / "images" if (inputs / "images").is_dir() else inputs)
    check_decodes(list(files.values()))  # a broken file stops here, before the output folder exists
    k = cfg.num_classes
    if k > 65536:
        raise DataError(f"{model_dir} predicts {k} classes; a PNG mask holds at most 65,536")
    maps = [f"probabilities/class_{c}" for c in range(k)] if probabilities else []
    refuse_existing([out / sub / f"{stem}.png" for stem in files for sub in ("", "overlays", "uncertainty", *maps)],
                    overwrite)
    written, kinds = [], []
    bar = tqdm(total=len(files), desc="predict", unit="img")

    def read(stem: str) -> torch.Tensor:
        return torch.from_numpy(read_image(files[stem], cfg.data.channels))

    def work(stem: str, image: torch.Tensor):
        return image, predict_logits(model, image, cfg.data, precision, tta=tta)

    def write(stem: str, result) -> None:
        image, logits = result
        pred = logits.argmax(0).numpy()
        probs = torch.softmax(logits, dim=0)
        kinds.append(write_mask(pred, out / f"{stem}.png", k))
        save_png(overlay(image.numpy(), pred), out / "overlays" / f"{stem}.png")
        save_png(entropy_map(logits), out / "uncertainty" / f"{stem}.png")
        for c, folder in enumerate(maps):
            save_png((probs[c].clamp(0, 1) * 65535).round().numpy().astype(np.uint16), out / folder / f"{stem}.png")
        bar.update(1)

    overlapped(list(files), read, work, write, io_threads)
    bar.close()
    written = [out / f"{stem}.png" for stem in files]
    kind = kinds[0] if kinds else ""
    extra = (f", and per-class probabilities (16-bit PNG, 65535 = 1) to {out / 'probabilities'}/class_0..{k - 1}"
             if probabilities else "")
    print(f"wrote {len(written)} masks ({kind}, pixel values = class ids 0..{k - 1}) to {out}, overlays to "
          f"{out / 'overlays'}, uncertainty maps (entropy, 255 = log K) to {out / 'uncertainty'}{extra}")
    return written


__all__ = ["evaluate", "run_evaluate", "run_predict", "colorize"]
