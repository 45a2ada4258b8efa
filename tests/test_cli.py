"""Every command through ``labeldiff.cli.main`` on tiny runs, its error exits, ``--help`` and the demo."""
from __future__ import annotations

import csv
import errno
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import labeldiff.pretrain.run as pretrain_run
from labeldiff.checkpoint import load_weights
from labeldiff.cli import main
from labeldiff.config import RunConfig
from labeldiff.data.io import read_mask
from labeldiff.models.unet import build_unet

TRAIN = ["--size", "16", "--steps", "2", "--batch-size", "2", "--precision", "fp32", "--device", "cpu",
         "--channels", "3", "--checkpoint-every", "1"]
MODEL = ["--unet-channels", "8,16", "--attention", "0,0"]  # + the recipe below for num_head_channels


def _error_line(capsys) -> str:
    """The captured stderr must be exactly one line starting with 'error:'; return it."""
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def tiny_recipe(tmp_path_factory):
    """The CLI has no flag for num_head_channels (default 32) and MONAI's middle block needs the last width
    divisible by it, so the 8,16 model takes it from a recipe; MODEL gains ``--recipe``."""
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text("model:\n  num_head_channels: 8\n  num_res_blocks: 1\ntrain:\n  warmup_steps: 1\n")
    MODEL.extend(["--recipe", str(path)])
    yield path
    del MODEL[-2:]


