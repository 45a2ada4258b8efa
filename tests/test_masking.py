"""Patch masking pretext tasks (MDM and the MAE-style baseline): exact masking, determinism, errors,
the SSIM loss against scikit-image on real images, and 2-step CLI runs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from skimage import data, filters, transform
from skimage.metrics import structural_similarity

from labeldiff.cli import main
from labeldiff.config import CorruptionConfig, RunConfig
from labeldiff.corruption import CORRUPTIONS, build_corruption
from labeldiff.corruption.base import Corrupted
from labeldiff.corruption.masking import FixedRatioMasking, MaskedDiffusion, patch_mask


def _patch_grid(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] → [B, H/p, W/p, C·p·p]: the pixels of each patch in one row."""
    b, c, h, w = x.shape
    return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h // p, w // p, -1)


def _check_masking(x0: torch.Tensor, out: Corrupted, p: int) -> torch.Tensor:
    """With strictly non-zero x0: every patch of the input is either all zero or equal to x0, and the
    target is x0 itself; a loss weight, when there is one, is 1 exactly on the zeroed pixels.
    Returns the number of masked patches per image [B]."""
    assert out.input.shape == x0.shape
    assert torch.equal(out.target, x0)
    if out.weight is not None:
        assert torch.equal(out.weight.bool().expand_as(x0), out.input == 0)
    grid, ref = _patch_grid(out.input, p), _patch_grid(x0, p)
    zero = (grid == 0).all(-1)
    kept = (grid == ref).all(-1)
    assert torch.all(zero ^ kept), "a patch is partly masked (or an unmasked pixel changed)"
    return zero.flatten(1).sum(1)


