"""Test-time corruptions (``labeldiff.evaluate.corruptions``) and ``labeldiff evaluate --corruptions``."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from labeldiff.cli import main
from labeldiff.data.folders import open_labeled
from labeldiff.evaluate.corruptions import LEVELS, NAMES, corrupt, parse_corruptions, parse_severities
from labeldiff.evaluate.robustness import run_robustness


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """A smooth RGB image with edges and texture, [3, 48, 40] in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 40), indexing="ij")
    base = 0.6 * torch.sign(torch.sin(6 * x) * torch.cos(5 * y))
    return (base[None] * torch.tensor([1.0, 0.7, 0.4])[:, None, None]
            + 0.2 * torch.rand(3, 48, 40, generator=g) - 0.1).clamp(-1, 1)


def high_freq(x: torch.Tensor) -> float:
    """Mean squared difference of neighbouring pixels (the energy a blur removes)."""
    return float(((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean() + ((x[..., 1:] - x[..., :-1]) ** 2).mean())


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_shape_range_and_identity(name, image):
    """Same (seed, index) → same output; the shape and [-1, 1] hold; severity 0 is the identity; another image
    index draws other noise (for the random corruptions)."""
    a = corrupt(image, name, 3, seed=1, index=2)
    assert torch.equal(a, corrupt(image, name, 3, seed=1, index=2))
    assert a.shape == image.shape and a.dtype == image.dtype
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, image)
    assert torch.equal(corrupt(image, name, 0, seed=1, index=2), image)
    grey = corrupt(image[:1], name, 3, seed=1, index=2)
    assert grey.shape == (1, 48, 40)
    if name in ("noise", "bias_field"):
        assert not torch.equal(a, corrupt(image, name, 3, seed=1, index=3))
        assert not torch.equal(a, corrupt(image, name, 3, seed=2, index=2))


def test_noise_std_grows_with_severity():
    flat = torch.zeros(1, 64, 64)  # mid-grey: no clipping at these levels
    stds = [float(corrupt(flat, "noise", s).std()) for s in range(1, 6)]
    assert stds == sorted(stds)
    assert stds[0] == pytest.approx(2 * LEVELS["noise"][0], rel=0.05)  # [0, 1] std → [-1, 1] doubles it


def test_blur_lowers_high_frequency_energy(image):
    energy = [high_freq(corrupt(image, "blur", s)) for s in range(0, 6)]
    assert all(a > b for a, b in zip(energy, energy[1:]))
    flat = torch.full((3, 20, 20), 0.3)  # edges replicated: a constant image stays constant
    assert torch.allclose(corrupt(flat, "blur", 5), flat, atol=1e-6)


def test_jpeg_error_grows_as_quality_drops(image):
    err = [float((corrupt(image, "jpeg", s) - image).abs().mean()) for s in range(1, 6)]
    assert err[-1] > err[0] and err == sorted(err)


def test_contrast_shrinks_the_std_around_the_mean(image):
    stds = [float(corrupt(image, "contrast", s).std()) for s in range(0, 6)]
    assert all(a > b for a, b in zip(stds, stds[1:]))
    assert float(corrupt(image, "contrast", 5).mean()) == pytest.approx(float(image.mean()), abs=1e-5)


def test_brightness_raises_the_mean_and_keeps_hue(image):
    means = [float(corrupt(image, "brightness", s).mean()) for s in range(0, 6)]
    assert all(a < b for a, b in zip(means, means[1:]))
    px = torch.tensor([-0.6, -0.2, 0.0])[:, None, None]  # one pixel, [0, 1] = (0.2, 0.4, 0.5)
    out = (corrupt(px, "brightness", 1) + 1) / 2  # V 0.5 → 0.6: every channel × 1.2
    assert torch.allclose(out[:, 0, 0], torch.tensor([0.24, 0.48, 0.6]), atol=1e-6)


def test_bias_field_is_smooth_and_grows_with_severity():
    flat = torch.zeros(1, 32, 32)
    logs = [torch.log((corrupt(flat, "bias_field", s, seed=3) + 1) / 2).std() for s in range(1, 6)]
    assert all(a < b for a, b in zip(logs, logs[1:]))
    f = corrupt(flat, "bias_field", 5, seed=3)
    assert high_freq(f) < 0.2 * float(f.var())  # smooth: white noise would give 4 × the variance


def test_the_network_sees_the_corruption_at_its_own_size(tiny_run_config, tmp_path):
    """At scale 0.25 the corruption is drawn on the 32² network input of a 128² image, not on the 128² image
    (whose noise the downscale would average to a quarter of its std)."""
    from labeldiff.data.datasets import resize_image
    from labeldiff.evaluate.predict import predict_logits

    cfg = tiny_run_config(tmp_path).data
    cfg.scale = 0.25
    seen = []
    model = Threshold()
    model.forward = lambda x: (seen.append(x[0]), Threshold.forward(model, x))[1]
    image = torch.rand(3, 128, 128) * 2 - 1
    logits = predict_logits(model, image, cfg, network_input=lambda x: corrupt(x, "noise", 1, seed=0, index=4))
    assert logits.shape == (2, 128, 128) and seen[0].shape == (3, 32, 32)
    assert torch.equal(seen[0], corrupt(resize_image(image, (32, 32)), "noise", 1, seed=0, index=4))


def test_parse_and_errors():
    assert parse_corruptions("all") == list(NAMES)
    assert parse_corruptions("blur, noise") == ["blur", "noise"]
    assert parse_severities("5,1,3") == [1, 3, 5]
    with pytest.raises(ValueError, match="use all or a comma list"):
        parse_corruptions("noise,fog")
    with pytest.raises(ValueError, match="1..5"):
        parse_severities("0,6")
    with pytest.raises(ValueError, match="severity 6"):
        corrupt(torch.zeros(1, 4, 4), "noise", 6)


class Threshold(torch.nn.Module):
    """Predicts class 1 where the pixel's channel mean is above 0 ([-1, 1] mid-grey), class 0 elsewhere."""
    whole_image = True

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        m = x.mean(1)
        return torch.stack([-m, m], 1)


def test_a_destroying_corruption_lowers_dice_of_a_brightness_threshold(binary_dataset, tmp_path, tiny_run_config):
    """On the generated data (foreground brighter than mid-grey) the threshold segments perfectly; contrast
    squeezes every pixel towards the dark mean, brightness +0.5 lifts the background above mid-grey."""
    cfg = tiny_run_config(binary_dataset, kind="segmentation")
    cfg.num_classes = 2
    ds = open_labeled(cfg.data, binary_dataset)
    samples = ds.samples(ds.stems("test"))
    clean = {"dice": {"mean": 1.0}, "reduction": "test"}
    s = run_robustness(Threshold(), cfg, samples, clean, tmp_path, ["contrast", "brightness", "blur"], [1, 5])
    rows = {(r["corruption"], r["severity"]): r["dice"] for r in json.loads((tmp_path / "robustness.json")
                                                                         .read_text())["rows"]}
    assert rows[("contrast", 5)] < 0.1 and rows[("brightness", 5)] < 0.6  # the absolute threshold fails
    assert rows[("brightness", 1)] > 0.9 and rows[("blur", 1)] > 0.9 > rows[("blur", 5)]  # mild levels: it holds
    assert s["mean_dice"] == pytest.approx(np.mean(list(rows.values())), abs=1e-6)
    assert s["drop"] == pytest.approx(1.0 - s["mean_dice"])


def test_cli_evaluate_corruptions_writes_one_row_per_corruption_and_severity(binary_dataset, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("model:\n  num_head_channels: 8\n  num_res_blocks: 1\ntrain:\n  warmup_steps: 1\n")
    run = tmp_path / "run"
    assert main(["finetune", "--data", str(binary_dataset), "--out", str(run), "--strategy", "scratch", "--labels", "2",
                 "--head-hidden", "8", "--size", "16", "--steps", "2", "--batch-size", "2", "--precision", "fp32",
                 "--device", "cpu", "--channels", "3", "--unet-channels", "8,16", "--attention", "0,0",
                 "--recipe", str(recipe)]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run), "--out", str(out), "--device", "cpu",
                 "--corruptions", "noise,jpeg,bias_field", "--severities", "1,5"]) == 0
    with open(out / "robustness.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["corruption"], r["severity"]) for r in rows] == [
        (n, s) for n in ("noise", "jpeg", "bias_field") for s in ("1", "5")]
    m = json.loads((out / "metrics.json").read_text())
    assert m["robustness"]["mean_dice"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]), abs=1e-5)
    assert m["robustness"]["clean_dice"] == m["dice"]["mean"]
    assert (out / "robustness.png").stat().st_size > 1000
    assert "mean under corruptions" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(run), "--out", str(out), "--corruptions", "fog"]) == 2
    assert "use all or a comma list" in capsys.readouterr().err


def test_cli_refuses_corruptions_on_volumes_in_one_line(tmp_path, capsys):
    raw = tmp_path / "Dataset001_X"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "dataset.json").write_text("{}")
    assert main(["evaluate", "--model", str(tmp_path / "run"), "--data", str(raw), "--corruptions", "all"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2D image datasets only" in err[0]