@pytest.fixture(scope="module")
def pretrained(module_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "pre"
    assert main(["pretrain", "--data", str(module_dataset), "--out", str(out), *TRAIN, *MODEL]) == 0
    return out


@pytest.fixture(scope="module")
def finetuned(module_dataset, pretrained) -> Path:
    out = pretrained.parent / "ft"
    assert main(["finetune", "--data", str(module_dataset), "--out", str(out), "--pretrained", str(pretrained),
                 "--labels", "2", "--head-hidden", "8", *TRAIN]) == 0
    return out


def test_pretrain(pretrained):
    """pretrain writes config.json (tiny model, recipe + flags), model.safetensors, a log and a checkpoint."""
    cfg = json.loads((pretrained / "config.json").read_text())
    assert cfg["kind"] == "pretrain" and cfg["model"]["channels"] == [8, 16] and cfg["data"]["size"] == 16
    assert cfg["model"]["num_head_channels"] == 8 and cfg["train"]["warmup_steps"] == 1  # from the recipe
    assert cfg["train"]["steps"] == 2 and cfg["train"]["precision"] == "fp32"
    w = load_weights(pretrained / "model.safetensors")
    assert w["conv_in.conv.weight"].shape == (8, 3, 3, 3)
    steps = [json.loads(ln)["step"] for ln in (pretrained / "log.jsonl").read_text().splitlines()]
    assert steps == [2]  # log_every defaults to 10: the last step is always logged
    assert json.loads((pretrained / "latest.json").read_text())["step"] == 2


def test_finetune_pretrained(finetuned, pretrained, module_dataset):
    """finetune --pretrained inherits the model, picks 2 train images and reports the skipped/new keys."""
    cfg = json.loads((finetuned / "config.json").read_text())
    assert cfg["kind"] == "segmentation" and cfg["num_classes"] == 3
    assert cfg["model"]["channels"] == [8, 16] and cfg["transfer"]["strategy"] == "full"
    labeled = json.loads((finetuned / "labeled.json").read_text())
    train = json.loads((module_dataset / "split.json").read_text())["train"]
    assert len(labeled["stems"]) == 2 and set(labeled["stems"]) <= set(train)
    report = labeled["load_report"]
    assert report["skipped"] == ["out.0.bias", "out.0.weight", "out.2.conv.bias", "out.2.conv.weight"]
    assert report["new"] and all(k.startswith("head.") for k in report["new"])
    w = load_weights(finetuned / "model.safetensors")
    assert w["head.layers.6.weight"].shape[0] == 3
    # the backbone started from the pretrained weights: 2 tiny fine-tuning steps (lr 2e-4 in warm-up) keep it
    # within 1e-4 of them, while pretraining itself moved the weights further than that from their init
    pre = load_weights(pretrained / "model.safetensors")
    assert report["loaded"] == sorted(k for k in pre if not k.startswith("out."))
    assert max((w[f"backbone.{k}"] - pre[k]).abs().max().item() for k in report["loaded"]) < 1e-4
    torch.manual_seed(0)
    init = build_unet(RunConfig.load(pretrained / "config.json").model, out_channels=3).state_dict()
    assert max((init[k] - pre[k]).abs().max().item() for k in report["loaded"]) > 1e-4


def test_finetune_from_scratch(module_dataset, tmp_path):
    """finetune --strategy scratch trains the tiny network without a pretrained run."""
    out = tmp_path / "scratch"
    assert main(["finetune", "--data", str(module_dataset), "--out", str(out), "--strategy", "scratch", "--labels", "2",
                 "--head-hidden", "8", *TRAIN, *MODEL]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["transfer"]["strategy"] == "scratch" and cfg["model"]["channels"] == [8, 16]
    assert json.loads((out / "labeled.json").read_text())["load_report"] is None
    assert (out / "model.safetensors").is_file()


def test_finetune_without_pretrained_is_an_error(module_dataset, tmp_path, capsys):
    """finetune with neither --pretrained nor --strategy scratch exits 2 with a one-line error."""
    rc = main(["finetune", "--data", str(module_dataset), "--out", str(tmp_path / "x"), "--labels", "2",
               *TRAIN, *MODEL])
    assert rc == 2
    assert "--pretrained" in _error_line(capsys)


def test_evaluate(finetuned, module_dataset, tmp_path):
    """evaluate writes metrics.json (Dice/IoU), one CSV row per test image and overlays.png."""
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(finetuned), "--out", str(out), "--device", "cpu"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    test = json.loads((module_dataset / "split.json").read_text())["test"]
    assert m["n_images"] == len(test) == 2 and m["split"] == "test"
    for metric in ("dice", "iou"):
        assert set(m[metric]["per_class"]) == {"0", "1", "2"}
        assert 0.0 <= m[metric]["mean"] <= 1.0
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["stem"] for r in rows] == test
    # the per-class means in metrics.json are the nanmeans of the per-image columns
    for c in "012":
        col = np.array([float(r[f"dice_{c}"]) for r in rows])
        expected = np.nanmean(col) if np.isfinite(col).any() else math.nan
        assert m["dice"]["per_class"][c] == pytest.approx(expected, abs=1e-5, nan_ok=True)
    with Image.open(out / "overlays.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100


@pytest.mark.slow
def test_evaluate_overlays_worst_best_named_and_all(finetuned, module_dataset, tmp_path, capsys):
    """--overlays worst / best pick the test images of lowest / highest foreground Dice in per_image.csv;
    named stems are shown in their order; all writes one PNG per image (image | truth | prediction |
    outcome at the image's own size, K = 3) into OUT/overlays/; a stem not in the split is refused before
    anything is written."""
    from labeldiff.data.io import read_image
    from labeldiff.evaluate.overlays import FP, OUTCOMES, outcome_map
    from labeldiff.evaluate.report import to_rgb

    def shown(how: str, *more: str) -> list[str]:
        out = tmp_path / how.replace(",", "_")
        assert main(["evaluate", "--model", str(finetuned), "--out", str(out), "--device", "cpu",
                     "--overlays", how, *more]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        return line.split("overlays.png (")[1].split(": ", 1)[1].split(")")[0].split(", ")

    train = json.loads((module_dataset / "split.json").read_text())["train"]
    assert main(["evaluate", "--model", str(finetuned), "--split", "train", "--out", str(tmp_path / "scores"),
                 "--device", "cpu"]) == 0
    with open(tmp_path / "scores" / "per_image.csv") as f:
        fg = {r["stem"]: np.nanmean([float(r["dice_1"]), float(r["dice_2"])]) for r in csv.DictReader(f)}
    assert len(set(fg.values())) == len(fg)  # distinct scores: the order is the test's to check
    by = sorted(fg, key=fg.get)
    assert shown("worst", "--split", "train", "--overlay-count", "2") == by[:2]
    assert shown("best", "--split", "train", "--overlay-count", "3") == by[::-1][:3]
    assert shown(f"{train[2]},{train[0]}", "--split", "train") == [train[2], train[0]]
    assert shown("all", "--split", "train", "--overlay-count", "1") == train[:1]
    for stem in train:
        with Image.open(tmp_path / "all" / "overlays" / f"{stem}.png") as im, \
                Image.open(module_dataset / "images" / f"{stem}.png") as src:
            assert im.size == (4 * src.size[0] + 3 * 4, src.size[1])
    # in the outcome panel, false positives (predicted foreground on background) are drawn in their colour
    assert main(["predict", "--model", str(finetuned), "--input", str(module_dataset), "--out", str(tmp_path / "p"),
                 "--device", "cpu"]) == 0
    stem = train[0]
    image = read_image(module_dataset / "images" / f"{stem}.png", 3)
    kinds = outcome_map(read_mask(tmp_path / "p" / f"{stem}.png"), read_mask(module_dataset / "masks" / f"{stem}.png"))
    with Image.open(tmp_path / "all" / "overlays" / f"{stem}.png") as im:
        outcome = np.asarray(im.convert("RGB"))[:, -kinds.shape[1]:].astype(int)
    fp, colour = kinds == FP, np.array(OUTCOMES[FP][1])
    rgb = to_rgb(image).astype(int)
    solid = np.all(outcome[fp] == colour, axis=1)
    blend = np.all(np.abs(outcome[fp] - (0.6 * rgb[fp] + 0.4 * colour)) <= 1, axis=1)
    assert fp.sum() > 0 and solid.any() and np.all(solid | blend)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(finetuned), "--out", str(tmp_path / "bad"), "--device", "cpu",
                 "--overlays", "img_05,nope"]) == 2
    err = capsys.readouterr().err
    assert "--overlays names nope, not in split 'test'" in err and not (tmp_path / "bad").exists()


def test_evaluate_default_out_and_other_split(finetuned):
    """Without --out, evaluate writes into MODEL/eval_SPLIT; --split picks another split."""
    assert main(["evaluate", "--model", str(finetuned), "--split", "train", "--device", "cpu"]) == 0
    m = json.loads((finetuned / "eval_train" / "metrics.json").read_text())
    assert m["split"] == "train" and m["n_images"] == 4


def test_predict(finetuned, module_dataset, tmp_path):
    """predict writes a mask PNG (values < K, the input's size) and an overlay for every image."""
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(finetuned), "--input", str(module_dataset), "--out", str(out),
                 "--device", "cpu"]) == 0
    images = sorted((module_dataset / "images").glob("*.png"))
    assert sorted(p.name for p in out.glob("*.png")) == [p.name for p in images]
    for p in images:
        mask = read_mask(out / p.name, num_classes=3)  # raises if any value ≥ K
        with Image.open(p) as im, Image.open(out / "overlays" / p.name) as ov:
            assert mask.shape == (im.size[1], im.size[0])
            assert ov.size == im.size and ov.mode == "RGB"
    single = tmp_path / "single"
    assert main(["predict", "--model", str(finetuned), "--input", str(images[0]), "--out", str(single),
                 "--device", "cpu"]) == 0
    assert np.array_equal(read_mask(single / images[0].name), read_mask(out / images[0].name))


