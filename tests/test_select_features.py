"""Automatic choice of the probe's blocks and timesteps: grid, column slicing, folds, sampling, scoring, errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from labeldiff.config import CorruptionConfig, ModelConfig, RunConfig
from labeldiff.evaluate.metrics import confusion_stats
from labeldiff.models.unet import build_unet
from labeldiff.transfer import select_features as sf
from labeldiff.models.probe import FeatureExtractor, FeatureSpec, default_spec, make_extractor
from labeldiff.transfer.select_features import (PixelSample, balanced_pixels, candidate_specs, feature_columns,
                                                fold_groups, foreground_iou, format_selection, held_out_score,
                                                pick_best, sample_features, select_spec, weighted_stats)

torch.set_num_threads(1)
CHANNELS = (8, 16, 16)  # up blocks output 16, 16, 8 channels: unequal widths catch offset mistakes
FAST = dict(pixels_per_image=256, max_epochs=4, progress=False)


def run_config(method: str) -> RunConfig:
    return RunConfig(model=ModelConfig(in_channels=3, channels=CHANNELS, num_res_blocks=1,
                                       attention_levels=(False,) * 3, norm_num_groups=8, num_head_channels=8),
                     corruption=CorruptionConfig(method=method))


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(run_config("ddpm").model, out_channels=3)


def sign_images(n: int, seed: int, hw: tuple[int, int] = (32, 32)) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Smooth random 3-channel images; channel 0 is ±0.8 and the mask is channel 0 > 0, so channels
    1 and 2 are independent of the mask."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    x = F.interpolate(torch.randn(n, 3, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
    x[:, 0] = 0.8 * x[:, 0].sign()
    x = x.clamp(-1, 1)
    return list(x), [(xi[0] > 0).long() for xi in x]


class SignalBlock(nn.Module):
    """``(x [B, 3, H, W], t [B]) -> [B, width, H, W]``: a fixed random field (the same for every image,
    so it only encodes position) plus a fixed random mix of image channels 1–2 (independent of the
    mask); at t == ``signal_t`` also 3× image channel 0, whose sign is the mask."""

    def __init__(self, width: int, seed: int, signal_t: int | None):
        super().__init__()
        self.width, self.seed, self.signal_t = width, seed, signal_t
        self.register_buffer("mix", torch.randn(width, 2, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        g = torch.Generator().manual_seed(self.seed + 1)
        field = F.interpolate(torch.randn(1, self.width, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
        out = field + torch.einsum("cj,bjhw->bchw", self.mix, x[:, 1:3])
        if self.signal_t is not None:
            out = out + 3 * x[:, :1] * (t == self.signal_t).float()[:, None, None, None]
        return out


class SignalUNet(nn.Module):
    """A stand-in for MONAI's DiffusionModelUNet with what FeatureExtractor reads (``up_blocks``,
    ``down_blocks``, ``block_out_channels``, ``forward(x, t)``), in which only up block ``block`` at
    timestep ``t`` carries the label."""

    def __init__(self, block: int, t: int):
        super().__init__()
        self.block_out_channels = CHANNELS
        self.down_blocks = nn.ModuleList(nn.Identity() for _ in CHANNELS)
        widths = tuple(reversed(CHANNELS))
        self.up_blocks = nn.ModuleList(SignalBlock(w, 10 * b, t if b == block else None) for b, w in enumerate(widths))
        self.anchor = nn.Parameter(torch.zeros(1))  # FeatureExtractor reads the device from the parameters

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        for blk in self.up_blocks:
            blk(x, t)
        return x


def spec_of(row: dict) -> FeatureSpec:
    return FeatureSpec.from_dict(row["spec"])


# ---- the grid -------------------------------------------------------------------------------------

def test_candidate_grid():
    ddpm, mdm, mae = candidate_specs(3, "ddpm"), candidate_specs(3, "mdm"), candidate_specs(3, "mae")
    assert ddpm[0] == default_spec("ddpm", 3) and mdm[0] == default_spec("mdm", 3) and mae[0] == default_spec("mae", 3)
    assert (len(ddpm), len(mdm), len(candidate_specs(3, "hybrid")), len(mae)) == (18, 19, 19, 5)
    assert len(set(ddpm)) == len(ddpm)
    for b in range(3):  # every single block at every single t
        assert {FeatureSpec((b,), (t,)) for t in (0, 50, 150, 250)} <= set(ddpm)
    assert {FeatureSpec((1, 2), ts) for ts in [(0,), (50,), (150,), (250,), (50, 150, 250)]} <= set(mdm)
    assert FeatureSpec((0, 1, 2), (50, 150, 250)) in ddpm and FeatureSpec((0, 1, 2), (50,)) in mdm
    assert set(mae) == {FeatureSpec(b, (0,)) for b in [(0,), (1,), (2,), (1, 2), (0, 1, 2)]}
    assert candidate_specs(3, "supervised") == mae
    assert all(max(s.timesteps) < 100 for s in candidate_specs(3, "ddpm", num_timesteps=100))
    assert max(len(candidate_specs(n, m)) for n in range(1, 7) for m in ("ddpm", "mdm", "hybrid")) <= 23
    # 4 blocks: the default pair (2, 3), the single blocks next to it, and all; the coarsest is not tried alone
    assert {s.blocks for s in candidate_specs(4, "ddpm")} == {(1,), (2,), (3,), (2, 3), (0, 1, 2, 3)}
    with pytest.raises(ValueError, match="no feature grid for pretext method 'ddep'"):
        candidate_specs(3, "ddep")


# ---- features: one UNet pass per (image, t), columns per candidate --------------------------------

def test_columns_are_exactly_each_candidates_extractor(unet):
    """The sampled rows sliced by feature_columns equal, pixel for pixel, what an extractor built
    with that candidate spec gives (DDPM noise included), for every candidate of the ddpm grid."""
    cfg = run_config("ddpm")
    images, masks = sign_images(2, seed=0)
    cands = candidate_specs(3, "ddpm")
    full = FeatureSpec((0, 1, 2), (0, 50, 150, 250))
    samples = sample_features(lambda s: make_extractor(unet, cfg, s), full, images, masks, 300, seed=0)
    full_ex = make_extractor(unet, cfg, full)
    assert samples[0].features.shape == (300, full_ex.num_features) == (300, 4 * 40)
    for i, s in enumerate(samples):  # the per-t passes give the layout of one extractor for all t
        assert torch.equal(s.features, full_ex(images[i][None])[0].reshape(full_ex.num_features, -1)[:, s.pixels].T)
    for spec in cands:
        ex = make_extractor(unet, cfg, spec)
        cols = feature_columns(full, full_ex.block_channels, spec)
        assert len(cols) == ex.num_features
        for i, s in enumerate(samples):
            want = ex(images[i][None])[0].reshape(ex.num_features, -1)[:, s.pixels].T
            assert torch.equal(s.features[:, cols], want), spec
    with pytest.raises(ValueError, match="not part of the extracted features"):
        feature_columns(FeatureSpec((0, 1, 2), (0, 50)), (16, 16, 8), FeatureSpec((1,), (150,)))


# ---- folds and pixel sampling -------------------------------------------------------------------

def test_fold_groups():
    assert fold_groups(3) == [(0,), (1,), (2,)] and fold_groups(5) == [(i,) for i in range(5)]
    for n in (6, 7, 12):
        groups = fold_groups(n, seed=0)
        assert len(groups) == 5 and sorted(i for g in groups for i in g) == list(range(n))
        assert max(map(len, groups)) - min(map(len, groups)) <= 1
        assert fold_groups(n, seed=0) == groups
    assert fold_groups(12, seed=0) != fold_groups(12, seed=1)
    with pytest.raises(ValueError, match="at least 2"):
        fold_groups(1)


def test_leave_one_out_holds_out_each_image_once(unet, monkeypatch):
    """Images of 1024, 2048 and 4096 pixels (all sampled): fold i must train on exactly the other two."""
    images, masks = [], []
    for hw, seed in (((32, 32), 0), ((32, 64), 1), ((64, 64), 2)):
        x, m = sign_images(1, seed, hw)
        images += x
        masks += m
    trained_on = []
    real_fit = sf.fit_pixels

    def spy(features, labels, *args, **kwargs):
        trained_on.append(len(labels))
        return real_fit(features, labels, *args, **kwargs)

    monkeypatch.setattr(sf, "fit_pixels", spy)
    cands = [FeatureSpec((1,), (0,)), FeatureSpec((2,), (50,))]
    _, table = select_spec(unet, run_config("ddpm"), images, masks, 2, candidates=cands, pixels_per_image=10**6,
                           max_epochs=1, progress=False)
    total = 1024 + 2048 + 4096
    assert trained_on == [total - 1024, total - 2048, total - 4096] * 2
    assert all(len(r["scores"]) == 3 for r in table)


def test_more_than_five_images_use_five_folds(unet, monkeypatch):
    images, masks = sign_images(7, seed=3)
    trained_on = []
    real_fit = sf.fit_pixels
    monkeypatch.setattr(sf, "fit_pixels", lambda x, y, *a, **kw: trained_on.append(len(y)) or real_fit(x, y, *a, **kw))
    _, table = select_spec(unet, run_config("ddpm"), images, masks, 2, candidates=[FeatureSpec((2,), (0,))],
                           pixels_per_image=64, max_epochs=1, progress=False)
    groups = fold_groups(7, seed=0)
    assert len(table[0]["scores"]) == 5 and trained_on == [64 * (7 - len(g)) for g in groups]


def test_balanced_pixels():
    labels = torch.zeros(1000, dtype=torch.long)
    labels[:100] = 1
    g = torch.Generator().manual_seed(0)
    idx, w = balanced_pixels(labels, 100, g)
    assert (labels[idx] == 1).sum() == 50 and (labels[idx] == 0).sum() == 50 and len(set(idx.tolist())) == 100
    assert torch.equal(w[labels[idx] == 1], torch.full((50,), 2.0)) and torch.equal(w[labels[idx] == 0],
                                                                                  torch.full((50,), 18.0))
    labels[10:100] = 0  # 10 foreground pixels: all of them, the rest of the budget to background
    idx, w = balanced_pixels(labels, 100, g)
    assert (labels[idx] == 1).sum() == 10 and len(idx) == 100
    assert float(w[labels[idx] == 0].sum()) == pytest.approx(990)  # weights stand for the whole image
    assert torch.equal(balanced_pixels(labels, 5000, g)[0], torch.arange(1000))
    a = balanced_pixels(labels, 64, torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, balanced_pixels(labels, 64, torch.Generator().manual_seed(3))[0])


def test_weighted_stats_and_foreground_iou():
    pred, target = torch.tensor([0, 1, 1, 0, 2]), torch.tensor([0, 1, 0, 1, 2])
    np.testing.assert_array_equal(weighted_stats(pred, target, torch.ones(5), 3),
                                  confusion_stats(pred.numpy(), target.numpy(), 3))
    stats = weighted_stats(pred, target, torch.tensor([1.0, 3.0, 2.0, 1.0, 1.0]), 3)
    np.testing.assert_allclose(stats[1], [3, 2, 1])  # tp = 3 (weight 3), fp = 2, fn = 1
    assert foreground_iou(stats) == pytest.approx((3 / 6 + 1) / 2)
    empty = np.array([[4, 0, 0], [0, 0, 0]])  # foreground absent from prediction and truth
    assert math.isnan(foreground_iou(empty))


def test_held_out_score_estimates_the_whole_image_iou():
    """10 000 pixels, 1 000 foreground; the prediction covers all of it and 1 000 background pixels:
    whole-image IoU 0.5. A balanced sample (1 000 + 1 000) sees only ~111 of those false positives;
    weighted back (×9) the score is ~0.5 again, unweighted it would be ~0.9."""
    class Stub:  # "predicts" the label stored in feature column 0
        def predict_proba(self, x):
            return F.one_hot(x[:, 0].long(), 2).float()

    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(10_000, dtype=torch.long)
    labels[:1000] = 1
    pred = labels.clone()
    pred[1000 + torch.randperm(9000, generator=g)[:1000]] = 1
    idx, w = balanced_pixels(labels, 2000, g)
    sample = PixelSample(torch.stack([pred[idx].float(), torch.zeros(len(idx))], 1), labels[idx], w, idx)
    assert held_out_score(Stub(), sample, torch.tensor([0]), 2) == pytest.approx(0.5, abs=0.05)
    unweighted = PixelSample(sample.features, sample.labels, torch.ones(len(idx)), idx)
    assert held_out_score(Stub(), unweighted, torch.tensor([0]), 2) > 0.85


def test_pick_best_prefers_fewer_features_on_ties():
    rows = [{"mean": 0.80, "n_features": 40}, {"mean": 0.8005, "n_features": 120}, {"mean": 0.80, "n_features": 16},
            {"mean": float("nan"), "n_features": 8}]
    assert pick_best(rows, tie_tolerance=1e-3) == 2
    assert pick_best(rows, tie_tolerance=0.0) == 1
    assert pick_best(rows[:1] + [{"mean": 0.80, "n_features": 40}]) == 0  # equal: the earlier one
    with pytest.raises(ValueError, match="no candidate could be scored"):
        pick_best([{"mean": float("nan"), "n_features": 8}])


# ---- selection ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("block,t", [(0, 150), (2, 50)])
def test_the_one_informative_candidate_is_picked(block, t):
    """Only up block ``block`` at ``t`` carries the label: exactly the candidates that contain that
    (block, t) must score high, every other one near chance, and the smallest informative one win."""
    images, masks = sign_images(4, seed=block)
    spec, table = select_spec(SignalUNet(block, t), run_config("mdm"), images, masks, 2, seed=0, **FAST)
    assert len(table) == 19 and sum(r["best"] for r in table) == 1
    carries = {i for i, r in enumerate(table) if block in r["spec"]["blocks"] and t in r["spec"]["timesteps"]}
    high = {i for i, r in enumerate(table) if r["mean"] > 0.9}
    assert high == carries, format_selection(table)
    assert all(r["mean"] < 0.7 for i, r in enumerate(table) if i not in carries), format_selection(table)
    assert spec == FeatureSpec((block,), (t,))


def test_single_image_is_split_into_two_halves():
    images, masks = sign_images(1, seed=5)
    left = masks[0][:, :16]
    assert left.any() and (left == 0).any() and masks[0][:, 16:].any()  # both halves show both classes
    ex = SignalUNet(0, 150)
    full = FeatureSpec((0, 1, 2), (0, 150))
    samples = sample_features(lambda s: FeatureExtractor(ex, s), full, images, masks, 200, seed=0)
    assert len(samples) == 2
    assert (samples[0].pixels % 32 < 16).all() and (samples[1].pixels % 32 >= 16).all()
    spec, table = select_spec(ex, run_config("mdm"), images, masks, 2, **FAST)
    assert all(len(r["scores"]) == 2 for r in table)
    assert spec == FeatureSpec((0,), (150,)), format_selection(table)


def test_selection_is_deterministic_per_seed(unet):
    images, masks = sign_images(3, seed=7)
    cands = candidate_specs(3, "ddpm")[:6]
    runs = [select_spec(unet, run_config("ddpm"), images, masks, 2, seed=s, candidates=cands, **FAST)
            for s in (0, 0, 1)]
    scores = [[r["scores"] for r in table] for _, table in runs]
    assert runs[0][0] == runs[1][0] and scores[0] == scores[1]
    assert scores[0] != scores[2]  # another seed samples other pixels and initialises other MLPs
    assert json.loads(json.dumps(runs[0][1])) == runs[0][1]  # the table goes into a run's JSON as it is
    text = format_selection(runs[0][1])
    assert text.count("\n") == 6 + 1 and text.count("→") == 1
    best_line = next(line for line in text.splitlines() if "→" in line)
    assert f"| {','.join(map(str, runs[0][0].blocks))} | {','.join(map(str, runs[0][0].timesteps))} |" in best_line


def test_errors_say_what_is_wrong(unet):
    cfg = run_config("ddpm")
    images, masks = sign_images(2, seed=0)
    with pytest.raises(ValueError, match="same, non-zero number"):
        select_spec(unet, cfg, images, masks[:1], 2, **FAST)
    with pytest.raises(ValueError, match=r"mask 1 is \(32, 16\) but image 1 is \(3, 32, 32\)"):
        select_spec(unet, cfg, images, [masks[0], masks[1][:, :16]], 2, **FAST)
    with pytest.raises(ValueError, match="outside the classes 0..1"):
        select_spec(unet, cfg, images, [masks[0], masks[1] * 255], 2, **FAST)
    with pytest.raises(ValueError, match="no labeled foreground pixel"):
        select_spec(unet, cfg, images, [torch.zeros_like(m) for m in masks], 2, **FAST)
    with pytest.raises(ValueError, match="at least 2 classes"):
        select_spec(unet, cfg, images, masks, 1, **FAST)
    with pytest.raises(ValueError, match="needs the run's config"):
        select_spec(unet, None, images, masks, 2, **FAST)
