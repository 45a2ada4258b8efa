"""Shared fixtures: small generated labeled datasets, a few real MoNuSeg pairs, tiny configs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.draw import disk, rectangle

from labeldiff.config import DataConfig, ModelConfig, RunConfig, TrainConfig, TransferConfig

def _datasets() -> Path:
    """The shared benchmark data: ``$LABELDIFF_DATASETS`` where set (a machine with a copy elsewhere, such as
    a GPU machine the checkout was sent to), else next to the checkout (../shared/datasets), else the
    workplace's copy."""
    import os

    given = [Path(os.environ["LABELDIFF_DATASETS"])] if os.environ.get("LABELDIFF_DATASETS") else []
    for root in (*given, Path(__file__).resolve().parents[2] / "shared" / "datasets", Path("/work/shared/datasets")):
        if root.is_dir():
            return root
    return Path(__file__).resolve().parents[2] / "shared" / "datasets"


DATASETS = _datasets()

# tiny models gain nothing from intra-op threads, and OpenMP barriers stall badly when the 2 cores are busy
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def scan_cache(tmp_path_factory):
    """check_decodes remembers decoded files in a cache of the test session, not the user's ~/.cache."""
    import os

    folder = tmp_path_factory.mktemp("labeldiff-cache")
    old = os.environ.get("LABELDIFF_CACHE")
    os.environ["LABELDIFF_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("LABELDIFF_CACHE", None)
    else:
        os.environ["LABELDIFF_CACHE"] = old


def write_labeled_dataset(root: Path, n: int = 6, k: int = 3, hw: tuple[int, int] = (40, 48), n_train: int = 4,
                          seed: int = 0) -> Path:
    """Write ``n`` RGB PNG images (``hw``) with a bright disk and a bright rectangle on a dark noisy
    background, and uint8 masks with the same stems: disk = class 1, rectangle = class 2 (class 1 when
    ``k == 2``), background 0. Every foreground pixel is brighter than mid-grey and every background
    pixel darker. ``split.json`` holds the first ``n_train`` stems as train and the rest as test."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    h, w = hw
    stems = []
    for i in range(n):
        img = rng.integers(10, 60, size=(h, w, 3)).astype(np.uint8)
        mask = np.zeros((h, w), dtype=np.uint8)
        r = int(rng.integers(5, 9))
        cy, cx = int(rng.integers(r, h // 2)), int(rng.integers(r, w - r))
        rr, cc = disk((cy, cx), r, shape=(h, w))
        mask[rr, cc] = 1
        top, left = int(rng.integers(h // 2 + 2, h - 10)), int(rng.integers(0, w - 14))
        rr, cc = rectangle((top, left), extent=(8, 12), shape=(h, w))
        mask[rr, cc] = 2 if k >= 3 else 1
        img[mask == 1] = rng.integers(180, 255, size=(int((mask == 1).sum()), 3)) * np.array([1.0, 0.8, 0.8])
        img[mask == 2] = rng.integers(180, 255, size=(int((mask == 2).sum()), 3)) * np.array([0.8, 1.0, 0.8])
        stem = f"img_{i:02d}"
        Image.fromarray(img, "RGB").save(root / "images" / f"{stem}.png")
        Image.fromarray(mask, "L").save(root / "masks" / f"{stem}.png")
        stems.append(stem)
    (root / "split.json").write_text(json.dumps({"train": stems[:n_train], "test": stems[n_train:]}))
    return root


@pytest.fixture
def make_dataset():
    """The dataset writer, for tests that need several or customised datasets."""
    return write_labeled_dataset


@pytest.fixture
def labeled_dataset(tmp_path) -> Path:
    """6 images 40×48 RGB + masks with K=3, split 4 train / 2 test."""
    return write_labeled_dataset(tmp_path / "data", n=6, k=3)


@pytest.fixture
def binary_dataset(tmp_path) -> Path:
    """6 images 40×48 RGB + masks with K=2 (foreground = brighter than mid-grey), split 4 / 2."""
    return write_labeled_dataset(tmp_path / "data2", n=6, k=2)


@pytest.fixture
def monuseg_small(tmp_path) -> Path:
    """3 real MoNuSeg image/mask pairs downscaled to 64×64 (masks nearest), split 2 train / 1 test."""
    src = DATASETS / "monuseg"
    if not (src / "images").is_dir():
        pytest.skip(f"real data not available at {src}")
    root = tmp_path / "monuseg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    stems = json.loads((src / "split.json").read_text())["train"][:3]
    for s in stems:
        with Image.open(src / "images" / f"{s}.png") as im:
            im.convert("RGB").resize((64, 64), Image.BILINEAR).save(root / "images" / f"{s}.png")
        with Image.open(src / "masks" / f"{s}.png") as m:
            m.resize((64, 64), Image.NEAREST).save(root / "masks" / f"{s}.png")
    (root / "split.json").write_text(json.dumps({"train": stems[:2], "test": stems[2:]}))
    return root


def tiny_model(in_channels: int = 3) -> ModelConfig:
    return ModelConfig(in_channels=in_channels, channels=(8, 16), num_res_blocks=1, attention_levels=(False, False),
                       norm_num_groups=8, num_head_channels=8)


@pytest.fixture
def tiny_model_config():
    return tiny_model


def tiny_run(data: Path, kind: str = "pretrain", **train) -> RunConfig:
    """A RunConfig with the tiny UNet, 16² crops, batch 2, fp32 on CPU; ``train`` overrides TrainConfig."""
    t = dict(steps=4, batch_size=2, lr=1e-3, warmup_steps=2, ema_decay=0.9, checkpoint_every=100, log_every=1,
             precision="fp32", device="cpu", seed=0)
    t.update(train)
    return RunConfig(kind=kind, model=tiny_model(3), data=DataConfig(path=str(data), size=16, channels=3),
                     train=TrainConfig(**t), transfer=TransferConfig(head_hidden=8))


@pytest.fixture
def tiny_run_config():
    return tiny_run


def read_log(run_dir: Path) -> dict[int, dict]:
    """log.jsonl as {step: record}, later lines winning (a resumed run may repeat steps)."""
    out: dict[int, dict] = {}
    for line in (Path(run_dir) / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out


@pytest.fixture
def log_reader():
    return read_log



@pytest.fixture(scope="module")
def module_dataset(tmp_path_factory) -> Path:
    """Like ``labeled_dataset`` (K=3, 4 train / 2 test) but shared by the tests of one module."""
    return write_labeled_dataset(tmp_path_factory.mktemp("data") / "data", n=6, k=3)


def open_pretrained(run_dir):
    """(pretext network, config) of a pretraining run, through the one loader."""
    from labeldiff.runs import RunFolder

    run = RunFolder.open(run_dir)
    return run.pretext_network(), run.config


def open_segmenter(run_dir, device="cpu"):
    """(segmenter, config) of any run that segments, through the one loader."""
    from labeldiff.runs import RunFolder

    run = RunFolder.open(run_dir)
    return run.segmenter(device), run.config


def interrupt_on_call(n: int):
    """A replacement for ``labeldiff.pretrain.run.pretext_loss`` whose loss function raises KeyboardInterrupt
    on its ``n``-th call (a Ctrl-C in step n); monkeypatch it in, then ``monkeypatch.undo()``."""
    import labeldiff.pretrain.run as pretrain_run

    real = pretrain_run.pretext_loss

    def factory(corruption):
        fn, calls = real(corruption), [0]

        def wrapped(model, batch, g):
            calls[0] += 1
            if calls[0] == n:
                raise KeyboardInterrupt
            return fn(model, batch, g)

        return wrapped

    return factory


def write_tiny_study(root: Path, pretrain_steps: int = 2, finetune_steps: int = 2, **study) -> Path:
    """``root/`` with data/ (6 images, K=3, 4 train / 2 test), pre.yaml and ft.yaml (the 8,16 UNet, batch 2,
    fp32 on the CPU, no augmentation) and s.yaml: ddpm with full and scratch at k = 2, seed 0, with
    ``study``'s keys replacing those; returns s.yaml."""
    import yaml

    write_labeled_dataset(root / "data", n=6, k=3)
    train = {"batch_size": 2, "precision": "fp32", "device": "cpu", "checkpoint_every": 100}
    (root / "pre.yaml").write_text(yaml.safe_dump({
        "model": {"channels": [8, 16], "attention_levels": [False, False], "num_head_channels": 8},
        "train": {"steps": pretrain_steps, **train}}))
    (root / "ft.yaml").write_text(yaml.safe_dump({"train": {"steps": finetune_steps, **train},
                                                  "transfer": {"head_hidden": 8, "augment": "none"}}))
    spec = {"data": {"path": "data", "size": 16, "channels": 3}, "methods": [{"name": "ddpm", "recipe": "pre.yaml"}],
            "strategies": ["full", "scratch"], "labels": [2], "seeds": [0], "finetune": {"recipe": "ft.yaml"}}
    spec.update(study)
    (root / "s.yaml").write_text(yaml.safe_dump(spec))
    return root / "s.yaml"