@pytest.mark.slow
def test_predict_writes_palette_masks_that_read_back_as_class_ids(finetuned, module_dataset, tmp_path):
    """Masks are palette PNGs: mode "P", pixel values = class ids (what np.asarray and read_mask give), the
    palette colours them (class 0 black, the overlay colours). --probabilities writes one 16-bit PNG per
    class whose values sum to 65535 and whose argmax is the mask. A dataset whose masks are those palette
    PNGs evaluates as Dice 1 against the run that predicted them: evaluate reads the ids, not colours."""
    from labeldiff.data.io import class_colours, write_mask

    out = tmp_path / "pred"
    assert main(["predict", "--model", str(finetuned), "--input", str(module_dataset), "--out", str(out),
                 "--device", "cpu", "--probabilities"]) == 0
    stems = sorted(p.stem for p in (module_dataset / "images").glob("*.png"))
    seen = set()
    for stem in stems:
        with Image.open(out / f"{stem}.png") as im:
            assert im.mode == "P" and im.getpalette()[:9] == class_colours(3).ravel().tolist()
            ids = np.asarray(im)
        assert ids.dtype == np.uint8 and np.array_equal(ids, read_mask(out / f"{stem}.png", num_classes=3))
        seen |= set(np.unique(ids).tolist())
        probs = []
        for c in range(3):
            with Image.open(out / "probabilities" / f"class_{c}" / f"{stem}.png") as pm:
                assert pm.mode == "I;16" and pm.size == im.size
                probs.append(np.asarray(pm).astype(np.int64))
        probs = np.stack(probs)
        assert np.all(np.abs(probs.sum(0) - 65535) <= 2)
        near_tie = np.sort(probs, 0)[-1] - np.sort(probs, 0)[-2] <= 2
        assert np.array_equal(probs.argmax(0)[~near_tie], ids[~near_tie])
    assert seen and seen < {0, 1, 2}
    # palette masks as the ground truth of a dataset: evaluate reads their ids. The predicted ones score
    # Dice 1 against the run that predicted them; the true masks rewritten as palette PNGs score as the
    # grey originals do
    def dataset(name: str, write) -> Path:
        data = tmp_path / name
        shutil.copytree(module_dataset / "images", data / "images")
        (data / "masks").mkdir()
        for stem in stems:
            write(stem, data / "masks" / f"{stem}.png")
        shutil.copy(module_dataset / "split.json", data / "split.json")
        assert main(["evaluate", "--model", str(finetuned), "--data", str(data), "--out", str(tmp_path / f"ev_{name}"),
                     "--device", "cpu"]) == 0
        return tmp_path / f"ev_{name}" / "metrics.json"

    m = json.loads(dataset("predicted", lambda stem, to: shutil.copy(out / f"{stem}.png", to)).read_text())
    assert all(v == 1.0 or math.isnan(v) for v in m["dice"]["per_class"].values()) and m["dice"]["mean"] == 1.0
    truth = dataset("palette", lambda stem, to: write_mask(read_mask(module_dataset / "masks" / f"{stem}.png"), to, 3))
    with Image.open(tmp_path / "palette" / "masks" / f"{stems[-1]}.png") as im:
        assert im.mode == "P" and set(np.unique(np.asarray(im))) == {0, 1, 2}
    assert main(["evaluate", "--model", str(finetuned), "--out", str(tmp_path / "ev_grey"), "--device", "cpu"]) == 0
    grey = json.loads((tmp_path / "ev_grey" / "metrics.json").read_text())
    assert json.loads(truth.read_text())["dice"] == grey["dice"]


def test_write_mask_keeps_16_bit_grey_above_256_classes(tmp_path):
    from labeldiff.data.io import write_mask

    mask = np.arange(300 * 4).reshape(30, 40) % 300
    assert write_mask(mask, tmp_path / "m.png", 300) == "16-bit grey PNG"
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "I;16"
    assert np.array_equal(read_mask(tmp_path / "m.png"), mask)
    assert write_mask(mask % 256, tmp_path / "p.png", 256) == "palette PNG"
    with Image.open(tmp_path / "p.png") as im:
        assert im.mode == "P" and len(set(map(tuple, np.array(im.getpalette()).reshape(-1, 3)))) == 256
    assert np.array_equal(read_mask(tmp_path / "p.png"), mask % 256)


