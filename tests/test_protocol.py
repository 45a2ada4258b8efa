"""The few-label fine-tuning protocol: augmentation, lp-ft, --keep-head and the plateau length rule."""
from __future__ import annotations

import json

import pytest
import torch

from labeldiff.checkpoint import load_weights
from labeldiff.config import CorruptionConfig, RunConfig
from labeldiff.data.augment import LEVELS, Augment
from labeldiff.data.datasets import StepBatches
from labeldiff.data.folders import LabeledFolder
from labeldiff.pretrain.run import run_pretrain
from labeldiff.runs import RunFolder
from labeldiff.transfer.finetune import LP_DIR, plateau_stop, run_finetune

from conftest import tiny_run


# --- augmentation ---------------------------------------------------------------------------------------------

def _drawn(mask: torch.Tensor) -> torch.Tensor:
    """A 3-channel image drawn from a binary mask: +1 on the mask, −1 off it."""
    return (mask.float() * 2 - 1)[None].repeat(3, 1, 1)


def _blobs(side: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    m = torch.zeros(side, side, dtype=torch.long)
    for _ in range(6):
        cy, cx, r = (int(v) for v in torch.randint(10, side - 10, (3,), generator=g))
        m |= (((yy - cy) ** 2 + (xx - cx) ** 2) < (r % 12 + 4) ** 2).long()
    m[10:30, 50:90] = 1  # a rectangle: rotations and flips of it are visible
    return m


@pytest.mark.parametrize("level", ["light", "strong"])
def test_a_mask_drawn_from_the_image_survives_the_transform(level):
    """Spatial transforms move image and mask together: thresholding the transformed image gives back
    the transformed mask (up to interpolation at edges); some seeds really move the pixels."""
    mask = _blobs()
    image = _drawn(mask)
    aug = Augment(level, 64)
    assert aug.window(96) == 96 and aug.window(200) == 96 and aug.window(50) == 64
    moved = 0
    for seed in range(40):
        x, m = aug(image, mask, seed)
        assert x.shape == (3, 64, 64) and m.shape == (64, 64) and m.dtype == torch.long
        assert set(m.unique().tolist()) <= {0, 1}
        assert float(x.min()) >= -1 and float(x.max()) <= 1
        grey = x.mean(0)
        threshold = (grey.max() + grey.min()) / 2
        agree = ((grey > threshold).long() == m).float().mean()
        assert agree > 0.95, (seed, float(agree))
        x2, m2 = aug(image, mask, seed)  # a seed fixes the transform
        assert torch.equal(x, x2) and torch.equal(m, m2)
        moved += not torch.equal(m, mask[16:80, 16:80])
    assert moved >= 10


def test_none_is_the_centre_crop_and_levels_are_checked():
    mask = _blobs()
    x, m = Augment("none", 64)(_drawn(mask), mask, 3)
    assert torch.equal(m, mask[16:80, 16:80]) and torch.equal(x, _drawn(mask)[:, 16:80, 16:80])
    with pytest.raises(ValueError, match="--augment 'heavy' is not one of none, light, strong"):
        Augment("heavy", 64)
    assert LEVELS == ("none", "light", "strong")


def test_step_batches_with_augmentation_are_aligned_and_reproducible(labeled_dataset):
    """Every augmented batch keeps masks on the bright pixels of their images (the dataset's disks and
    rectangles are brighter than mid-grey), and a step's batch does not depend on what ran before."""
    cfg = tiny_run(labeled_dataset, kind="segmentation").data
    cfg.size, cfg.mode = 16, "crop"
    ds = LabeledFolder(labeled_dataset)
    samples = ds.samples(ds.stems("train"))
    b = StepBatches(samples, cfg, 8, seed=1, labeled=True, num_classes=3, flips="hv", augment=Augment("light", 16))
    for step in (0, 5, 9):
        batch = b[step]
        grey = batch["image"].mean(1)
        fg = batch["mask"] > 0
        if fg.any() and (~fg).any():
            assert grey[fg].mean() > grey[~fg].mean() + 0.3
        again = StepBatches(samples, cfg, 8, seed=1, labeled=True, num_classes=3, flips="hv",
                            augment=Augment("light", 16))[step]
        assert torch.equal(batch["image"], again["image"]) and torch.equal(batch["mask"], again["mask"])
    plain = StepBatches(samples, cfg, 8, seed=1, labeled=True, num_classes=3)  # the pre-protocol batches
    old_style = StepBatches(samples, cfg, 8, seed=1, labeled=True, num_classes=3, flips="h", augment=None)
    assert torch.equal(plain[4]["image"], old_style[4]["image"])


# --- lp-ft, keep-head, plateau --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(module_dataset, tmp_path_factory):
    """A tiny ddpm run and a tiny supervised run (K = 3) on the module's dataset."""
    root = tmp_path_factory.mktemp("pre")
    run_pretrain(tiny_run(module_dataset, steps=2), root / "ddpm")
    sup = tiny_run(module_dataset, steps=2)
    sup.corruption = CorruptionConfig(method="supervised")
    run_pretrain(sup, root / "supervised")
    return root


def _cfg(data, pretrained, strategy, **transfer) -> RunConfig:
    cfg = tiny_run(data, kind="segmentation", steps=3, lr=1e-2, warmup_steps=1, ema_decay=0.0)
    cfg.transfer.pretrained, cfg.transfer.strategy, cfg.transfer.labels = str(pretrained), strategy, 2
    for k, v in transfer.items():
        setattr(cfg.transfer, k, v)
    return cfg


def _params(model: torch.nn.Module) -> set[str]:
    return {k for k, _ in model.named_parameters()}


def test_lp_ft_trains_the_head_then_everything(module_dataset, pretrained, tmp_path):
    """Phase 1 (OUT/lp) changes only head parameters, the backbone stays the pretrained one; phase 2
    starts from phase 1's weights and changes every parameter."""
    out = tmp_path / "lpft"
    run_finetune(_cfg(module_dataset, pretrained / "ddpm", "lp-ft", lp_steps=3), out)
    pre = load_weights(pretrained / "ddpm" / "model.safetensors")
    lp, final = load_weights(out / LP_DIR / "model.safetensors"), load_weights(out / "model.safetensors")
    params = _params(RunFolder.open(out).segmenter())
    backbone = [k for k in params if k.startswith("backbone.")]
    head = [k for k in params if k.startswith("head.")]
    assert all(torch.equal(lp[k], pre[k[len("backbone."):]]) for k in backbone)
    torch.manual_seed(0)  # the head's initial weights: the same seed, the same construction
    from labeldiff.models.unet import SegmentationNet

    cfg = RunFolder.open(out).config
    init = SegmentationNet(cfg.model, 3, head_hidden=cfg.transfer.head_hidden).state_dict()
    assert all(not torch.equal(lp[k], init[k]) for k in head)
    assert all(not torch.equal(final[k], lp[k]) for k in backbone + head)
    assert json.loads((out / LP_DIR / "config.json").read_text())["transfer"]["strategy"] == "linear"
    assert cfg.transfer.strategy == "lp-ft"


def test_keep_head_loads_the_source_head_strictly(module_dataset, pretrained, tmp_path):
    out = tmp_path / "kept"
    run_finetune(_cfg(module_dataset, pretrained / "supervised", "full", keep_head=True), out)
    report = json.loads((out / "labeled.json").read_text())["load_report"]
    source = load_weights(pretrained / "supervised" / "model.safetensors")
    assert report["skipped"] == [] and report["new"] == [] and sorted(report["loaded"]) == sorted(source)
    model = RunFolder.open(out).segmenter()  # rebuilt from the run folder alone
    assert not [k for k in model.state_dict() if k.startswith("head.")]
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 3, 16, 16)


