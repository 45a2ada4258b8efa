"""Reverse diffusion from a (tiny) pretrained DDPM run: shapes, range, determinism, files, errors."""
import pytest
import torch

from labeldiff.pretrain.run import run_pretrain
from labeldiff.sample.diffusion import make_sampler, sample, save_samples
from labeldiff.errors import RunFolderError

from conftest import open_pretrained


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    from conftest import tiny_run, write_labeled_dataset

    data = write_labeled_dataset(tmp_path_factory.mktemp("d") / "data")
    run = tmp_path_factory.mktemp("r") / "pre"
    run_pretrain(tiny_run(data, steps=3), run)
    return run


@pytest.mark.parametrize("sampler,steps", [("ddim", 4), ("ddpm", 5)])
def test_sample_shapes_range_and_seed(ddpm_run, sampler, steps):
    model, cfg = open_pretrained(ddpm_run)
    a = sample(model, cfg, n=3, sampler=sampler, steps=steps, seed=1, batch_size=2, precision="fp32")
    b = sample(model, cfg, n=3, sampler=sampler, steps=steps, seed=1, batch_size=2, precision="fp32")
    c = sample(model, cfg, n=3, sampler=sampler, steps=steps, seed=2, batch_size=2, precision="fp32")
    assert a.shape == (3, cfg.model.in_channels, cfg.data.size, cfg.data.size)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampler_timesteps_descend_to_zero(ddpm_run):
    _, cfg = open_pretrained(ddpm_run)
    for name, steps, n in (("ddim", 10, 10), ("ddpm", None, cfg.corruption.num_timesteps)):
        ts = make_sampler(cfg, name, steps).timesteps
        assert len(ts) == n and int(ts[-1]) == 0 and bool((ts[:-1] > ts[1:]).all())


def test_save_samples_writes_pngs_and_grid(ddpm_run, tmp_path):
    from PIL import Image

    images = torch.rand(5, 3, 16, 16) * 2 - 1
    grid = save_samples(images, tmp_path / "s")
    assert len(list((tmp_path / "s").glob("sample_*.png"))) == 5
    assert Image.open(grid).size == (3 * 18 + 2, 2 * 18 + 2)  # 3 columns × 2 rows of 16² with 2-px gaps


def test_sampling_needs_a_pretraining_run(tmp_path):
    with pytest.raises(RunFolderError, match="config.json"):
        open_pretrained(tmp_path)


def test_sample_cli(ddpm_run, tmp_path):
    from labeldiff.cli import main

    assert main(["sample", "--model", str(ddpm_run), "--out", str(tmp_path / "s"), "--n", "2", "--steps", "2",
                 "--device", "cpu"]) == 0
    assert (tmp_path / "s" / "grid.png").is_file() and len(list((tmp_path / "s").glob("sample_*.png"))) == 2