@pytest.mark.slow
def test_predict_volumes_writes_nifti_on_the_input_grid(finetuned, tmp_path):
    """predict on a NIfTI, an nnU-Net dataset's imagesTs and a DICOM series: one label NIfTI per case with
    the input's shape and affine, values < K, and an overlay strip."""
    import nibabel as nib

    from labeldiff.data.volume_io import read_volume
    from test_nnunet import oblique_affine, write_dicom_series

    rng = np.random.default_rng(0)
    vol = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(0, 300, (20, 14, 5)).astype(np.float32), oblique_affine()), str(vol))
    out = tmp_path / "pv"
    assert main(["predict", "--model", str(finetuned), "--input", str(vol), "--out", str(out), "--device", "cpu"]) == 0
    pred = nib.load(str(out / "ct.nii.gz"))
    assert pred.shape == (20, 14, 5) and np.allclose(pred.affine, oblique_affine(), atol=1e-5)
    assert np.asarray(pred.dataobj).max() < 3 and (out / "overlays" / "ct.png").is_file()
    assert main(["predict", "--model", str(finetuned), "--input", str(vol), "--out", str(tmp_path / "pp"),
                 "--probabilities"]) == 2  # volumes keep NIfTI labels: the 2D probability PNGs are refused

    raw = tmp_path / "Dataset009"
    (raw / "imagesTs").mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                  "labels": {"background": 0, "a": 1, "b": 2}}))
    for case, shape in (("c1", (9, 9, 4)), ("c2", (7, 12, 3))):
        nib.save(nib.Nifti1Image(rng.normal(size=shape).astype(np.float32), np.diag([2.0, 2.0, 5.0, 1.0])),
                 str(raw / "imagesTs" / f"{case}_0000.nii.gz"))
    out = tmp_path / "praw"
    assert main(["predict", "--model", str(finetuned), "--input", str(raw), "--out", str(out), "--device", "cpu",
                 "--intensity", "zscore"]) == 0
    assert nib.load(str(out / "c1.nii.gz")).shape == (9, 9, 4) and nib.load(str(out / "c2.nii.gz")).shape == (7, 12, 3)

    write_dicom_series(tmp_path / "series", rng.integers(-1000, 1000, (4, 10, 8)).astype(np.float32))
    out = tmp_path / "pdcm"
    assert main(["predict", "--model", str(finetuned), "--input", str(tmp_path / "series"), "--out", str(out),
                 "--device", "cpu", "--intensity", "ct-window", "--hu-window", "-160", "240"]) == 0
    pred = nib.load(str(out / "series.nii.gz"))
    src = read_volume(tmp_path / "series")
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine, atol=1e-4)


@pytest.mark.slow
def test_evaluate_volumes_scores_a_slab_in_3d(finetuned, tmp_path, capsys):
    """evaluate on an nnU-Net dataset: per case and class 3D scores on the slab only, equal to Dice
    computed by hand from `predict`'s NIfTI; a dataset with other classes is refused."""
    import nibabel as nib

    rng = np.random.default_rng(1)
    raw = tmp_path / "Dataset010"
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "file_ending": ".nii.gz",
                                                  "labels": {"background": 0, "grey": 1, "white": 2}}))
    aff = np.diag([1.0, 1.5, 4.0, 1.0])
    lab = rng.integers(0, 3, (12, 10, 6)).astype(np.uint8)
    nib.save(nib.Nifti1Image(rng.normal(size=(12, 10, 6)).astype(np.float32) + lab, aff),
             str(raw / "imagesTr" / "s1_0000.nii.gz"))
    nib.save(nib.Nifti1Image(lab, aff), str(raw / "labelsTr" / "s1.nii.gz"))
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", str(finetuned), "--data", str(raw), "--split", "train", "--slab", "2:4",
                 "--out", str(out), "--device", "cpu"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["per_class"]) == {"grey", "white"} and m["slab"] == [2, 4]
    rows = list(csv.DictReader(open(out / "per_case.csv")))
    assert [r["name"] for r in rows] == ["grey", "white"]
    assert main(["predict", "--model", str(finetuned), "--input", str(raw / "imagesTr" / "s1_0000.nii.gz"),
                 "--out", str(tmp_path / "pv"), "--device", "cpu"]) == 0
    pred = np.asarray(nib.load(str(tmp_path / "pv" / "s1.nii.gz")).dataobj)[:, :, 2:5]  # CASE_0000 → CASE
    truth = lab[:, :, 2:5]
    for r in rows:
        c = int(r["class"])
        assert int(r["voxels_true"]) == int((truth == c).sum())
        inter = ((pred == c) & (truth == c)).sum()
        expected = 2 * inter / ((pred == c).sum() + (truth == c).sum())
        assert float(r["dice"]) == pytest.approx(expected, abs=1e-6)
    assert (out / "overlays" / "s1.png").is_file()
    meta = json.loads((raw / "dataset.json").read_text())
    meta["labels"]["csf"] = 3
    (raw / "dataset.json").write_text(json.dumps(meta))
    assert main(["evaluate", "--model", str(finetuned), "--data", str(raw), "--split", "train", "--device", "cpu"]) == 2
    assert "names 4 classes but the model predicts 3" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_names_the_classes_of_a_dataset_that_has_them(finetuned, module_dataset, tmp_path):
    named = tmp_path / "named"
    shutil.copytree(module_dataset, named)
    (named / "classes.json").write_text(json.dumps({"background": 0, "nucleus": 1, "stroma": 2}))
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", str(finetuned), "--data", str(named), "--out", str(out), "--device", "cpu"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["dice"]["per_class"]) == ["background", "nucleus", "stroma"]


def test_evaluate_needs_a_finetune_run(pretrained, capsys):
    """evaluate on a pretraining run exits 2 with a one-line error."""
    assert main(["evaluate", "--model", str(pretrained), "--device", "cpu"]) == 2
    assert "pretrain" in _error_line(capsys)