def test_keep_head_refuses_what_it_cannot_keep(module_dataset, pretrained, tmp_path):
    cfg = _cfg(module_dataset, pretrained / "supervised", "full", keep_head=True)
    cfg.data.num_classes = 4
    with pytest.raises(ValueError, match="predicts 3 classes but the target data has 4"):
        run_finetune(cfg, tmp_path / "a")
    with pytest.raises(ValueError, match="is a 'ddpm' run, whose output is an image"):
        run_finetune(_cfg(module_dataset, pretrained / "ddpm", "full", keep_head=True), tmp_path / "b")
    with pytest.raises(ValueError, match="no separate head to train first"):
        run_finetune(_cfg(module_dataset, pretrained / "supervised", "lp-ft", keep_head=True), tmp_path / "c")
    assert not any((tmp_path / n).exists() for n in "abc")  # refused before a folder was written


def test_keep_head_auto_keeps_when_it_can_and_says_why_not(module_dataset, pretrained, tmp_path, capsys):
    run_finetune(_cfg(module_dataset, pretrained / "supervised", "full", keep_head="auto"), tmp_path / "auto")
    assert RunFolder.open(tmp_path / "auto").config.transfer.keep_head is True
    assert json.loads((tmp_path / "auto" / "labeled.json").read_text())["load_report"]["new"] == []
    cfg = _cfg(module_dataset, pretrained / "supervised", "full", keep_head="auto")
    cfg.data.num_classes = 4
    run_finetune(cfg, tmp_path / "other")
    assert "keep-head auto: a new head" in capsys.readouterr().out
    assert RunFolder.open(tmp_path / "other").config.transfer.keep_head is False
    run_finetune(_cfg(module_dataset, pretrained / "ddpm", "full", keep_head="auto"), tmp_path / "ddpm")
    assert RunFolder.open(tmp_path / "ddpm").config.transfer.keep_head is False
    run_finetune(_cfg(module_dataset, pretrained / "supervised", "full"), tmp_path / "default")  # default: never
    assert json.loads((tmp_path / "default" / "labeled.json").read_text())["load_report"]["new"]


