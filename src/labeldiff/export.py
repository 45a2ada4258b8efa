"""``labeldiff export RUN --out BUNDLE``: a run's segmenter in the formats the field already uses.

- **A MONAI bundle** (the default), which ``python -m monai.bundle run`` executes without labeldiff::

      BUNDLE/configs/metadata.json    classes, input and output format, the run's provenance and licence
      BUNDLE/configs/inference.json   load → the run's intensities and geometry → the network (a sliding
                                      window in crop mode) → labels at the input's size → PNG / NIfTI
      BUNDLE/models/model.ts          the network as TorchScript, its timestep fixed where the run fixes it
      BUNDLE/scripts/labeldiff_portable.py   labeldiff.portable, copied: the steps labeldiff predict takes
      BUNDLE/docs/README.md, config.json, labeled.json, trained_on.json   how to run it; where it came from

  Run it from the bundle's folder (``python -m`` puts that folder on the path, so ``scripts`` imports)::

      cd BUNDLE && python -m monai.bundle run --config_file configs/inference.json --dataset_dir IN --output_dir OUT

- **TorchScript** alone (``--format torchscript``): ``model.ts``, input ``[B, C, S, S]`` in [-1, 1] at the
  network's scale, output class scores ``[B, K, S, S]``.
- **ONNX** (``--format onnx``, when the ``onnx`` package is installed): ``model.onnx`` of the same network,
  checked against PyTorch with ``onnxruntime`` when that is installed.

Every format is checked before it is written: the exported network's output on a test input equals the
run's own within float tolerance. A probe in crop mode predicts on whole images whose feature noise has the
image's size; it exports in resize mode only.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from labeldiff.errors import ConfigError, RunFolderError

FORMATS = ("bundle", "torchscript", "onnx")
ATOL = 1e-4  # the exported network against the run's own, on the same input (fp32)


def _network(run) -> torch.nn.Module:
    """The run's segmenter on the CPU in fp32, refusing what cannot be exported faithfully."""
    if run.kind == "probe" and run.config.data.mode != "resize":
        raise ConfigError(f"{run.path} is a probe in crop mode: it predicts on whole images, with feature noise the "
                          f"size of each image, which a traced network cannot hold; export a probe trained with "
                          f"--mode resize, or fine-tune the run (--strategy full) and export that")
    net = run.segmenter("cpu").float().eval()
    if run.kind == "probe":  # its fixed noise, drawn from a seeded generator per call, as the constant it is
        features = net.extractor.extractor
        shape = (run.config.data.channels, run.config.data.size, run.config.data.size)
        fixed = features.noise(shape)
        features.noise = lambda s, fixed=fixed: fixed
    return net


def _example(run, batch: int = 1) -> torch.Tensor:
    c, s = run.config.data.channels, run.config.data.size
    return torch.linspace(-1, 1, batch * c * s * s).reshape(batch, c, s, s).roll(7, -1)


def torchscript(run, path: Path) -> Path:
    """``path``: the run's network traced with TorchScript; checked on two inputs (batch 1 and 3)."""
    net = _network(run)
    with torch.no_grad():
        traced = torch.jit.trace(net, _example(run), check_trace=False)
        for batch in (1, 3):
            x = _example(run, batch)
            got, want = traced(x), net(x)
            if got.shape != want.shape or not torch.allclose(got, want, atol=ATOL):
                raise RunFolderError(f"{run.path}: the traced network differs from the run's own on a batch of {batch} "
                                     f"(max |Δ| {float((got - want).abs().max()):.2e}); this run cannot be exported as "
                                     f"TorchScript")
    path.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(path))
    return path