@pytest.mark.parametrize("channels", [1, 3, 5])
def test_mdm_masks_floor_n_t_over_T_patches(channels):
    """MDM zeroes exactly floor(N·t/T) whole patches for the sampled t ∈ [1, T]; the rest equals the input."""
    c = build_corruption(CorruptionConfig(method="mdm"))
    assert isinstance(c, MaskedDiffusion)
    x0 = torch.rand(16, channels, 32, 24) * 0.9 + 0.1  # strictly non-zero: zeros mean masked
    out = c(x0, torch.Generator().manual_seed(channels))
    n = (32 // 8) * (24 // 8)
    assert out.t.dtype == torch.int64 and out.t.shape == (16,)
    assert out.t.min() >= 1 and out.t.max() <= 1000
    assert torch.equal(_check_masking(x0, out, 8), n * out.t // 1000)


@pytest.mark.parametrize("t", [1, 62, 63, 500, 999, 1000])
def test_mdm_count_for_given_t(t, monkeypatch):
    """For hand-picked t (forcing randint): N = 16 patches of 4×4, floor(16·t/1000) masked."""
    monkeypatch.setattr(torch, "randint", lambda lo, hi, size, generator=None, device=None: torch.full(size, t, device=device))
    c = MaskedDiffusion(CorruptionConfig(method="mdm", patch_size=4))
    x0 = -torch.rand(3, 2, 16, 16) - 0.5
    out = c(x0, torch.Generator().manual_seed(0))
    assert torch.equal(out.t, torch.full((3,), t))
    expected = {1: 0, 62: 0, 63: 1, 500: 8, 999: 15, 1000: 16}[t]
    assert _check_masking(x0, out, 4).tolist() == [expected] * 3


def test_mae_fixed_ratio_and_t_zero():
    """MAE-style: N − floor(N·0.25) masked patches (MAE's len_keep), t = 0 for every image."""
    c = build_corruption(CorruptionConfig(method="mae"))
    assert isinstance(c, FixedRatioMasking)
    x0 = torch.rand(4, 3, 64, 64) + 0.5
    out = c(x0, torch.Generator().manual_seed(1))
    assert torch.equal(out.t, torch.zeros(4, dtype=torch.int64))
    assert _check_masking(x0, out, 8).tolist() == [48] * 4  # N = 64: keep 16
    odd = FixedRatioMasking(CorruptionConfig(method="mae", patch_size=4, mask_ratio=0.75))
    out = odd(torch.ones(2, 1, 20, 8), torch.Generator().manual_seed(0))  # N = 10: keep floor(2.5) = 2
    assert _check_masking(torch.ones(2, 1, 20, 8), out, 4).tolist() == [8, 8]


def test_masks_differ_between_images_and_repeat_with_seed():
    """The same generator seed gives identical masks and t; another seed or image gives another mask."""
    x0 = torch.ones(8, 1, 32, 32)
    for method in ("mdm", "mae"):
        c = build_corruption(CorruptionConfig(method=method))
        a, b = c(x0, torch.Generator().manual_seed(7)), c(x0, torch.Generator().manual_seed(7))
        assert torch.equal(a.input, b.input) and torch.equal(a.t, b.t)
        other = c(x0, torch.Generator().manual_seed(8))
        assert not torch.equal(a.input, other.input)
    m = patch_mask(x0.shape, torch.full((8,), 8), 8, torch.Generator().manual_seed(0))
    assert m.shape == (8, 1, 32, 32) and len({tuple(r.flatten().tolist()) for r in m}) > 1


def test_invalid_settings_raise():
    """Patch size < 1, an image not a multiple of the patch, unknown loss or ratio: ValueError saying the fix."""
    with pytest.raises(ValueError, match="patch_size"):
        build_corruption(CorruptionConfig(method="mdm", patch_size=0))
    with pytest.raises(ValueError, match="multiple of the patch size 8; use --size 16"):
        build_corruption(CorruptionConfig(method="mdm"))(torch.ones(1, 3, 20, 16), torch.Generator())
    with pytest.raises(ValueError, match="ssim"):
        build_corruption(CorruptionConfig(method="mae", loss="l1"))
    with pytest.raises(ValueError, match="mask_ratio"):
        build_corruption(CorruptionConfig(method="mae", mask_ratio=1.5))
    assert {"ddpm", "mdm", "mae"} <= set(CORRUPTIONS)


def test_old_config_without_new_fields_loads():
    """A config.json saved before patch_size / mask_ratio / loss existed loads with their defaults."""
    old = {"corruption": {"method": "ddpm", "num_timesteps": 1000, "schedule": "linear", "beta_start": 1e-4,
                          "beta_end": 0.02, "prediction": "epsilon"}}
    cfg = RunConfig.from_dict(old).corruption
    assert (cfg.patch_size, cfg.mask_ratio, cfg.loss) == (8, 0.75, "auto")


def test_loss_auto_is_ssim_for_mdm_and_masked_mse_for_mae():
    assert build_corruption(CorruptionConfig(method="mdm")).loss_name == "ssim"
    assert build_corruption(CorruptionConfig(method="mae")).loss_name == "masked-mse"
    assert build_corruption(CorruptionConfig(method="mae", loss="ssim")).loss_name == "ssim"  # old runs keep theirs


def test_mae_masked_mse_ignores_the_visible_patches():
    """MAE's loss (He et al. 2022, §3): MSE over the masked pixels only. A prediction that is right on
    the masked patches and wrong everywhere else scores 0; one wrong by d on the masked patches scores d²."""
    c = build_corruption(CorruptionConfig(method="mae", patch_size=8, mask_ratio=0.75))
    x0 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) + 0.5
    out = c(x0, torch.Generator().manual_seed(1))
    hidden = out.input == 0
    right_where_masked = torch.where(hidden, x0, x0 + 5.0)
    assert float(c.loss(right_where_masked, out)) == 0.0
    off_by = torch.where(hidden, x0 + 0.5, x0)
    assert abs(float(c.loss(off_by, out)) - 0.25) < 1e-6
    whole = build_corruption(CorruptionConfig(method="mae", patch_size=8, loss="mse"))
    assert float(whole.loss(right_where_masked, whole(x0, torch.Generator().manual_seed(1)))) > 1.0


def test_mse_loss_option():
    """loss='mse' is the mean squared error against the clean image."""
    c = build_corruption(CorruptionConfig(method="mdm", loss="mse"))
    x0 = torch.rand(2, 3, 16, 16)
    out = c(x0, torch.Generator().manual_seed(0))
    assert c.loss(out.input, out).item() == pytest.approx(((out.input - x0) ** 2).mean().item(), rel=1e-6)
    assert c.loss(x0, out).item() == 0.0


def test_ssim_loss_is_fp32_under_bf16_autocast():
    """The training loop computes the loss inside bf16 autocast; the SSIM loss must still be fp32-exact."""
    c = build_corruption(CorruptionConfig(method="mdm"))
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    out = c(x0, torch.Generator().manual_seed(0))
    pred = (x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))).requires_grad_()
    ref = c.loss(pred, out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = c.loss(pred, out)
    assert auto.dtype == torch.float32 and auto.item() == ref.item()
    auto.backward()
    assert pred.grad.dtype == torch.float32 and torch.isfinite(pred.grad).all()


def _real_pairs():
    """camera (grey) and astronaut (RGB) resized to 64×64 in [-1, 1], each with a noisy and a blurred copy."""
    rng = np.random.default_rng(0)
    for name, img, axis in [("camera", data.camera(), None), ("astronaut", data.astronaut(), -1)]:
        x = transform.resize(img, (64, 64), anti_aliasing=True) * 2 - 1
        yield name + "-noisy", x, np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1), axis
        yield name + "-blur", x, filters.gaussian(x, sigma=1.0, channel_axis=axis), axis