@pytest.mark.slow
def test_real_data_finetune_and_evaluate(monuseg_small, tmp_path):
    """A from-scratch run and its evaluation on 3 real MoNuSeg pairs (64², binary nuclei masks)."""
    out = tmp_path / "ft"
    assert main(["finetune", "--data", str(monuseg_small), "--out", str(out), "--strategy", "scratch", "--labels", "2",
                 "--head-hidden", "8", *TRAIN, *MODEL]) == 0
    assert json.loads((out / "config.json").read_text())["num_classes"] == 2
    assert main(["evaluate", "--model", str(out), "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n_images"] == 1 and set(m["dice"]["per_class"]) == {"0", "1"}


# ---------------------------------------------------------------- error exits


@pytest.mark.slow
def test_existing_out_needs_overwrite(module_dataset, tmp_path, capsys):
    """An existing run in --out exits 2 unless --overwrite is given, which replaces it whole."""
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(module_dataset), "--out", str(out), *TRAIN, *MODEL]
    assert main(args) == 0
    (out / "keep.txt").write_text("x")
    capsys.readouterr()
    assert main(args) == 2
    line = _error_line(capsys)
    assert str(out) in line and "--overwrite" in line
    assert (out / "keep.txt").exists()
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_labels_larger_than_split(module_dataset, tmp_path, capsys):
    """--labels above the train split size exits 2 before creating the run folder."""
    out = tmp_path / "ft"
    assert main(["finetune", "--data", str(module_dataset), "--out", str(out), "--strategy", "scratch", "--labels", "9",
                 *TRAIN, *MODEL]) == 2
    line = _error_line(capsys)
    assert "--labels 9" in line and "'train'" in line
    assert not out.exists()


def test_unknown_split(module_dataset, finetuned, tmp_path, capsys):
    """An unknown split name exits 2 (finetune --train-split and evaluate --split)."""
    assert main(["finetune", "--data", str(module_dataset), "--out", str(tmp_path / "ft"), "--strategy", "scratch",
                 "--train-split", "nope", *TRAIN, *MODEL]) == 2
    assert "'nope'" in _error_line(capsys)
    assert main(["evaluate", "--model", str(finetuned), "--split", "nope", "--device", "cpu",
                 "--out", str(tmp_path / "ev")]) == 2
    assert "split.json" in _error_line(capsys)


def test_corrupt_image(module_dataset, tmp_path, capsys):
    """A corrupt image exits 2 for pretrain and finetune, naming the file."""
    data = tmp_path / "data"
    shutil.copytree(module_dataset, data)
    bad = data / "images" / "img_01.png"
    bad.write_bytes(b"\x89PNG garbage" * 8)
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "pre"), *TRAIN, *MODEL]) == 2
    assert str(bad) in _error_line(capsys)
    assert not (tmp_path / "pre").exists()
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "ft"), "--strategy", "scratch", "--labels", "2",
                 *TRAIN, *MODEL]) == 2
    assert str(bad) in _error_line(capsys)


def test_non_finite_loss_exit_code(module_dataset, tmp_path, capsys, monkeypatch):
    """A NaN loss exits 3 with a one-line error; before any checkpoint it says none was written."""

    def nan_loss(corruption):
        return lambda model, batch, g: torch.tensor(float("nan"), requires_grad=True)

    monkeypatch.setattr(pretrain_run, "pretext_loss", nan_loss)
    assert main(["pretrain", "--data", str(module_dataset), "--out", str(tmp_path / "pre"), *TRAIN, *MODEL]) == 3
    err = capsys.readouterr().err
    assert "error: loss became nan" in err and "no checkpoint was written" in err and "step 0)" not in err


@pytest.mark.slow
def test_resume_via_cli(module_dataset, tmp_path, monkeypatch):
    """Ctrl-C exits 130 after saving; the same command with --resume finishes like an uninterrupted run."""
    args = ["pretrain", "--data", str(module_dataset), *TRAIN, *MODEL, "--steps", "3"]
    real = pretrain_run.pretext_loss
    calls = [0]

    def interrupting(corruption):
        fn = real(corruption)

        def loss(model, batch, g):
            calls[0] += 1
            if calls[0] == 3:
                raise KeyboardInterrupt
            return fn(model, batch, g)

        return loss

    monkeypatch.setattr(pretrain_run, "pretext_loss", interrupting)
    b = tmp_path / "b"
    assert main([*args, "--out", str(b)]) == 130
    assert json.loads((b / "latest.json").read_text())["step"] == 2
    monkeypatch.undo()
    assert main([*args, "--out", str(b)]) == 2  # without --resume the folder is protected
    assert main([*args, "--out", str(b), "--resume"]) == 0
    assert json.loads((b / "latest.json").read_text())["step"] == 3
    a = tmp_path / "a"
    assert main([*args, "--out", str(a)]) == 0
    wa, wb = load_weights(a / "model.safetensors"), load_weights(b / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)


def test_head_channels_error_without_recipe(module_dataset, tmp_path, capsys):
    """Widths incompatible with the default num_head_channels exit 2 with a one-line error saying so."""
    out = tmp_path / "pre"
    assert main(["pretrain", "--data", str(module_dataset), "--out", str(out), *TRAIN,
                 "--unet-channels", "8,16", "--attention", "0,0"]) == 2
    assert "num_head_channels" in _error_line(capsys)
    assert not out.exists() or not any(out.iterdir())  # nothing half-written: the fixed command can reuse --out
    assert main(["pretrain", "--data", str(module_dataset), "--out", str(out), *TRAIN, *MODEL]) == 0


def test_resume_without_run_is_an_error(module_dataset, tmp_path, capsys):
    """--resume on a missing folder exits 2."""
    assert main(["pretrain", "--data", str(module_dataset), "--out", str(tmp_path / "none"), "--resume",
                 *TRAIN, *MODEL]) == 2
    assert "--resume" in _error_line(capsys)


# ---------------------------------------------------------------- other pretext tasks


