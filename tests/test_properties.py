"""Property-based fuzzing (Hypothesis): generated images, masks, volumes and command-line values.

The invariant for every generated input, whatever it is: the command either succeeds and its result is
finite (every saved weight), or it ends with exactly one ``error:`` line that names the file or flag at
fault — and then nothing was written (a refused input leaves no run folder; a run stopped by a non-finite
loss mid-training leaves no result, ``model.safetensors``). A traceback fails the test, as would a hang or
a crash. Examples are derandomised, so CI sees the same ones every time.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from labeldiff.checkpoint import load_weights
from labeldiff.cli import main

from conftest import write_labeled_dataset

SETTINGS = settings(max_examples=int(__import__("os").environ.get("LABELDIFF_HYPOTHESIS_EXAMPLES", "30")), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
T = ["--size", "16", "--steps", "2", "--batch-size", "2", "--precision", "fp32", "--device", "cpu",
     "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text("model:\n  channels: [8, 16]\n  attention_levels: [false, false]\n  num_head_channels: 8\n"
                    "train:\n  warmup_steps: 1\ntransfer:\n  head_hidden: 8\n")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_labeled_dataset(tmp_path_factory.mktemp("prop") / "data", n=4, k=3, n_train=3)


def holds(argv: list, out: Path, capsys, names: list[str]) -> int:
    """Run the command; check the invariant; return its exit code."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse refuses a value it cannot parse: one line, exit 2
        code = e.code
    err = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    if code == 0:
        w = load_weights(out / "model.safetensors")
        assert all(bool(torch.isfinite(v).all()) for v in w.values() if v.is_floating_point())
        return 0
    assert len(err) == 1 and "error:" in err[0], err
    assert any(n in err[0] for n in names), (names, err[0])
    if code == 3:  # a non-finite loss during training: the folder exists, its result does not
        assert not (out / "model.safetensors").exists()
    else:
        assert not out.exists(), f"{out} written by a refused command"
    return code


# --- images ---------------------------------------------------------------------------------------------------

FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
IMAGES = st.one_of(
    arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 2, 3, 4]))),
    arrays(np.uint16, st.tuples(st.integers(1, 40), st.integers(1, 40))),
    arrays(np.float32, st.tuples(st.integers(1, 40), st.integers(1, 40)), elements=FLOATS),
)


def write_image(a: np.ndarray, path: Path) -> Path:
    if a.dtype == np.float32:
        path = path.with_suffix(".tif")
        Image.fromarray(a, "F").save(path)
    elif a.ndim == 3 and a.shape[2] in (1, 2, 3, 4):
        mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[a.shape[2]]
        Image.fromarray(a[..., 0] if mode == "L" else a, mode).save(path)
    else:
        Image.fromarray(a).save(path)
    return path


