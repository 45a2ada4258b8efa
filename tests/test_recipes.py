"""Every shipped recipe parses into a RunConfig whose network and pretext task build and fit together.

Networks are built on PyTorch's ``meta`` device (shapes, no memory), so the GPU recipes' big UNets at
256² cost nothing: a forward pass at the recipe's input size checks that the network takes that size
and that its output matches the pretext task's target (pretraining) or K class maps (fine-tuning).
"""
from pathlib import Path

import pytest
import torch

from labeldiff.config import RunConfig, load_recipe, merge_recipe
from labeldiff.errors import ConfigError
from labeldiff.recipes import FOLDER, find
from labeldiff.corruption import build_corruption
from labeldiff.models.unet import SegmentationNet, build_network, check_input_size
from labeldiff.runtime import generator

RECIPES = sorted(FOLDER.glob("*.yaml"))
META = torch.device("meta")
K = 3


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"ddpm", "ddpm-cpu", "finetune", "finetune-cpu", "ddpm-quick", "finetune-quick"} <= names


def test_the_quick_presets_are_the_demos_network_and_budget():
    """ddpm-quick and finetune-quick: the small UNet, 32-wide head, steps and batches of examples/demo.yaml."""
    from labeldiff.config import read_yaml
    from labeldiff.examples import find as find_example

    demo = read_yaml(find_example("demo"))
    method, ft = demo["methods"][0]["overrides"], demo["finetune"]["overrides"]
    pre, tune = load_recipe("ddpm-quick"), load_recipe("finetune-quick")
    assert load_recipe(demo["methods"][0]["recipe"])["corruption"] == pre["corruption"]
    assert pre["model"]["channels"] == method["model.channels"] == [16, 32, 64]
    assert pre["model"]["num_head_channels"] == method["model.num_head_channels"]
    assert pre["train"]["steps"] == method["train.steps"]
    assert tune["transfer"]["head_hidden"] == ft["transfer.head_hidden"] == 32
    assert (tune["train"]["steps"], tune["train"]["batch_size"]) == (ft["train.steps"], ft["train.batch_size"])


def test_a_recipe_by_name_or_by_path(tmp_path, monkeypatch):
    assert find("ddpm-cpu") == FOLDER / "ddpm-cpu.yaml"
    assert load_recipe("ddpm-cpu") == load_recipe(FOLDER / "ddpm-cpu.yaml")
    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  steps: 7\n")
    assert load_recipe(mine)["train"]["steps"] == 7
    monkeypatch.chdir(tmp_path)
    assert find("mine.yaml") == mine  # relative: the current directory
    (tmp_path / "ddpm-cpu.yaml").write_text("train:\n  steps: 3\n")
    assert find("ddpm-cpu.yaml") == tmp_path / "ddpm-cpu.yaml"  # a file on disk wins over the shipped stem
    assert find("ddpm-cpu") == FOLDER / "ddpm-cpu.yaml"  # a bare name is always the shipped one
    # studies written when the recipes lived in the checkout's recipes/ folder still find them
    assert find("recipes/finetune-cpu.yaml") == FOLDER / "finetune-cpu.yaml"


def test_an_unknown_recipe_lists_the_shipped_names(tmp_path):
    with pytest.raises(ConfigError, match=r"'ddpm-gpu' is not a shipped name; shipped: ddep, ddep-cpu, ddpm, ddpm-cpu, "):
        load_recipe("ddpm-gpu")
    with pytest.raises(ConfigError, match=r"nothere/x.yaml does not exist \(looked at .*\); .*shipped name: ddep, "):
        find("nothere/x.yaml")
    with pytest.raises(ConfigError) as e:
        find("elsewhere/ddpm-cpu.yaml")  # a stem only falls back from a bare file name or recipes/
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_builds(path):
    cfg = merge_recipe(RunConfig(), load_recipe(path))
    assert cfg.train.steps > 0 and cfg.train.batch_size > 0
    if cfg.corruption.method in ("ddep", "dep"):
        cfg.model.arch = "efficientnet-unet"
    cfg.model.in_channels = cfg.data.channels
    check_input_size(cfg.model, cfg.data.size)
    x = torch.empty(2, cfg.data.channels, cfg.data.size, cfg.data.size, device=META)
    if "finetune" in path.stem:  # a transfer recipe: the segmentation form of the default network
        with META:
            net = SegmentationNet(cfg.model, K, t=cfg.transfer.t, head_hidden=cfg.transfer.head_hidden)
        assert net(x).shape == (2, K, cfg.data.size, cfg.data.size)
        return
    corruption = build_corruption(cfg.corruption)
    corruption.check_input_size(cfg.data.size)
    with META:
        net = build_network(cfg.model, corruption.out_channels(cfg.data.channels, K))
    mask = torch.zeros(2, cfg.data.size, cfg.data.size, dtype=torch.long, device=META)
    c = corruption(x, generator(0, META), mask if corruption.needs_labels else None)
    pred = net(c.input, c.t)
    assert pred.shape == c.target.shape or (cfg.corruption.method == "supervised" and pred.shape[1] == K)
    assert corruption.loss(pred, c).shape == ()


def test_unknown_recipe_section_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimiser:\n  lr: 1\n")
    with pytest.raises(ValueError, match="optimiser"):
        merge_recipe(RunConfig(), load_recipe(bad))
