"""The DDPM Gaussian-noise pretext task: schedules, the forward process, determinism, errors."""
from __future__ import annotations

import pytest
import torch

from labeldiff.config import CorruptionConfig
from labeldiff.corruption import build_corruption
from labeldiff.corruption.base import Corrupted
from labeldiff.corruption.gaussian import GaussianNoise


def test_linear_schedule_endpoints_and_monotone():
    """Linear β runs from 1e-4 to 0.02; ᾱ_t lies in (0, 1) and strictly decreases."""
    c = GaussianNoise(CorruptionConfig(schedule="linear"))
    betas = c.scheduler.betas
    assert len(betas) == 1000
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-5)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-5)
    assert torch.all(betas[1:] > betas[:-1])
    abar = c.alphas_cumprod
    assert torch.all((abar > 0) & (abar < 1))
    assert torch.all(abar[1:] < abar[:-1])
    torch.testing.assert_close(abar, torch.cumprod(1 - betas, 0))


def test_cosine_schedule_monotone():
    """The cosine schedule also gives ᾱ_t decreasing in (0, 1), and differs from the linear one."""
    abar = GaussianNoise(CorruptionConfig(schedule="cosine")).alphas_cumprod
    assert torch.all((abar > 0) & (abar < 1))
    assert torch.all(abar[1:] < abar[:-1])
    lin = GaussianNoise(CorruptionConfig()).alphas_cumprod
    assert not torch.allclose(abar, lin)


def test_cosine_schedule_is_nichol_and_dhariwals_and_refuses_beta_endpoints():
    """ᾱ_t of the cosine schedule, by hand: f(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008, ᾱ_t = f(t)/f(0) with
    each β = 1 − ᾱ_t/ᾱ_(t−1) clipped at 0.999; it has no β endpoints, so other ones are refused by name, and the
    CT paper's recipe (which names both a cosine schedule and β 1e-4 → 0.02) sets none."""
    import math

    from labeldiff.config import ConfigError, load_recipe
    from labeldiff.recipes import find

    T, s = 1000, 0.008
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    abar, running = [], 1.0
    for t in range(1, T + 1):
        running *= 1 - min(1 - f[t] / f[t - 1], 0.999)
        abar.append(running)
    got = GaussianNoise(CorruptionConfig(schedule="cosine")).alphas_cumprod
    torch.testing.assert_close(got.double(), torch.tensor(abar, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="the cosine schedule has no β endpoints"):
        GaussianNoise(CorruptionConfig(schedule="cosine", beta_end=0.05))
    ct = load_recipe(find("ddpm"))["corruption"]
    assert ct["schedule"] == "cosine" and "beta_start" not in ct and "beta_end" not in ct


def test_forward_process_by_hand():
    """input = √ᾱ_t·x0 + √(1−ᾱ_t)·ε with ε the returned target, for the sampled t of each item."""
    c = build_corruption(CorruptionConfig())
    x0 = torch.rand(6, 3, 8, 8) * 2 - 1
    out = c(x0, torch.Generator().manual_seed(0))
    assert isinstance(out, Corrupted)
    assert out.input.shape == x0.shape and out.target.shape == x0.shape and out.weight is None
    assert out.t.shape == (6,) and out.t.dtype == torch.int64
    assert out.t.min() >= 0 and out.t.max() < 1000
    abar = c.alphas_cumprod[out.t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * out.target
    torch.testing.assert_close(out.input, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.input, x0)


def test_sample_prediction_targets_x0():
    """prediction='sample': the target is the clean x0 itself; the same seed gives the same noisy input."""
    x0 = torch.randn(4, 1, 8, 8)
    eps = build_corruption(CorruptionConfig())(x0, torch.Generator().manual_seed(3))
    smp = build_corruption(CorruptionConfig(prediction="sample"))(x0, torch.Generator().manual_seed(3))
    assert torch.equal(smp.target, x0)
    assert torch.equal(smp.input, eps.input) and torch.equal(smp.t, eps.t)


def test_unit_variance_preserved_over_t():
    """For unit-variance x0 the noisy input has unit variance at every t (pooled in bins of 100 t)."""
    c = GaussianNoise(CorruptionConfig())
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2000, 1, 32, 32, generator=g)
    out = c(x0, g)
    assert out.t.min() < 20 and out.t.max() > 980
    for lo in range(0, 1000, 100):
        sel = (out.t >= lo) & (out.t < lo + 100)
        assert sel.sum() > 100
        var = out.input[sel].var().item()
        assert abs(var - 1) < 0.05, (lo, var)
    # and the mix really changes with t: correlation with x0 is high early, near zero late
    early, late = out.t < 50, out.t > 950
    corr = lambda m: torch.corrcoef(torch.stack([out.input[m].flatten(), x0[m].flatten()]))[0, 1].item()
    assert corr(early) > 0.9 and abs(corr(late)) < 0.1


def test_same_seed_same_output():
    """The same generator seed reproduces t, ε and the input exactly; another seed does not."""
    c = build_corruption(CorruptionConfig())
    x0 = torch.randn(4, 3, 8, 8)
    a = c(x0, torch.Generator().manual_seed(7))
    b = c(x0, torch.Generator().manual_seed(7))
    d = c(x0, torch.Generator().manual_seed(8))
    assert torch.equal(a.t, b.t) and torch.equal(a.target, b.target) and torch.equal(a.input, b.input)
    assert not torch.equal(a.target, d.target)


def test_loss_is_weighted_mse():
    """The default loss is the MSE, and with a weight the weighted mean over weighted pixels."""
    c = build_corruption(CorruptionConfig())
    target = torch.zeros(1, 1, 2, 2)
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert c.loss(pred, Corrupted(pred, torch.zeros(1), target)).item() == pytest.approx(30 / 4)
    w = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert c.loss(pred, Corrupted(pred, torch.zeros(1), target, w)).item() == pytest.approx(17 / 2)


@pytest.mark.parametrize("field,value", [("schedule", "quadratic"), ("method", "vae"), ("prediction", "v")])
def test_unknown_settings_raise(field, value):
    """Unknown schedule, method or prediction type raise ValueError naming the value."""
    with pytest.raises(ValueError, match=value):
        build_corruption(CorruptionConfig(**{field: value}))