def onnx(run, path: Path) -> Path:
    """``path``: the network as ONNX (opset 17, dynamic batch); compared with PyTorch via onnxruntime when it is
    installed."""
    try:
        import onnx as _onnx  # noqa: F401
    except ImportError:
        raise ConfigError("--format onnx needs the onnx package (pip install onnx onnxruntime)") from None
    net = _network(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(net, (_example(run),), str(path), input_names=["image"], output_names=["scores"],
                          dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    try:
        import onnxruntime
    except ImportError:
        print(f"onnx: wrote {path}; onnxruntime is not installed, so its output was not compared with PyTorch's")
        return path
    x = _example(run, 2)
    got = onnxruntime.InferenceSession(str(path)).run(None, {"image": x.numpy()})[0]
    want = net(x).detach().numpy()
    err = float(abs(got - want).max())
    if err > ATOL * 10:
        raise RunFolderError(f"{path}: onnxruntime's output differs from PyTorch's by {err:.2e}")
    print(f"onnx: wrote {path}; onnxruntime matches PyTorch to {err:.1e} (max |Δ| on a batch of 2)")
    return path


def _volume_run(cfg) -> bool:
    return cfg.data.intensity is not None  # a volume dataset's run stores its fitted intensity scheme


def inference_config(run) -> dict:
    """The bundle's ``inference.json``: MONAI's loader, dataset, evaluator, inferer; labeldiff's own steps from
    ``scripts.labeldiff_portable``."""
    cfg = run.config
    d, volume = cfg.data, _volume_run(cfg)
    portable = "scripts.labeldiff_portable"
    whole = d.mode == "resize" or run.kind == "probe"
    inner = {"_target_": "SimpleInferer"} if whole else {
        "_target_": "SlidingWindowInferer", "roi_size": [d.size, d.size], "sw_batch_size": 8, "overlap": 0.25,
        "mode": "gaussian"}
    load = {"_target_": "LoadImaged", "keys": "image", "image_only": False, "dtype": None}
    if volume:
        load["reader"] = "NibabelReader"
        to_input = {"_target_": f"{portable}.VolumeInputd", "key": "image", "channels": d.channels,
                    "axis": d.axis, "intensity": d.intensity}
        pattern = "*.nii*"
    else:
        load.update(reader="PILReader", reverse_indexing=False)
        to_input = {"_target_": f"{portable}.ImageInputd", "key": "image", "channels": d.channels}
        pattern = "*"
    return {
        "imports": ["$import glob", "$import os", "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "input",
        "output_dir": "output",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "datalist": f"$[{{'image': p}} for p in sorted(glob.glob(os.path.join(@dataset_dir, '{pattern}')))]",
        "network": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location=@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            load, to_input,
            {"_target_": f"{portable}.ToNetworkd", "key": "image", "mode": d.mode, "size": d.size, "scale": d.scale}]},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": f"{portable}.BatchInferer", "inner": inner},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": f"{portable}.FromNetworkd", "key": "pred"},
            {"_target_": f"{portable}.SaveLabelsd", "key": "pred", "output_dir": "@output_dir"}]},
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def metadata(run, license_text: str) -> dict:
    """The bundle's ``metadata.json``: what goes in and out, the classes, the run and where it came from."""
    import monai
    import numpy

    cfg = run.config
    d = cfg.data
    names = _class_names(run)
    evaluation = _evaluation(run)
    return {
        "version": "0.1.0",
        "changelog": {"0.1.0": "exported by labeldiff"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "optional_packages_version": {"nibabel": _version("nibabel"), "pillow": _version("PIL")},
        "name": f"labeldiff {run.path.name}",
        "task": "semantic segmentation",
        "description": f"A labeldiff {run.kind} run ({run.method} pretraining, strategy "
                       f"{cfg.transfer.strategy if run.kind != 'pretrain' else 'none: the run segments as it is'}), "
                       f"{d.channels}-channel input, {len(names)} classes.",
        "authors": "labeldiff export",
        "copyright": license_text,
        "license": license_text,
        "data_source": str(d.path),
        "data_type": "nifti" if _volume_run(cfg) else "png/jpeg",
        "intended_use": "research; check it on your own images before relying on it",
        "label_classes": {str(i): n for i, n in enumerate(names)},
        "eval_metrics": evaluation,
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "num_channels": d.channels,
                                 "spatial_shape": [d.size, d.size], "dtype": "float32", "value_range": [-1, 1],
                                 "is_patch_data": d.mode == "crop",
                                 "channel_def": {str(i): f"channel {i}" for i in range(d.channels)}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": len(names),
                                 "spatial_shape": [d.size, d.size], "dtype": "float32", "value_range": [],
                                 "is_patch_data": d.mode == "crop",
                                 "channel_def": {str(i): n for i, n in enumerate(names)}}}},
        "labeldiff": {"kind": run.kind, "method": run.method, "geometry": {"mode": d.mode, "size": d.size,
                      "scale": d.scale, "channels": d.channels, "axis": d.axis, "intensity": d.intensity},
                      "timestep": cfg.transfer.t if run.kind == "finetune" else 0},
    }


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "unknown"


