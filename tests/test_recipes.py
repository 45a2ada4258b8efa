"""Every shipped recipe parses into a RunConfig whose network can be built."""
from pathlib import Path

import pytest

from labeldiff.config import RunConfig, load_recipe, merge_recipe
from labeldiff.models.unet import check_model_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"ddpm", "ddpm-cpu", "finetune", "finetune-cpu"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_builds(path):
    cfg = merge_recipe(RunConfig(), load_recipe(path))
    check_model_config(cfg.model)
    assert cfg.train.steps > 0


def test_unknown_recipe_section_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimiser:\n  lr: 1\n")
    with pytest.raises(ValueError, match="optimiser"):
        merge_recipe(RunConfig(), load_recipe(bad))
