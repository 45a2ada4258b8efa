"""Nothing lost, nothing silently wrong (docs/reliability.md lists each guarantee and the test here behind it).

Every case runs the command as a user would (``labeldiff.cli.main``) on small generated data. A refused
command ends with one ``error:`` line that names the file or flag, and what it was refused for is left
byte for byte as it was."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from labeldiff.checkpoint import RUN_MARKER, load_weights, save_weights
from labeldiff.cli import main

from conftest import write_labeled_dataset

T = ["--size", "16", "--steps", "2", "--batch-size", "2", "--precision", "fp32", "--device", "cpu",
     "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text("model:\n  channels: [8, 16]\n  attention_levels: [false, false]\n  num_head_channels: 8\n"
                    "train:\n  warmup_steps: 1\ntransfer:\n  head_hidden: 8\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_labeled_dataset(tmp_path_factory.mktemp("rel") / "data", n=6, k=3)


@pytest.fixture(scope="module")
def run(data, recipe, tmp_path_factory) -> Path:
    """A tiny scratch fine-tuning (K = 3) on the train split (4 images), for evaluate and predict."""
    out = tmp_path_factory.mktemp("run") / "ft"
    assert main(["finetune", "--data", str(data), "--out", str(out), "--strategy", "scratch", "--labels", "4",
                 "--recipe", str(recipe), *T]) == 0
    return out


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` → its sha256: what "left byte for byte as it was" is checked against."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def error_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines()
             if ln.strip() and "%|" not in ln]  # progress bars are not messages
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def refused(argv: list[str], capsys, *names: str) -> str:
    code = main([str(a) for a in argv])
    assert code not in (0, None)
    line = error_line(capsys)
    for name in names:
        assert str(name) in line, (name, line)
    return line


# --- data loss -----------------------------------------------------------------------------------------------


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(data, recipe, tmp_path, capsys):
    victim = tmp_path / "victim"
    shutil.copytree(data, victim)
    before = snapshot(victim)
    refused(["finetune", "--data", victim, "--out", victim, "--strategy", "scratch", "--labels", "2", "--recipe", recipe,
             *T, "--overwrite"], capsys, victim, "not a labeldiff run")
    assert snapshot(victim) == before
    other = tmp_path / "notes"  # any folder of the user's, named as --out by mistake
    other.mkdir()
    (other / "thesis.tex").write_text("chapter 1")
    refused(["pretrain", "--data", data, "--out", other, "--recipe", recipe, *T, "--overwrite"], capsys, other)
    assert (other / "thesis.tex").read_text() == "chapter 1"


def test_overwrite_never_deletes_what_the_run_reads(data, recipe, tmp_path, capsys):
    """A run folder that holds the data the run reads (the demo keeps its data inside its folder) is not
    replaced by a run that reads that data."""
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(out), "--recipe", str(recipe), *T]) == 0
    shutil.copytree(data, out / "data")
    before = snapshot(out / "data")
    refused(["pretrain", "--data", out / "data", "--out", out, "--recipe", recipe, *T, "--overwrite"], capsys,
            "which this run reads")
    assert snapshot(out / "data") == before


def test_overwrite_replaces_a_run(data, recipe, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(data), "--out", str(out), "--recipe", str(recipe), *T]
    assert main(args) == 0
    (out / "stale.txt").write_text("from the old run")
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file() and (out / RUN_MARKER).is_file()


def test_out_naming_a_file_is_refused(data, recipe, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    refused(["pretrain", "--data", data, "--out", f, "--recipe", recipe, *T], capsys, f, "is a file")
    refused(["pretrain", "--data", data, "--out", f, "--recipe", recipe, *T, "--overwrite"], capsys, f)
    assert f.read_text() == "keep"


def test_predict_never_writes_into_a_dataset_or_over_files(data, run, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(data, ds)
    before = snapshot(ds)
    refused(["predict", "--model", run, "--input", ds / "images", "--out", ds / "masks", "--device", "cpu"], capsys,
            "masks")
    refused(["predict", "--model", run, "--input", ds / "images", "--out", ds / "images", "--device", "cpu"], capsys,
            "images")
    refused(["predict", "--model", run, "--input", ds / "images", "--out", ds / "masks" / "pred", "--device", "cpu"],
            capsys, "inside")
    plain = tmp_path / "plain"  # a folder of images that is not a dataset: not into it either
    shutil.copytree(ds / "images", plain)
    refused(["predict", "--model", run, "--input", plain, "--out", plain, "--device", "cpu"], capsys, "input folder")
    assert snapshot(ds) == before
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(run), "--input", str(ds), "--out", str(out), "--device", "cpu"]) == 0
    first = snapshot(out)
    (out / "img_00.png").write_bytes(b"my edited mask")
    refused(["predict", "--model", run, "--input", ds, "--out", out, "--device", "cpu"], capsys, "img_00.png",
            "--overwrite")
    assert (out / "img_00.png").read_bytes() == b"my edited mask"
    assert main(["predict", "--model", str(run), "--input", str(ds), "--out", str(out), "--device", "cpu",
                 "--overwrite"]) == 0
    assert snapshot(out) == first


def test_sample_never_writes_into_a_dataset(data, recipe, tmp_path, capsys):
    pre = tmp_path / "pre"
    assert main(["pretrain", "--data", str(data), "--out", str(pre), "--recipe", str(recipe), *T]) == 0
    ds = tmp_path / "ds"
    shutil.copytree(data, ds)
    before = snapshot(ds)
    refused(["sample", "--model", pre, "--out", ds / "images", "--n", "2", "--steps", "2", "--device", "cpu"],
            capsys, "images")
    assert snapshot(ds) == before


def test_split_refuses_to_replace_and_evaluate_refuses_a_changed_split(data, recipe, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(data, ds)
    out = tmp_path / "ft"
    assert main(["finetune", "--data", str(ds), "--out", str(out), "--strategy", "scratch", "--labels", "4", "--recipe",
                 str(recipe), *T]) == 0
    rec = json.loads((out / "trained_on.json").read_text())
    assert rec["split_sha256"] == hashlib.sha256((ds / "split.json").read_bytes()).hexdigest()
    assert rec["stems"] == sorted(json.loads((out / "labeled.json").read_text())["stems"])
    before = (ds / "split.json").read_bytes()
    refused(["split", "--data", ds, "--out", ds / "split.json", "--seed", "3"], capsys, "split.json", "--overwrite")
    assert (ds / "split.json").read_bytes() == before
    capsys.readouterr()
    assert main(["split", "--data", str(ds), "--out", str(ds / "split.json"), "--seed", "3", "--overwrite",
                 "--test-fraction", "0.5"]) == 0
    test = json.loads((ds / "split.json").read_text())["test"]
    assert set(test) & set(rec["stems"])  # the new test split holds images the run trained on
    line = refused(["evaluate", "--model", out, "--out", tmp_path / "ev", "--device", "cpu"], capsys,
                   "has changed since the run trained", "train the run again")
    assert any(s in line for s in set(test) & set(rec["stems"]))
    assert not (tmp_path / "ev").exists()


# --- silent wrong results -----------------------------------------------------------------------------------


def _flip_a_data_bit(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")  # safetensors: 8-byte length, JSON header, then the data
    raw[header + (len(raw) - header) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["bit", "truncated", "header"])
def test_damaged_weights_are_refused_on_every_load(damage, data, run, recipe, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    f = bad / "model.safetensors"
    if damage == "bit":
        _flip_a_data_bit(f)
    elif damage == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        f.write_bytes(b"\xff" * 16 + f.read_bytes()[16:])
    refused(["evaluate", "--model", bad, "--out", tmp_path / "ev", "--device", "cpu"], capsys, f)
    refused(["predict", "--model", bad, "--input", data / "images", "--out", tmp_path / "pr", "--device", "cpu"],
            capsys, f)
    pre = tmp_path / "pre"
    assert main(["pretrain", "--data", str(data), "--out", str(pre), "--recipe", str(recipe), *T]) == 0
    g = pre / "model.safetensors"
    g.write_bytes(g.read_bytes()[:-3])
    refused(["finetune", "--data", data, "--out", tmp_path / "ft", "--pretrained", pre, "--labels", "2", *T],
            capsys, g)
    assert not (tmp_path / "ft").exists()


def test_weights_carry_their_digest(run):
    digests = json.loads((run / "digests.json").read_text())
    f = run / "model.safetensors"
    assert digests["model.safetensors"] == [f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest()]


@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--lr", "nan"), ("--scale", "inf"), ("--grad-clip", "inf"),
                                        ("--ema-decay", "nan"), ("--sigma", "inf"), ("--mask-weight", "inf")])
def test_non_finite_settings_are_refused_before_the_run_folder(flag, value, data, recipe, tmp_path, capsys):
    out = tmp_path / "run"
    refused(["pretrain", "--data", data, "--out", out, "--recipe", recipe, *T, flag, value], capsys, flag)
    assert not out.exists()


def test_a_learning_rate_beyond_float32_is_refused(data, recipe, tmp_path, capsys):
    out = tmp_path / "run"
    refused(["pretrain", "--data", data, "--out", out, "--recipe", recipe, *T, "--lr", "1e39"], capsys, "--lr")
    assert not out.exists()


def test_non_finite_weights_are_never_saved_as_the_result(tmp_path):
    """A loss whose value is finite (0) but whose gradient is not (√0 at every weight) makes every weight NaN
    in the step: the loss guard cannot see it; the run stops with a NonFiniteError and saves nothing."""
    import torch

    from labeldiff.config import RunConfig, TrainConfig
    from labeldiff.data.datasets import StepBatches
    from labeldiff.data.folders import Sample
    from labeldiff.errors import NonFiniteError
    from labeldiff.pretrain.loop import train

    images = write_labeled_dataset(tmp_path / "d", n=2)
    cfg = RunConfig(train=TrainConfig(steps=1, batch_size=2, device="cpu", precision="fp32", grad_clip=0.0))
    cfg.data.size = 16
    model = torch.nn.Conv2d(3, 3, 3, padding=1)
    batches = StepBatches([Sample(p.stem, p) for p in sorted((images / "images").iterdir())], cfg.data, 2, 0,
                          labeled=False)

    def loss_fn(net, batch, g):  # value 0, gradient NaN (d√x/dx at 0 times 0)
        return (net(batch["image"]) * 0).abs().sqrt().sum()

    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(NonFiniteError, match="weights are not finite after step 1"):
        train(out, cfg, model, torch.optim.Adam(model.parameters()), loss_fn, batches)
    assert not (out / "model.safetensors").exists() and not (out / "checkpoints").exists()


def test_a_size_no_machine_can_train_is_refused_before_the_run_folder(data, recipe, tmp_path, capsys):
    out = tmp_path / "run"
    refused(["pretrain", "--data", data, "--out", out, "--recipe", recipe, *T, "--size", "100000"], capsys,
            "--size 100000", "GiB")
    assert not out.exists()


def test_resume_refuses_other_settings_and_a_finished_run(data, recipe, tmp_path, capsys):
    out = tmp_path / "ft"
    base = ["finetune", "--data", str(data), "--out", str(out), "--strategy", "scratch", "--recipe", str(recipe), *T]
    assert main([*base, "--labels", "3"]) == 0
    before = snapshot(out)
    line = refused([*base, "--labels", "2", "--seed", "5", "--resume", "--steps", "4"], capsys, "transfer.labels",
                   "train.seed")
    assert "--overwrite" in line
    refused([*base, "--labels", "3", "--resume", "--steps", "4", "--lr", "0.1"], capsys, "train.lr")
    refused([*base, "--labels", "3", "--resume", "--steps", "4", "--unet-channels", "8,32"], capsys, "model.channels")
    refused([*base, "--labels", "3", "--resume", "--steps", "4", "--num-classes", "5"], capsys, "data.num_classes")
    other = tmp_path / "other"
    shutil.copytree(data, other)
    refused([*[a if a != str(data) else str(other) for a in base], "--labels", "3", "--resume", "--steps", "4"],
            capsys, "data.path")
    assert snapshot(out) == before
    line = refused([*base, "--labels", "3", "--resume"], capsys, "is finished", "--steps")
    assert snapshot(out) == before  # no NaN loss written into its last state
    state = json.loads((out / "checkpoints" / "step_0000002" / "state.json").read_text())
    assert np.isfinite(state["loss"])
    assert main([*base, "--labels", "3", "--resume", "--steps", "4"]) == 0  # a longer run: the meaningful change
    assert json.loads((out / "config.json").read_text())["extended"][0]["to_steps"] == 4


def test_resume_writes_the_result_a_run_killed_after_its_last_checkpoint_lacks(data, recipe, tmp_path):
    out = tmp_path / "pre"
    base = ["pretrain", "--data", str(data), "--out", str(out), "--recipe", str(recipe), *T]
    assert main(base) == 0
    w = load_weights(out / "model.safetensors")
    (out / "model.safetensors").unlink()  # killed between the last checkpoint and the result
    assert main([*base, "--resume"]) == 0
    again = load_weights(out / "model.safetensors")
    assert all(np.array_equal(w[k].numpy(), again[k].numpy()) for k in w)
    state = json.loads((out / "checkpoints" / "step_0000002" / "state.json").read_text())
    assert np.isfinite(state["loss"])  # the last state keeps the loss it was saved with, not NaN


HOLD = """
import sys, time
from labeldiff.checkpoint import prepare_run_dir
prepare_run_dir(sys.argv[1], overwrite=True, resume=False)
print("held", flush=True)
if sys.argv[2] == "crash":
    import os; os._exit(9)
