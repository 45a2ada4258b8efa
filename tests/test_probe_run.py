"""`finetune --strategy probe`: a self-contained run folder that evaluates and predicts like any other."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from labeldiff.cli import main
from labeldiff.config import CorruptionConfig, ModelConfig, RunConfig
from labeldiff.pretrain.run import run_pretrain
from labeldiff.models.probe import FeatureSpec, PaddedExtractor, format_spec, parse_spec

from conftest import open_pretrained, open_segmenter


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    from conftest import tiny_run, write_labeled_dataset

    data = write_labeled_dataset(tmp_path_factory.mktemp("d") / "data", n=6, k=2)
    cfg = tiny_run(data, steps=3)
    out = tmp_path_factory.mktemp("pre") / "ddpm"
    run_pretrain(cfg, out)
    return data, out


def test_spec_text_round_trip():
    spec = parse_spec("blocks=1,2;t=50,150")
    assert spec == FeatureSpec((1, 2), (50, 150))
    assert parse_spec(format_spec(spec)) == spec
    with pytest.raises(ValueError, match="blocks="):
        parse_spec("layers 1 2")


def test_padded_extractor_matches_sizes(ddpm_run):
    from labeldiff.models.probe import make_extractor

    unet, cfg = open_pretrained(ddpm_run[1])
    ex = PaddedExtractor(make_extractor(unet, cfg))
    f = ex(torch.rand(1, 3, 21, 30) * 2 - 1)
    assert f.shape == (1, ex.num_features, 21, 30)
    even = torch.rand(1, 3, 20, 30) * 2 - 1  # already a multiple of 2: no padding, same as the raw extractor
    assert torch.equal(ex(even), ex.extractor(even))


@pytest.mark.slow
def test_probe_run_evaluate_and_predict(ddpm_run, tmp_path):
    data, pre = ddpm_run
    out = tmp_path / "probe"
    assert main(["finetune", "--data", str(data), "--pretrained", str(pre), "--strategy", "probe", "--labels", "2",
                 "--members", "2", "--features", "blocks=1;t=0,100", "--size", "16", "--out", str(out)]) == 0
    cfg = RunConfig.load(out / "config.json")
    assert cfg.transfer.strategy == "probe" and cfg.transfer.features == "blocks=1;t=0,100"
    labeled = json.loads((out / "labeled.json").read_text())
    assert len(labeled["stems"]) == 2 and len(labeled["member_epochs"]) == 2
    model, _ = open_segmenter(out)
    x = torch.rand(1, 3, 40, 48) * 2 - 1
    scores = model(x)
    assert scores.shape == (1, 2, 40, 48)
    assert torch.allclose(scores.exp().sum(1), torch.ones(1, 40, 48), atol=1e-4)  # log of mean probabilities
    assert main(["evaluate", "--model", str(out), "--device", "cpu"]) == 0
    dice = json.loads((out / "eval_test" / "metrics.json").read_text())["dice"]["mean"]
    assert dice > 0.5  # bright shapes on a dark background: a probe on random-ish features still finds them
    assert main(["predict", "--model", str(out), "--input", str(data / "images"), "--out", str(tmp_path / "p"),
                 "--device", "cpu"]) == 0
    from PIL import Image
    unc = np.asarray(Image.open(tmp_path / "p" / "uncertainty" / "img_00.png"))
    assert unc.shape == (40, 48) and unc.max() > unc.min()


@pytest.mark.slow
def test_probe_refuses_runs_without_decoder_blocks(tmp_path, capsys):
    from conftest import write_labeled_dataset

    data = write_labeled_dataset(tmp_path / "d", n=4, k=2, hw=(32, 32), n_train=3)
    cfg = RunConfig(kind="pretrain", model=ModelConfig(arch="efficientnet-unet", decoder_channels=(16, 8, 8, 8, 8)),
                    corruption=CorruptionConfig(method="dep"))
    cfg.data.path, cfg.data.size = str(data), 32
    cfg.train.steps, cfg.train.batch_size, cfg.train.precision, cfg.train.device = 1, 2, "fp32", "cpu"
    run_pretrain(cfg, tmp_path / "dep")
    capsys.readouterr()
    assert main(["finetune", "--data", str(data), "--pretrained", str(tmp_path / "dep"), "--strategy", "probe",
                 "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "linear, decoder or full" in err and not (tmp_path / "p").exists()


@pytest.mark.slow
def test_probe_with_auto_features_records_the_choice(ddpm_run, tmp_path):
    data, pre = ddpm_run
    out = tmp_path / "auto"
    assert main(["finetune", "--data", str(data), "--pretrained", str(pre), "--strategy", "probe", "--labels", "2",
                 "--members", "1", "--features", "auto", "--size", "16", "--scale", "0.575", "--out", str(out)]) == 0
    # (0.575 × 40×48 = 23×28: not a multiple of the UNet's factor; selection must cope like training does)
    labeled = json.loads((out / "labeled.json").read_text())
    assert labeled["features_requested"] == "auto" and len(labeled["selection"]) > 3
    best = [row for row in labeled["selection"] if row["best"]]
    assert len(best) == 1
    chosen = RunConfig.load(out / "config.json").transfer.features
    assert parse_spec(chosen) == FeatureSpec.from_dict(best[0]["spec"])