def test_plateau_rule_stops_on_a_flat_loss_only():
    stop = plateau_stop(window=10, tol=0.02)
    falling = [stop(i + 1, 1.0 / (1 + 0.1 * i)) for i in range(40)]
    assert not any(falling)  # every 10-step mean is > 2 % below the one before
    stop = plateau_stop(window=10, tol=0.02)
    flat = [stop(i + 1, 1.0 if i < 10 else 0.5) for i in range(60)]
    assert flat.index(True) == 29  # checked only at multiples of the window, once two windows are flat


def test_plateau_rule_resumes_where_it_left_off():
    losses = [1.0 / (1 + 0.1 * i) for i in range(25)] + [0.5] * 40
    whole = plateau_stop(window=10, tol=0.02)
    expected = [whole(i + 1, x) for i, x in enumerate(losses)]
    for cut in (7, 20, 33):  # mid-window, on a window edge, after the first check
        first = plateau_stop(window=10, tol=0.02)
        head = [first(i + 1, x) for i, x in enumerate(losses[:cut])]
        resumed = plateau_stop(window=10, tol=0.02)
        resumed.load(json.loads(json.dumps(first.state())))  # as it travels in state.json
        tail = [resumed(cut + i + 1, x) for i, x in enumerate(losses[cut:])]
        assert head + tail == expected, cut
    assert True in expected  # the sequence does plateau


def test_plateau_finetune_stops_early_and_says_so(module_dataset, pretrained, tmp_path, log_reader, monkeypatch):
    import labeldiff.transfer.finetune as ft

    monkeypatch.setattr(ft, "PLATEAU_WINDOW", 2)
    monkeypatch.setattr(ft.plateau_stop, "__defaults__", (2, 10.0))  # any 2-step window counts as flat
    cfg = _cfg(module_dataset, pretrained / "ddpm", "full", steps_rule="plateau")
    cfg.train.steps = 50
    out = tmp_path / "plateau"
    result = run_finetune(cfg, out)
    assert result["stopped"] and result["step"] == 4
    log = log_reader(out)
    assert log[4]["stopped"] == "plateau" and max(log) == 4
    assert (out / "model.safetensors").is_file()
    state = json.loads(next((out / "checkpoints").glob("step_*/state.json")).read_text())
    assert len(state["stop"]["losses"]) == 4 and state["stop"]["seen"] == 4  # resumable: the history is saved


def test_augmented_finetune_records_its_protocol(module_dataset, pretrained, tmp_path, monkeypatch):
    """The run transforms every training sample with its level and stores the protocol; none calls nothing."""
    calls = []
    real = Augment.__call__
    monkeypatch.setattr(Augment, "__call__", lambda self, *a: calls.append(self.level) or real(self, *a))
    out = tmp_path / "aug"
    cfg = _cfg(module_dataset, pretrained / "ddpm", "full", augment="strong", flips="hv")
    run_finetune(cfg, out)
    assert calls == ["strong"] * cfg.train.steps * cfg.train.batch_size
    t = RunFolder.open(out).config.transfer
    assert (t.augment, t.flips) == ("strong", "hv")
    calls.clear()
    run_finetune(_cfg(module_dataset, pretrained / "ddpm", "full", augment="none"), tmp_path / "none")
    assert calls == []