@pytest.mark.slow
def test_ddep_pretrain_finetune_evaluate(module_dataset, tmp_path, tiny_recipe):
    """ddep picks the EfficientNet UNet itself, and its run fine-tunes and evaluates like any other."""
    small = ["--recipe", str(tiny_recipe)]
    assert main(["pretrain", "--data", str(module_dataset), "--out", str(tmp_path / "pre"), "--method", "ddep",
                 *TRAIN, "--size", "32", "--decoder-width", "0.25", *small]) == 0
    cfg = RunConfig.load(tmp_path / "pre" / "config.json")
    assert cfg.model.arch == "efficientnet-unet" and cfg.corruption.method == "ddep"
    assert main(["finetune", "--data", str(module_dataset), "--pretrained", str(tmp_path / "pre"),
                 "--out", str(tmp_path / "ft"), *TRAIN, "--size", "32", "--labels", "2", *small]) == 0
    assert main(["evaluate", "--model", str(tmp_path / "ft"), "--device", "cpu"]) == 0
    assert (tmp_path / "ft" / "eval_test" / "metrics.json").is_file()


def test_ddep_size_must_be_a_multiple_of_32(module_dataset, tmp_path, capsys):
    assert main(["pretrain", "--data", str(module_dataset), "--out", str(tmp_path / "pre"), "--method", "dep",
                 *TRAIN]) == 2
    assert "multiple of 32" in _error_line(capsys)
    assert not (tmp_path / "pre").exists()