@SETTINGS
@given(image=IMAGES)
def test_pretraining_on_any_image(image, base, recipe, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imgs"
        folder.mkdir()
        for p in sorted((base / "images").iterdir())[:3]:
            (folder / p.name).write_bytes(p.read_bytes())
        f = write_image(image, folder / "odd.png")
        holds(["pretrain", "--data", folder, "--out", Path(tmp) / "run", "--recipe", recipe, *T], Path(tmp) / "run",
              capsys, [f.name])


# --- masks ----------------------------------------------------------------------------------------------------

MASK_VALUES = st.sampled_from([0, 1, 2, 255, 300, -1])
MASKS = st.tuples(
    st.sampled_from(["uint8", "uint16", "int8-tiff", "float32", "la", "rgb"]),
    st.sampled_from([(40, 48), (40, 47), (39, 48)]),
    st.lists(MASK_VALUES, min_size=1, max_size=3),
    st.booleans(),
)


def write_mask(kind: str, hw: tuple[int, int], values: list[int], nan: bool, path: Path) -> None:
    m = np.zeros(hw, np.int64)
    for i, v in enumerate(values):
        m[i * 5:(i + 1) * 5] = v
    if kind == "uint8":
        Image.fromarray(np.clip(m, 0, 255).astype(np.uint8)).save(path)
    elif kind == "uint16":
        Image.fromarray(np.clip(m, 0, 65535).astype(np.uint16)).save(path)
    elif kind == "int8-tiff":
        import tifffile

        tifffile.imwrite(path, np.clip(m, -128, 127).astype(np.int8))
    elif kind == "float32":
        x = m.astype(np.float32)
        if nan:
            x[0, 0] = np.nan
        Image.fromarray(x, "F").save(path, format="TIFF")
    elif kind == "la":
        g = np.clip(m, 0, 255).astype(np.uint8)
        Image.fromarray(np.dstack([g, np.full_like(g, 255 if nan else 120)]), "LA").save(path)
    else:
        g = np.clip(m, 0, 255).astype(np.uint8)
        Image.fromarray(np.dstack([g, g, g if nan else g // 2]), "RGB").save(path)


@SETTINGS
@given(mask=MASKS)
def test_fine_tuning_on_any_mask(mask, base, recipe, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        import shutil

        data = Path(tmp) / "data"
        shutil.copytree(base, data)
        write_mask(*mask, data / "masks" / "img_01.png")
        holds(["finetune", "--data", data, "--out", Path(tmp) / "run", "--strategy", "scratch", "--labels", "3",
               "--recipe", recipe, *T], Path(tmp) / "run", capsys, ["img_01"])


# --- volumes --------------------------------------------------------------------------------------------------

VOLUMES = st.tuples(
    st.sampled_from([(12, 12), (12, 12, 6), (12, 12, 6, 1), (12, 12, 6, 2), (12, 1, 6)]),
    st.sampled_from([1.0, 0.5, 3.0, 0.0, -2.0]),  # the z spacing in the affine (0: singular)
    st.sampled_from([None, float("nan"), float("inf"), 5e38]),  # one odd voxel
)


@SETTINGS
@given(vol=VOLUMES)
def test_pretraining_on_any_volume(vol, recipe, capsys):
    shape, dz, odd = vol
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        (root / "imagesTr").mkdir(parents=True)
        (root / "labelsTr").mkdir()
        x = np.random.default_rng(0).normal(50, 10, shape).astype(np.float32)
        if odd is not None:
            x.flat[7] = odd
        img = nib.Nifti1Image(x, np.eye(4))
        img.set_sform(np.diag([1.0, 1.0, dz, 1.0]), code=1)
        img.set_qform(None, code=0)
        nib.save(img, str(root / "imagesTr" / "c_0000.nii.gz"))
        lab = np.zeros(shape[:3] if len(shape) >= 3 else shape, np.uint8)
        lab[2:8, 2:8] = 1
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / "labelsTr" / "c.nii.gz"))
        (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"},
                                                       "labels": {"background": 0, "tissue": 1},
                                                       "file_ending": ".nii.gz"}))
        holds(["pretrain", "--data", root, "--out", Path(tmp) / "run", "--recipe", recipe, *T, "--channels", "1"],
              Path(tmp) / "run", capsys, ["c_0000.nii.gz", "c.nii.gz"])


# --- command-line values --------------------------------------------------------------------------------------

ODD_FLOATS = st.one_of(st.sampled_from([0.0, -1.0, math.inf, -math.inf, math.nan, 1e300, 1e39, 1e-300]),
                       st.floats(0.001, 20))
ODD_INTS = st.sampled_from([-1, 0, 1, 2, 7, 3, 10**9, 2**63])
FLAGS = {
    "--lr": ODD_FLOATS, "--scale": ODD_FLOATS, "--grad-clip": ODD_FLOATS, "--ema-decay": ODD_FLOATS,
    "--sigma": ODD_FLOATS, "--mask-weight": ODD_FLOATS, "--warmup-steps": ODD_INTS, "--checkpoint-every": ODD_INTS,
    "--timesteps": ODD_INTS, "--grad-accum": st.sampled_from([-1, 0, 1, 2, 3]),
    "--size": st.sampled_from([-1, 0, 7, 8, 12, 16, 24, 100000]), "--channels": st.sampled_from([-1, 0, 1, 2, 3, 4]),
    "--unet-channels": st.sampled_from(["8,16", "0,16", "8", "", "a,b", "8,-16", "8,16,32"]),
    "--patch-size": ODD_INTS, "--mask-ratio": ODD_FLOATS, "--batch-size": st.sampled_from([-1, 0, 1, 2, 3]),
}


@SETTINGS
@given(choice=st.sampled_from(sorted(FLAGS)).flatmap(lambda f: st.tuples(st.just(f), FLAGS[f])),
       method=st.sampled_from(["ddpm", "mdm"]))
def test_pretraining_with_any_setting(choice, method, base, recipe, capsys):
    flag, value = choice
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        args = ["pretrain", "--data", base, "--out", out, "--recipe", recipe, *T, "--method", method,
                flag, str(value)]
        holds(args, out, capsys, [flag, f"{flag} "])