time.sleep(60)
"""


def test_one_writer_per_run_folder_and_a_crashed_one_does_not_block(data, recipe, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "hold"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused(["pretrain", "--data", data, "--out", out, "--recipe", recipe, *T, "--overwrite"], capsys,
                "is being written by labeldiff process", str(holder.pid))
        assert [p.name for p in out.iterdir()] == [RUN_MARKER]
    finally:
        holder.kill()
        holder.wait()
    crashed = subprocess.run([sys.executable, "-c", HOLD, str(out), "crash"], capture_output=True, text=True)
    assert crashed.returncode == 9 and "held" in crashed.stdout
    assert main(["pretrain", "--data", str(data), "--out", str(out), "--recipe", str(recipe), *T]) == 0


def test_more_than_256_classes_are_saved_as_16_bit_masks(data, recipe, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(data, ds)
    for m in (ds / "masks").glob("*.png"):
        mask = np.asarray(Image.open(m)).astype(np.uint16)
        Image.fromarray(np.where(mask == 2, 280, mask).astype(np.uint16)).save(m)  # a class above 255
    out = tmp_path / "ft"
    assert main(["finetune", "--data", str(ds), "--out", str(out), "--strategy", "scratch", "--labels", "2", "--recipe",
                 str(recipe), *T]) == 0
    w = load_weights(out / "model.safetensors")
    bias = [k for k in w if k.endswith("bias") and w[k].shape == (281,)]
    assert len(bias) == 1
    w[bias[0]][:] = 0.0
    w[bias[0]][280] = 1e4  # every pixel predicts class 280
    save_weights(w, out / "model.safetensors")
    assert main(["predict", "--model", str(out), "--input", str(ds / "images" / "img_00.png"), "--out",
                 str(tmp_path / "pred"), "--device", "cpu"]) == 0
    got = np.asarray(Image.open(tmp_path / "pred" / "img_00.png"))
    assert got.dtype == np.uint16 and got.min() == got.max() == 280


def _float_tiff(path: Path, bad: float) -> None:
    x = np.linspace(0, 1, 40 * 48, dtype=np.float32).reshape(40, 48)
    x[5, 7] = bad
    Image.fromarray(x, "F").save(path)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_pixels_are_refused_naming_the_file(bad, data, recipe, run, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(data, ds)
    (ds / "images" / "img_05.png").unlink()
    _float_tiff(ds / "images" / "img_05.tif", bad)
    out = tmp_path / "pre"
    refused(["pretrain", "--data", ds, "--out", out, "--recipe", recipe, *T, "--include-test"], capsys,
            "img_05.tif", "row 5, column 7")
    assert not out.exists()
    refused(["predict", "--model", run, "--input", ds / "images" / "img_05.tif", "--out", tmp_path / "pr",
             "--device", "cpu"], capsys, "img_05.tif")
    assert not (tmp_path / "pr").exists()


def test_a_multi_page_tiff_is_refused(data, run, tmp_path, capsys):
    f = tmp_path / "stack.tif"
    pages = [Image.fromarray(np.full((40, 48), v, np.uint8)) for v in (10, 200)]
    pages[0].save(f, save_all=True, append_images=pages[1:])
    refused(["predict", "--model", run, "--input", f, "--out", tmp_path / "pr", "--device", "cpu"], capsys,
            "stack.tif", "2 pages")


# --- tracebacks and unclear messages -------------------------------------------------------------------------


def test_a_torn_config_or_latest_json(data, recipe, run, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    (bad / "config.json").write_text((run / "config.json").read_text()[:100])
    refused(["evaluate", "--model", bad, "--out", tmp_path / "ev", "--device", "cpu"], capsys,
            bad / "config.json", "not valid JSON")
    cfg = json.loads((run / "config.json").read_text())
    cfg["num_classes"] = "three"
    (bad / "config.json").write_text(json.dumps(cfg))
    refused(["evaluate", "--model", bad, "--out", tmp_path / "ev", "--device", "cpu"], capsys,
            bad / "config.json", "num_classes is 'three'")
    out = tmp_path / "pre"
    base = ["pretrain", "--data", str(data), "--out", str(out), "--recipe", str(recipe), *T]
    assert main(base) == 0
    (out / "latest.json").write_text('{"step": 2, "di')  # torn: the newest whole checkpoint is used
    assert main([*base, "--resume", "--steps", "3"]) == 0
    assert "latest.json is unreadable" in capsys.readouterr().out


def test_evaluate_does_not_suggest_a_flag_it_lacks(data, run, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(data, ds)
    mask = np.asarray(Image.open(ds / "masks" / "img_04.png")).copy()
    mask[0, 0] = 7
    Image.fromarray(mask).save(ds / "masks" / "img_04.png")
    line = refused(["evaluate", "--model", run, "--data", ds, "--out", tmp_path / "ev", "--device", "cpu"], capsys,
                   "img_04.png", "the run predicts 3 classes")
    assert "--num-classes" not in line


def test_folders_and_links_among_the_images_are_named_as_such(data, recipe, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(data, ds)
    (ds / "images" / "img_03.png").unlink()
    (ds / "images" / "img_03.png").mkdir()
    refused(["pretrain", "--data", ds, "--out", tmp_path / "a", "--recipe", recipe, *T], capsys, "img_03.png",
            "a folder")
    (ds / "images" / "img_03.png").rmdir()
    os.symlink("img_03.png", ds / "images" / "img_03.png")  # a link to itself
    refused(["pretrain", "--data", ds, "--out", tmp_path / "a", "--recipe", recipe, *T], capsys, "img_03.png", "loops")
    (ds / "images" / "img_03.png").unlink()
    os.symlink("gone.png", ds / "images" / "img_03.png")
    refused(["pretrain", "--data", ds, "--out", tmp_path / "a", "--recipe", recipe, *T], capsys, "img_03.png",
            "does not exist")


def test_grey_alpha_and_signed_masks(data, recipe, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(data, ds)
    m = np.asarray(Image.open(data / "masks" / "img_01.png"))
    Image.fromarray(np.dstack([m, np.full_like(m, 255)]), "LA").save(ds / "masks" / "img_01.png")  # opaque alpha
    out = tmp_path / "ok"
    assert main(["finetune", "--data", str(ds), "--out", str(out), "--strategy", "scratch", "--labels", "4", "--recipe",
                 str(recipe), *T]) == 0
    Image.fromarray(np.dstack([m, np.full_like(m, 128)]), "LA").save(ds / "masks" / "img_01.png")
    refused(["finetune", "--data", ds, "--out", tmp_path / "a", "--strategy", "scratch", "--labels", "4", "--recipe", recipe,
             *T], capsys, "img_01.png", "alpha")
    Image.fromarray(m).save(ds / "masks" / "img_01.png")
    signed = m.astype(np.int8)
    signed[0, 0] = -1
    (ds / "masks" / "img_02.png").unlink()
    import tifffile  # writes a true signed 8-bit TIFF (SampleFormat 2), which Pillow reads as unsigned

    tifffile.imwrite(ds / "masks" / "img_02.tif", signed)
    refused(["finetune", "--data", ds, "--out", tmp_path / "b", "--strategy", "scratch", "--labels", "4", "--recipe", recipe,
             *T], capsys, "img_02.tif", "negative")


# --- volumes ---------------------------------------------------------------------------------------------------


def nnunet(root: Path, image: np.ndarray, affine=None, labels=None) -> Path:
    """A one-case nnU-Net raw dataset with ``image`` as its channel-0 volume and a label of two slabs."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    img = nib.Nifti1Image(image.astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    if affine is not None:  # nibabel will not write a singular qform; a singular sform it writes
        img.set_sform(affine, code=1)
        img.set_qform(None, code=0)
    nib.save(img, str(root / "imagesTr" / "c_0000.nii.gz"))
    shape = image.shape[:3] if image.ndim >= 3 else image.shape + (1,)
    lab = np.zeros(shape, np.uint8)
    lab[4:12, 4:12, :] = 1
    nib.save(nib.Nifti1Image(lab, np.diag([1.0, 1.0, 2.0, 1.0])), str(root / "labelsTr" / "c.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"},
                                                   "labels": labels or {"background": 0, "tissue": 1},
                                                   "file_ending": ".nii.gz"}))
    return root


