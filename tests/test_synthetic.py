"""Synthetic (image, mask) pairs from a hybrid run as extra fine-tuning pairs (``--synthetic RUN:N``)."""
import json

import pytest
import torch

from conftest import tiny_model, tiny_run
from labeldiff.cli import main
from labeldiff.config import CorruptionConfig, RunConfig
from labeldiff.config import parse_synthetic
from labeldiff.data.datasets import StepBatches
from labeldiff.data.folders import LabeledFolder
from labeldiff.data.io import DataError
from labeldiff.pretrain.run import run_pretrain
from labeldiff.runs import RunFolder
from labeldiff.sample import synthetic
from labeldiff.sample.synthetic import ensure_synthetic
from labeldiff.study.stats import axis_differences
from labeldiff.transfer.run import run_transfer


def _pretrain(data, tmp, method="hybrid", size=16):
    cfg = RunConfig(kind="pretrain", model=tiny_model(3), corruption=CorruptionConfig(method=method, prediction="sample"))
    cfg.data.path, cfg.data.size, cfg.data.channels = str(data), size, 3
    cfg.train.steps, cfg.train.batch_size, cfg.train.precision, cfg.train.device = 2, 2, "fp32", "cpu"
    cfg.train.warmup_steps, cfg.train.ema_decay = 1, 0.0
    run_pretrain(cfg, tmp / f"{method}{size}")
    return tmp / f"{method}{size}"


def test_parse_synthetic_takes_run_colon_n_and_says_the_form_otherwise(tmp_path):
    assert parse_synthetic("runs/hy:brid:12") == (tmp_path.__class__("runs/hy:brid"), 12)
    for bad in ("runs/hybrid", "runs/hybrid:0", ":5", "runs/hybrid:x"):
        with pytest.raises(ValueError, match="give RUN:N"):
            parse_synthetic(bad)


def test_extra_pairs_take_their_share_of_each_batch_aligned_with_their_masks(binary_dataset):
    """Synthetic images are exactly ±0.5 (bright left half = class 1): they fill ~fraction of the slots,
    and flips move image and mask together, for real and synthetic slots alike."""
    ds = LabeledFolder(binary_dataset)
    cfg = tiny_run(binary_dataset).data
    images = torch.full((3, 3, 16, 16), -0.5)
    images[..., :8] = 0.5
    masks = (images[:, 0] > 0).long()
    batches = StepBatches(ds.samples(ds.stems("train")), cfg, 64, seed=3, labeled=True, num_classes=2, flips="hv",
                          extra=(images, masks), extra_fraction=0.25)
    shares, left = [], []
    for step in range(4):
        b = batches[step]
        assert torch.equal(b["mask"] == 1, b["image"].mean(1) > 0)  # aligned in every slot
        synth = (b["image"].abs() == 0.5).flatten(1).all(1)
        shares.append(float(synth.float().mean()))
        left.extend((b["mask"][synth][:, :, :8] == 1).flatten(1).all(1).tolist())  # else h-flipped: bright right
        assert (b["mask"][synth].sum((1, 2)) == 16 * 8).all()
    assert 0.15 < sum(shares) / 4 < 0.35, shares
    assert 0 < sum(left) < len(left)  # flipped and unflipped synthetic slots
    plain = StepBatches(ds.samples(ds.stems("train")), cfg, 64, seed=3, labeled=True, num_classes=2, flips="hv")
    assert not (plain[0]["image"].abs() == 0.5).flatten(1).all(1).any()


def synthetic_pairs(spec, target, num_classes):
    """Sample what is missing, then read the cache, as `finetune --synthetic` does."""
    cache = ensure_synthetic(spec)
    run, n = parse_synthetic(spec)
    return (*RunFolder.open(run).synthetic_pairs(n, target, num_classes), cache)