def _class_names(run) -> list[str]:
    k = int(run.config.num_classes or 2)
    path = Path(run.config.data.path)
    for name in ("dataset.json", "classes.json"):
        try:
            raw = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        labels = raw.get("labels", raw) if isinstance(raw, dict) else raw
        if isinstance(labels, dict):  # nnU-Net: name → id
            by_id = {int(v): str(n) for n, v in labels.items() if str(v).lstrip("-").isdigit()}
            if len(by_id) >= k:
                return [by_id.get(i, f"class {i}") for i in range(k)]
        if isinstance(labels, list) and len(labels) >= k:
            return [str(n) for n in labels[:k]]
    return ["background"] + [f"class {i}" for i in range(1, k)]


def _evaluation(run) -> dict:
    for metrics in sorted(run.path.glob("eval_*/metrics.json")):
        try:
            m = json.loads(metrics.read_text())
            return {"split": m.get("split"), "mean_dice": m["dice"]["mean"], "mean_iou": m["iou"]["mean"]}
        except (OSError, ValueError, KeyError):
            continue
    return {}


README = """# {name}

A MONAI bundle exported by `labeldiff export` from the run `{run}`. It runs without labeldiff:

```bash
cd {bundle}
python -m monai.bundle run --config_file configs/inference.json --dataset_dir INPUT_FOLDER --output_dir OUTPUT_FOLDER
```

Inputs: {inputs}. Each input gives `NAME_seg.{ext}` in the output folder (pixel or voxel value = class).
Classes: {classes}.

The steps are those `labeldiff predict` takes (`scripts/labeldiff_portable.py` is labeldiff's own code for them):
{steps}

Where it came from: `config.json` (every setting of the run), `labeled.json` (the labeled images it was
fine-tuned on), `trained_on.json` (the images its pretraining read), when the run has them.
Licence: {license}.
"""


def bundle(run, out: Path, license_text: str) -> Path:
    """The MONAI bundle of the run in ``out`` (see the module docstring)."""
    from labeldiff import portable

    out = Path(out)
    torchscript(run, out / "models" / "model.ts")
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "configs" / "inference.json").write_text(json.dumps(inference_config(run), indent=2))
    meta = metadata(run, license_text)
    (out / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    (out / "scripts").mkdir(exist_ok=True)
    (out / "scripts" / "__init__.py").write_text("")
    shutil.copy(Path(portable.__file__), out / "scripts" / "labeldiff_portable.py")
    docs = out / "docs"
    docs.mkdir(exist_ok=True)
    for name in ("config.json", "labeled.json", "trained_on.json"):
        if (run.path / name).is_file():
            shutil.copy(run.path / name, docs / name)
    d = run.config.data
    volume = _volume_run(run.config)
    steps = (f"- read with MONAI's NibabelReader; the volume turned to the RAS frame; intensities by the run's "
             f"scheme `{(d.intensity or {}).get('scheme')}`; every slice along axis {d.axis} rotated and padded to a "
             f"square as in training\n" if volume else
             "- read with MONAI's PILReader (rows first); pixels to [-1, 1] (8-bit / 255, 16-bit / 65535)\n")
    steps += (f"- resized (bilinear, antialiased) to {d.size}×{d.size}\n" if d.mode == "resize" else
              f"- scaled by {d.scale} (bilinear, antialiased); a {d.size}² window slid over it (overlap 0.25, "
              f"Gaussian weights)\n")
    steps += "- class scores resized back to the input's size (bilinear), then the argmax\n"
    (docs / "README.md").write_text(README.format(
        name=meta["name"], run=run.path, bundle=out, inputs="NIfTI volumes (*.nii, *.nii.gz)" if volume else
        "2D images (PNG, JPEG, TIFF)", ext="nii.gz" if volume else "png",
        classes=", ".join(f"{i} {n}" for i, n in meta["label_classes"].items()), steps=steps, license=license_text))
    return out


def export(run_dir: Path, out: Path, fmt: str = "bundle", license_text: str | None = None) -> Path:
    """Write ``run_dir``'s segmenter to ``out`` as ``fmt`` (bundle, torchscript or onnx); returns what was written."""
    from labeldiff.runs import BACKBONE_FILE, RunFolder

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    run = RunFolder.open(run_dir)
    run.verify(BACKBONE_FILE if run.kind == "probe" else "model.safetensors")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; give a new folder")
    license_text = license_text or ("not stated: the weights carry the terms of the data they were trained on "
                                    f"({run.config.data.path}); set it with --license")
    if fmt == "bundle":
        return bundle(run, out, license_text)
    if fmt == "torchscript":
        return torchscript(run, out / "model.ts")
    return onnx(run, out / "model.onnx")