def test_hybrid_pretrain_evaluate_directly_and_sample(module_dataset, tmp_path):
    assert main(["pretrain", "--data", str(module_dataset), "--out", str(tmp_path / "hy"), "--method", "hybrid",
                 "--mask-weight", "1", "--prediction", "sample", *TRAIN, *MODEL]) == 0
    assert main(["evaluate", "--model", str(tmp_path / "hy"), "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "hy" / "eval_test" / "metrics.json").read_text())
    assert len(metrics["dice"]["per_class"]) == 3
    assert main(["sample", "--model", str(tmp_path / "hy"), "--out", str(tmp_path / "s"), "--n", "2",
                 "--steps", "3", "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").glob("*.png")) == [
        "grid.png", "mask_000.png", "mask_001.png", "sample_000.png", "sample_001.png"]


def test_split_command(module_dataset, tmp_path):
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({f"img_{i:02d}": i // 2 for i in range(6)}))
    out = tmp_path / "split.json"
    assert main(["split", "--data", str(module_dataset), "--groups", str(groups), "--test-fraction", "0.3",
                 "--out", str(out)]) == 0
    split = json.loads(out.read_text())
    assert len(split["test"]) == 2 and len(split["train"]) == 4
    assert main(["finetune", "--data", str(module_dataset), "--split-file", str(out), "--strategy", "scratch",
                 "--out", str(tmp_path / "ft"), *TRAIN, *MODEL, "--labels", "4"]) == 0
    chosen = json.loads((tmp_path / "ft" / "labeled.json").read_text())["stems"]
    assert sorted(chosen) == sorted(split["train"])


# ---------------------------------------------------------------- help


@pytest.mark.parametrize("command,options", [
    ("pretrain", ["--data", "--out", "--resume", "--overwrite", "--steps", "--unet-channels", "--schedule", "--size",
                  "--method", "--sigma", "--noise", "--decoder-width", "--encoder", "--mask-weight", "--prediction"]),
    ("split", ["--data", "--groups", "--test-fraction", "--out"]),
    ("sample", ["--model", "--n", "--sampler", "--steps"]),
    ("finetune", ["--data", "--pretrained", "--strategy", "--labels", "--num-classes", "--train-split"]),
    ("evaluate", ["--model", "--split", "--data", "--out", "--device"]),
    ("predict", ["--model", "--input", "--out"]),
    ("demo", ["--out", "--pretrain-steps", "--finetune-steps", "--n-seeds", "--labels"]),
])
def test_help(command, options, capsys):
    """`labeldiff CMD --help` exits 0 and lists the command's options."""
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: labeldiff {command}")
    for opt in options:
        assert opt in out, opt


def test_top_level_help_lists_commands(capsys):
    """`labeldiff --help` lists every command."""
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("pretrain", "finetune", "evaluate", "predict", "sample", "split", "demo"):
        assert cmd in out


# ---------------------------------------------------------------- demo


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    """The demo is the example study `demo` run by the study runner (tiny step counts here): its cells, the
    study's pages, and the demo's report for pretrained and scratch; it ends by naming them and what to run
    next."""
    from labeldiff.demo import CLASS_NAMES, run_demo, test_slab

    out = tmp_path / "demo"
    summary = run_demo(out, pretrain_steps=2, finetune_steps=2, seeds=2, size=32)
    end = capsys.readouterr().out.splitlines()[-2:]
    assert end[0].startswith(f"report: {out / 'report'} (summary.md") and end[1].startswith("next: ")
    report = out / "report"
    for name in ("summary.md", "metrics.json", "dice.png", "overlays_pretrained.png", "overlays_scratch.png"):
        assert (report / name).is_file(), name
    for name in ("demo.yaml", "results.csv", "paired.md", "verdict.md"):  # the study's own files
        assert (out / name).is_file(), name
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["results"]) == {"pretrained", "scratch"} == set(summary["results"])
    for r in metrics["results"].values():
        assert len(r["dice"]["per_seed"]) == 2 and 0 <= r["dice"]["mean"] <= 1
    assert "| pretrained |" in (report / "summary.md").read_text()
    data = out / "data" / "brain-demo"
    split = json.loads((data / "split.json").read_text())
    assert split["train"] and split["test"] and not set(split["train"]) & set(split["test"])
    cells = {p.name: p for p in (out / "cells").iterdir()}
    assert len(cells) == 4 and sum(n.startswith("none-scratch-k2-s1-") for n in cells) == 1
    # the volume path: an nnU-Net raw dataset read as volumes, the test slab scored in 3D, a label NIfTI out
    import nibabel as nib

    from labeldiff.data.folders import VolumeFolder

    assert VolumeFolder(data).stems("test") == split["test"]
    first, last = test_slab(split)
    assert first > max(int(s.rsplit("_z", 1)[1]) for s in split["train"]) + 4  # the gap
    pretrained = next(p for n, p in cells.items() if n.startswith("ddpm-full-k2-s1-"))
    slab = json.loads((pretrained / "eval" / "volume" / "metrics.json").read_text())
    assert slab["scored_slabs"] == {"mni152": [first, last]} and set(slab["per_class"]) == set(CLASS_NAMES[1:])
    for r in metrics["results"].values():
        assert 0 <= r["dice_3d"]["mean"] <= 1 and len(r["dice"]["per_seed"]) == 2
    t1, pred = nib.load(str(data / "imagesTr" / "mni152_0000.nii.gz")), nib.load(str(report / "prediction" / "mni152.nii.gz"))
    assert pred.shape == t1.shape and np.allclose(pred.affine, t1.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}


# ---------------------------------------------------------------- input hardening (issue 14)

def _with(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.mark.parametrize("cmd", ["pretrain", "finetune"])
@pytest.mark.parametrize("flag,value,says", [("--batch-size", "0", "--batch-size must be ≥ 1 (got 0)"),
                                             ("--steps", "-5", "--steps must be ≥ 1 (got -5)"),
                                             ("--size", "4", "--size must be ≥ 8 (got 4)")])
def test_out_of_range_numbers_stop_before_a_run_folder(cmd, flag, value, says, module_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    extra = ["--strategy", "scratch", "--labels", "2"] if cmd == "finetune" else []
    rc = main([cmd, "--data", str(module_dataset), "--out", str(out), *extra, *_with(TRAIN, flag, value), *MODEL])
    assert rc == 2 and says in _error_line(capsys)
    assert not out.exists()


def test_out_of_range_recipe_values_are_caught_too(module_dataset, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  ema_decay: 1.5\n")
    rc = main(["pretrain", "--data", str(module_dataset), "--out", str(tmp_path / "run"), *TRAIN,
               "--unet-channels", "8,16", "--attention", "0,0", "--recipe", str(recipe)])
    assert rc == 2 and "--ema-decay must be < 1 (got 1.5)" in _error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_cli_only_numbers_are_range_checked_in_one_line(module_dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["split", "--data", str(module_dataset), "--out", str(tmp_path / "s.json"), "--test-fraction", "1.5"])
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == ["labeldiff split: error: argument --test-fraction: must be a finite number in (0, 1) (got 1.5) "
                     "(--help lists the options)"]


@pytest.mark.slow
def test_no_split_file_trains_on_every_image_and_evaluate_says_how_to_split(module_dataset, tmp_path, capsys):
    data = tmp_path / "nosplit"
    shutil.copytree(module_dataset, data)
    (data / "split.json").unlink()
    out = tmp_path / "ft"
    assert main(["finetune", "--data", str(data), "--out", str(out), "--strategy", "scratch", "--labels", "5",
                 "--head-hidden", "8", *TRAIN, *MODEL]) == 0
    assert len(json.loads((out / "labeled.json").read_text())["stems"]) == 5  # more than the old train split
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 2
    line = _error_line(capsys)
    assert "no split.json" in line and "labeldiff split --data" in line
    assert main(["split", "--data", str(data), "--out", str(data / "split.json")]) == 0
    split = json.loads((data / "split.json").read_text())
    assert split["train"] and split["test"] and not set(split["train"]) & set(split["test"])
    assert sorted(split["train"] + split["test"]) == sorted(p.stem for p in (data / "images").iterdir())
    # the run trained on images the new test split holds: scoring them is refused, naming them and the fix
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 2
    line = _error_line(capsys)
    trained = set(json.loads((out / "labeled.json").read_text())["stems"])
    assert set(split["test"]) & trained and "train the run again" in line
    assert any(s in line for s in set(split["test"]) & trained)
    again = tmp_path / "ft2"
    assert main(["finetune", "--data", str(data), "--out", str(again), "--strategy", "scratch", "--labels", "2",
                 "--head-hidden", "8", *TRAIN, *MODEL]) == 0
    assert main(["evaluate", "--model", str(again), "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 0


def test_a_truncated_image_stops_pretrain_before_its_run_folder(module_dataset, tmp_path, capsys, monkeypatch):
    data = tmp_path / "trunc"
    shutil.copytree(module_dataset, data)
    bad = data / "images" / "img_03.png"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # the header is intact, the pixels are not
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(out), *TRAIN, *MODEL]) == 2
    line = _error_line(capsys)
    assert "img_03.png: cannot be read as an image" in line and not out.exists()
    bad.unlink()
    assert main(["pretrain", "--data", str(data), "--out", str(out), *TRAIN, *MODEL]) == 0
    # the files decoded once are remembered (path, size, mtime): a second scan decodes nothing
    import labeldiff.data.io as io

    def refuse(path):
        raise AssertionError(f"decoded {path}")

    monkeypatch.setattr(io, "_open", refuse)
    io.check_decodes([data / "images" / f"img_0{i}.png" for i in range(3)])  # what pretraining read
    with pytest.raises(AssertionError, match="decoded .*img_04.png"):  # the test images were never decoded
        io.check_decodes([data / "images" / "img_04.png"])


@pytest.mark.slow
def test_ignore_index_end_to_end(module_dataset, tmp_path, capsys):
    """Masks with 255 = not labeled (Pascal VOC style): refused without --ignore-index (the message says
    so); with it K stays 3, fine-tuning and evaluation leave those pixels out."""
    data = tmp_path / "voc"
    shutil.copytree(module_dataset, data)
    for f in sorted((data / "masks").glob("*.png")):
        m = np.array(Image.open(f))
        m[:4] = 255  # a band of unlabeled pixels
        Image.fromarray(m, "L").save(f)
    out = tmp_path / "ft"
    args = ["finetune", "--data", str(data), "--out", str(out), "--strategy", "scratch", "--labels", "2", "--head-hidden", "8",
            *TRAIN, *MODEL]
    assert main(args) == 2 and "--ignore-index 255" in _error_line(capsys)
    assert main([*args, "--ignore-index", "255"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_classes"] == 3 and cfg["data"]["ignore_index"] == 255
    assert main(["evaluate", "--model", str(out), "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["ignore_index"] == 255 and 0 <= m["dice"]["mean"] <= 1
    capsys.readouterr()
    bad = ["finetune", "--data", str(module_dataset), "--out", str(tmp_path / "ft2"), *args[5:], "--ignore-index", "1"]
    assert main(bad) == 2 and "--ignore-index 1 is one of the 3 classes" in _error_line(capsys)
    assert not (tmp_path / "ft2").exists()


# ---------------------------------------------------------------- a disk that refuses writes


@pytest.mark.slow
def test_a_refused_write_is_one_line_not_a_traceback(module_dataset, tmp_path):
    """A real write failure from the OS, in a subprocess whose file-size limit (RLIMIT_FSIZE, 16 KiB) the
    first checkpoint exceeds: both Python's writes and safetensors' own writer fail the way a full disk
    does. The command exits 4 with one `error:` line naming the file and the fix, and no traceback."""
    import resource
    import signal
    import subprocess
    import sys

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "labeldiff.cli", "pretrain", "--data", str(module_dataset), "--out", str(out),
           *TRAIN, *MODEL]
    done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [ln for ln in done.stderr.replace("\r", "\n").splitlines() if ln.startswith("error:")]
    assert done.returncode == 4 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(errors) == 1 and "cannot write" in errors[0] and "ulimit -f" in errors[0], errors
    assert str(out) in errors[0]


@pytest.mark.parametrize("code, fix", [(errno.EROFS, "writable disk"), (errno.ENOSPC, "free some space"),
                                       (errno.EACCES, "may write to")])
def test_a_read_only_or_full_out_folder_is_one_line(module_dataset, tmp_path, monkeypatch, capsys, code, fix):
    """The run folder cannot be made (read-only disk, full disk, no permission: the OS error is raised
    where mkdir would make it): one `error:` line with the folder and the fix, exit 4."""
    out = tmp_path / "ro" / "run"
    real = Path.mkdir

    def refuse(self, *a, **k):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(code, os.strerror(code), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert main(["pretrain", "--data", str(module_dataset), "--out", str(out), *TRAIN, *MODEL]) == 4
    line = _error_line(capsys)
    assert f"cannot write {out}" in line and os.strerror(code) in line and fix in line


def test_compare_cli_pairs_two_studies_and_says_how_to_fix_a_missing_file(tmp_path, capsys):
    from labeldiff.study.report import write_csv

    def row(cell, dice, stems="a;b"):
        return {"cell": cell, "method": "ddpm@10000", "pretrain_steps": 10000, "arch": "A", "strategy": "full",
                "protocol": "default", "k": 2, "seed": int(cell[-1]), "select": "random", "stems": stems,
                "dice": dice, "iou": dice / 2, "seconds": 1.0}

    write_csv([row("a0", 0.70), row("a1", 0.80), row("a2", 0.60)], tmp_path / "videos" / "results.csv")
    write_csv([row("b0", 0.50), row("b1", 0.70), row("b2", 0.60, stems="c;d")], tmp_path / "random" / "results.csv")
    out = tmp_path / "compare.md"
    assert main(["compare", str(tmp_path / "videos"), str(tmp_path / "random" / "results.csv"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    # seeds 0, 1: +0.2, +0.1 (seed 2 labeled other images in random: unpaired)
    assert "| ddpm@10000 | full | default | random | 2 | 0.750 | 0.600 | +0.150 |" in text
    assert "| no | 2 | 1 |" in text and out.read_text() in text
    page = out.with_suffix(".html").read_text()  # the same table, as a page
    assert ("<td>ddpm@10000</td><td>full</td><td>default</td><td>random</td><td class=\"num\">2</td>"
            "<td class=\"num\">0.750</td><td class=\"num\">0.600</td><td class=\"num\">+0.150</td>") in page
    assert main(["compare", str(tmp_path / "videos"), str(tmp_path / "random"), "--names", "v,r",
                 "--metric", "iou"]) == 0
    assert "| v | r | mean Δ |" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "videos"), str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no results.csv there" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "videos"), str(tmp_path / "gone" / "results.csv")]) == 2
    assert f"--out {tmp_path / 'gone'} --report-only" in capsys.readouterr().err
    write_csv([row("c0", 0.4)], tmp_path / "other" / "videos" / "results.csv")  # two folders named videos
    assert main(["compare", str(tmp_path / "videos"), str(tmp_path / "other" / "videos")]) == 0
    assert "| videos (A) | videos (B) | mean Δ |" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "videos"), str(tmp_path / "random"), "--metric", "dice_7"]) == 2
    assert "videos/results.csv has no column dice_7 (--metric:" in capsys.readouterr().err