def test_pairs_are_sampled_once_cached_by_chunk_and_prefix_stable(binary_dataset, tmp_path, monkeypatch):
    run = _pretrain(binary_dataset, tmp_path)
    target = tiny_run(binary_dataset)
    with pytest.raises(FileNotFoundError, match="1 of 1 cache files are not sampled yet"):
        RunFolder.open(run).synthetic_pairs(5, target, 2)  # reading never samples
    images, masks, cache = synthetic_pairs(f"{run}:5", target, 2)
    assert images.shape == (5, 3, 16, 16) and masks.shape == (5, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and set(masks.unique().tolist()) <= {0, 1}
    assert sorted(p.name for p in cache.iterdir()) == ["chunk_0000.safetensors", "digests.json"]
    sampled = []
    real = synthetic.sample_chunks
    monkeypatch.setattr(synthetic, "sample_chunks", lambda src, which, *a: (sampled.append(which), real(src, which, *a)))
    again, again_masks, _ = synthetic_pairs(f"{run}:20", target, 2)
    assert sampled == [[1]]  # only the missing chunk
    assert torch.equal(again[:5], images) and torch.equal(again_masks[:5], masks) and len(again) == 20


def test_under_torchrun_only_rank_0_samples(binary_dataset, tmp_path, monkeypatch):
    """Before the process group forms, ranks > 0 return the cache folder without sampling (they wait for
    rank 0 at the rendezvous); rank 0 samples what is missing."""
    run = _pretrain(binary_dataset, tmp_path)
    monkeypatch.setenv("RANK", "1")
    cache = ensure_synthetic(f"{run}:4")
    assert cache == run / "synthetic" / "ddim50" and not cache.exists()
    monkeypatch.setenv("RANK", "0")
    assert ensure_synthetic(f"{run}:4") == cache and (cache / "chunk_0000.safetensors").is_file()


def test_a_source_that_cannot_give_the_targets_pairs_is_refused(binary_dataset, tmp_path):
    target = tiny_run(binary_dataset)
    with pytest.raises(ValueError, match="only hybrid runs"):
        synthetic_pairs(f"{_pretrain(binary_dataset, tmp_path, method='ddpm')}:4", target, 2)
    with pytest.raises(DataError, match="samples 32² images with 3 channels and 2 classes, but this fine-tuning "
                                        "trains on 16²"):
        synthetic_pairs(f"{_pretrain(binary_dataset, tmp_path, size=32)}:4", target, 2)


def test_finetune_cli_samples_the_pairs_records_them_and_the_probe_refuses(binary_dataset, tmp_path):
    """`labeldiff finetune --synthetic RUN:8` samples the missing chunk into the hybrid run, then trains."""
    run = _pretrain(binary_dataset, tmp_path)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("model:\n  num_head_channels: 8\n  num_res_blocks: 1\ntrain:\n  warmup_steps: 1\n")
    assert main(["finetune", "--data", str(binary_dataset), "--out", str(tmp_path / "ft"), "--strategy", "scratch",
                 "--labels", "2", "--synthetic", f"{run}:8", "--head-hidden", "8", "--size", "16", "--steps", "2",
                 "--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--channels", "3",
                 "--unet-channels", "8,16", "--attention", "0,0", "--recipe", str(recipe)]) == 0
    record = json.loads((tmp_path / "ft" / "labeled.json").read_text())["synthetic"]
    assert record == {"pairs": 8, "cache": str(run / "synthetic" / "ddim50"), "fraction": 0.5}
    assert (run / "synthetic" / "ddim50" / "chunk_0000.safetensors").is_file()
    cfg = tiny_run(binary_dataset, steps=2)
    cfg.transfer.strategy, cfg.transfer.synthetic, cfg.transfer.pretrained = "probe", f"{run}:8", str(run)
    with pytest.raises(ValueError, match="the probe trains on the pixels of the labeled images only"):
        run_transfer(cfg, tmp_path / "probe")
    assert not (tmp_path / "probe").exists()


def test_protocol_differences_pair_each_protocol_with_the_first_by_seed_and_subset():
    rows = []
    for seed, (a, b) in enumerate([(0.50, 0.60), (0.40, 0.45), (0.70, 0.74)]):
        for protocol, dice in (("none", a), ("synth", b)):
            rows.append({"method": "ddpm", "strategy": "full", "protocol": protocol, "k": 1, "seed": seed,
                         "select": "random", "stems": f"s{seed}", "dice": dice})
    rows.append({**rows[-1], "seed": 9, "stems": "other"})  # no "none" cell for seed 9: not paired
    rows.append({**rows[-1], "protocol": "synth", "seed": 0, "stems": "other"})  # another subset: not paired
    (d,) = axis_differences(rows, "protocol", "none", same_subset=True)
    diffs = torch.tensor([0.10, 0.05, 0.04], dtype=torch.float64)
    half = 4.302652729911275 * float(diffs.std()) / 3 ** 0.5  # t(0.975, 2)
    assert d["protocol"] == "synth" and d["n"] == 3
    assert d["mean"] == pytest.approx(float(diffs.mean())) and d["low"] == pytest.approx(float(diffs.mean()) - half)
