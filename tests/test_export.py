"""`labeldiff export`: a MONAI bundle that MONAI's own runner executes in a process that cannot import labeldiff,
whose masks equal `labeldiff predict`'s on 2D images and on a NIfTI volume; TorchScript and ONNX equal the run's
own network."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from labeldiff.cli import main
from labeldiff.runs import RunFolder

from conftest import write_labeled_dataset
from test_volume_data import make_volume_dataset

TINY = ["--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--unet-channels", "8,16",
        "--attention", "0,0", "--head-channels", "8"]
# MONAI's runner with every labeldiff import refused: the bundle must stand on MONAI, torch and its own scripts/
RUNNER = '''
import runpy, sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name == "labeldiff" or name.startswith("labeldiff."):
            raise ImportError(name + " is blocked: the bundle must run without labeldiff")
sys.meta_path.insert(0, Blocker())
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__")
'''


def run_bundle(bundle: Path, inputs: Path, out: Path) -> None:
    pytest.importorskip("ignite", reason="MONAI's evaluator needs pytorch-ignite (the [export] extra)")
    pytest.importorskip("fire", reason="python -m monai.bundle needs fire (the [export] extra)")
    runner = bundle.parent / "no_labeldiff.py"
    runner.write_text(RUNNER)
    done = subprocess.run([sys.executable, "-W", "ignore", str(runner), "run", "--config_file",
                           "configs/inference.json", "--dataset_dir", str(inputs), "--output_dir", str(out)],
                          cwd=bundle, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float((a == b).mean())


@pytest.fixture(scope="module")
def runs2d(tmp_path_factory):
    root = tmp_path_factory.mktemp("export2d")
    data = write_labeled_dataset(root / "data", n=6, k=3)
    assert main(["pretrain", "--data", str(data), "--out", str(root / "pre"), "--steps", "4", "--size", "16",
                 "--channels", "3", *TINY]) == 0
    assert main(["finetune", "--data", str(data), "--out", str(root / "ft"), "--pretrained", str(root / "pre"),
                 "--labels", "2", "--steps", "4", "--head-hidden", "8", "--size", "16", "--batch-size", "2",
                 "--precision", "fp32", "--device", "cpu"]) == 0
    return root, data


@pytest.mark.slow
def test_a_2d_bundle_runs_without_labeldiff_and_predicts_what_labeldiff_predicts(runs2d):
    root, data = runs2d
    assert main(["export", str(root / "ft"), "--out", str(root / "bundle"), "--license", "CC-BY-4.0"]) == 0
    bundle = root / "bundle"
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["license"] == "CC-BY-4.0" and len(meta["label_classes"]) == 3
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [16, 16]
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["inferer"]["inner"]["_target_"] == "SlidingWindowInferer"  # crop mode: the run's window
    assert {"config.json", "labeled.json", "README.md"} <= {p.name for p in (bundle / "docs").iterdir()}
    run_bundle(bundle, data / "images", root / "bundle_out")
    assert main(["predict", "--model", str(root / "ft"), "--input", str(data / "images"), "--out",
                 str(root / "pred"), "--device", "cpu"]) == 0
    for mine in sorted((data / "images").glob("*.png")):
        ours = np.asarray(Image.open(root / "pred" / mine.name))
        theirs = np.asarray(Image.open(root / "bundle_out" / f"{mine.stem}_seg.png"))
        assert agreement(ours, theirs) >= 0.999, mine.name


@pytest.mark.slow
def test_a_volume_bundle_predicts_what_labeldiff_predicts_in_the_input_grid(tmp_path):
    root = make_volume_dataset(tmp_path / "Dataset001")
    assert main(["pretrain", "--data", str(root), "--out", str(tmp_path / "pre"), "--steps", "4", "--size", "16",
                 "--mode", "resize", "--channels", "1", "--intensity", "ct-window", "--hu-window", "-100", "200",
                 *TINY]) == 0
    assert main(["finetune", "--data", str(root), "--out", str(tmp_path / "ft"), "--pretrained", str(tmp_path / "pre"),
                 "--labels", "3", "--steps", "4", "--head-hidden", "8", "--batch-size", "2", "--precision", "fp32",
                 "--device", "cpu"]) == 0
    inputs = tmp_path / "in"
    inputs.mkdir()
    case = nib.load(str(root / "imagesTs" / "t_0000.nii.gz"))  # stored LPS-flipped: the bundle must reorient
    flipped = nib.Nifti1Image(np.asarray(case.dataobj)[::-1, :, ::-1].copy(),
                              case.affine @ np.array([[-1, 0, 0, 19], [0, 1, 0, 0], [0, 0, -1, 9], [0, 0, 0, 1.0]]))
    nib.save(flipped, str(inputs / "t_0000.nii.gz"))
    assert main(["export", str(tmp_path / "ft"), "--out", str(tmp_path / "bundle")]) == 0
    run_bundle(tmp_path / "bundle", inputs, tmp_path / "bundle_out")
    assert main(["predict", "--model", str(tmp_path / "ft"), "--input", str(inputs), "--out", str(tmp_path / "pred"),
                 "--device", "cpu"]) == 0
    ours = nib.load(str(next((tmp_path / "pred").glob("t*.nii.gz"))))
    theirs = nib.load(str(tmp_path / "bundle_out" / "t_0000_seg.nii.gz"))
    assert np.allclose(ours.affine, theirs.affine)
    assert agreement(np.asarray(ours.dataobj), np.asarray(theirs.dataobj)) >= 0.999


@pytest.mark.slow
def test_torchscript_and_onnx_equal_the_run_network(runs2d):
    root, _ = runs2d
    net = RunFolder.open(root / "ft").segmenter("cpu")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert main(["export", str(root / "ft"), "--out", str(root / "ts"), "--format", "torchscript"]) == 0
    ts = torch.jit.load(str(root / "ts" / "model.ts"))
    with torch.no_grad():
        assert torch.allclose(ts(x), net(x), atol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    assert main(["export", str(root / "ft"), "--out", str(root / "onnx"), "--format", "onnx"]) == 0
    got = ort.InferenceSession(str(root / "onnx" / "model.onnx")).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(got, net(x).numpy(), atol=1e-4)


@pytest.mark.slow
def test_export_refuses_a_crop_mode_probe_and_a_used_folder(runs2d, capsys):
    root, data = runs2d
    assert main(["finetune", "--data", str(data), "--out", str(root / "probe"), "--pretrained", str(root / "pre"),
                 "--strategy", "probe", "--labels", "2", "--members", "2", "--size", "16", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["export", str(root / "probe"), "--out", str(root / "probe-bundle")]) != 0
    assert "export a probe trained with --mode resize" in capsys.readouterr().err
    (root / "used").mkdir()
    (root / "used" / "x").write_text("")
    assert main(["export", str(root / "ft"), "--out", str(root / "used")]) != 0
    assert "is not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_a_hybrid_run_and_a_resize_mode_probe_export_as_the_segmenters_they_are(tmp_path):
    data = write_labeled_dataset(tmp_path / "data", n=6, k=3)
    resize = ["--size", "16", "--mode", "resize", "--channels", "3", *TINY]
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "hybrid"), "--method", "hybrid",
                 "--steps", "3", *resize]) == 0
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "pre"), "--steps", "3", *resize]) == 0
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "probe"), "--pretrained",
                 str(tmp_path / "pre"), "--strategy", "probe", "--labels", "2", "--members", "2", "--device", "cpu"]) == 0
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    for run in ("hybrid", "probe"):
        assert main(["export", str(tmp_path / run), "--out", str(tmp_path / f"{run}-ts"), "--format",
                     "torchscript"]) == 0
        ts = torch.jit.load(str(tmp_path / f"{run}-ts" / "model.ts"))
        with torch.no_grad():
            want = RunFolder.open(tmp_path / run).segmenter("cpu")(x)
            assert ts(x).shape == want.shape == (1, 3, 16, 16) and torch.allclose(ts(x), want, atol=1e-4), run