@pytest.mark.parametrize("name,x,y,axis", list(_real_pairs()), ids=lambda v: v if isinstance(v, str) else "")
def test_ssim_loss_matches_skimage(name, x, y, axis):
    """1 − SSIM of our loss equals scikit-image's on real image pairs.

    Both use an 11×11 Gaussian window with σ = 1.5 (skimage: truncate 3.5 → radius 5), K1 = 0.01,
    K2 = 0.03, population covariances, data_range 2, the mean over the valid interior only (skimage
    crops the 5-pixel border; MONAI convolves without padding) and, for RGB, over channels. Only float32
    vs float64 differs: measured |diff| < 1e-6, so 1e-4 is tight and still honest.
    """
    def tensor(a):
        return torch.from_numpy((a if a.ndim == 3 else a[..., None]).transpose(2, 0, 1)[None].astype(np.float32))

    c = build_corruption(CorruptionConfig(method="mdm"))
    ours = c.loss(tensor(y), Corrupted(input=tensor(x), t=torch.zeros(1, dtype=torch.int64), target=tensor(x)))
    ref = 1 - structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=2.0, channel_axis=axis)
    assert 0.05 < ref < 0.9  # a real, non-trivial difference
    assert abs(ours.item() - ref) < 1e-4


ARGS = ["--size", "16", "--steps", "2", "--batch-size", "2", "--precision", "fp32", "--device", "cpu",
        "--channels", "3", "--checkpoint-every", "1", "--unet-channels", "8,16", "--attention", "0,0",
        "--head-channels", "8", "--res-blocks", "1"]


@pytest.mark.parametrize("method,extra,expected", [
    ("mdm", [], {"patch_size": 8, "loss": "ssim"}),
    ("mae", ["--patch-size", "4", "--mask-ratio", "0.5", "--loss", "mse"],
     {"patch_size": 4, "mask_ratio": 0.5, "loss": "mse"}),
])
def test_pretrain_cli(method, extra, expected, module_dataset, tmp_path):
    """`labeldiff pretrain --method mdm|mae` runs 2 steps and writes the weights and its config."""
    out = tmp_path / method
    assert main(["pretrain", "--data", str(module_dataset), "--out", str(out), "--method", method,
                 *ARGS, *extra]) == 0
    assert (out / "model.safetensors").is_file()
    cfg = json.loads((out / "config.json").read_text())["corruption"]
    assert cfg["method"] == method
    assert {k: cfg[k] for k in expected} == expected
    assert np.isfinite(json.loads((out / "log.jsonl").read_text().splitlines()[-1])["loss"])