def volume(shape=(16, 16, 8)) -> np.ndarray:
    return np.random.default_rng(0).normal(100, 20, shape).astype(np.float32)


@pytest.mark.parametrize("case", ["2d", "4d", "nan", "singular", "labels-list", "label-not-int"])
def test_broken_volumes_are_refused_before_the_run_folder(case, recipe, tmp_path, capsys):
    image, affine, labels = volume(), None, None
    if case == "2d":
        image = volume((16, 16))
    elif case == "4d":
        image = volume((16, 16, 8, 2))
    elif case == "nan":
        image[3, 4, 5] = np.nan
    elif case == "singular":
        affine = np.diag([1.0, 0.0, 2.0, 1.0])
    elif case == "labels-list":
        labels = ["background", "tissue"]
    else:
        labels = {"background": 0, "tissue": "one"}
    root = nnunet(tmp_path / "ds", image, affine, labels)
    out = tmp_path / "run"
    where = "dataset.json" if case.startswith("label") else "c_0000.nii.gz"
    line = refused(["pretrain", "--data", root, "--out", out, "--recipe", recipe, *T, "--channels", "1"], capsys,
                   where)
    assert {"2d": "3D", "4d": "3D", "nan": "finite", "singular": "affine", "labels-list": "labels must map",
            "label-not-int": "integers"}[case] in line
    assert not out.exists()
