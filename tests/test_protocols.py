"""Each paper's own transfer protocol (``--protocol``): every setting it fixes, checked against a table that
cites the paper; the pieces it needed (a cosine decay, TransUNet's head, the probe's batch, the MDM paper's
medical features, the hybrid's mask-only twin) computing what they say; a run and a study reading it."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from labeldiff import protocols
from labeldiff.cli import main
from labeldiff.cli.commands import settings_layers
from labeldiff.cli.parser import build_parser
from labeldiff.config import CorruptionConfig, TrainConfig, flatten
from labeldiff.corruption import build_corruption
from labeldiff.models.probe import default_spec
from labeldiff.models.unet import SegHead
from labeldiff.pretrain.loop import lr_factor
from labeldiff.resolve import resolve

from conftest import write_labeled_dataset, write_tiny_study

# (setting, value, where the paper says it); "choice" rows are where the paper is silent (the YAML says why)
PAPERS = {
    "ct": [  # Huang et al. 2025, papers/ddpm-multi-organ-ct.txt
        ("transfer.strategy", "decoder", "Table 2 / §fine-tuning strategies: the fine-tuning decoder strategy"),
        ("transfer.augment", "none", "data pre-processing (iv): no additional augmentations for segmentation"),
        ("transfer.flips", "none", "data pre-processing (iv): flipping is for pre-training DDPMs only"),
        ("transfer.head_lr_mult", 10.0, "fine-tuning settings: the head's lr ten times the base rate"),
        ("transfer.head_weight_decay", 0.001, "fine-tuning settings: weight decay 1e-3 for the head"),
        ("transfer.backbone_weight_decay", 0.0001, "fine-tuning settings: 1e-4 for the remaining components"),
        ("transfer.ce_weight", 0.5, "Eq. 6: w·CE + (1 − w)·Dice (w not given: choice)"),
        ("transfer.t", 0, "Results: the best initialization diffusion step is 0"),
        ("transfer.head_hidden", 128, "Fig. 2, model S: the segmentation head"),
        ("train.batch_size", 4, "limited labels: one batch is 4 slices"),
        ("train.lr", 0.0002, "choice: the pretraining rate (the fine-tuning rate is not stated)"),
        ("train.lr_schedule", "linear", "choice: as their pretraining, 2e-4 → 2e-5"),
    ],
    "mdm": [  # Pan et al. 2023, papers/masked-diffusion-mdm.txt
        ("transfer.strategy", "probe", "§3.3: an MLP segmentation head on features of the MDM decoder"),
        ("transfer.features", "mdm-medical", "App. B: t = 50 for MDM; DDPM at t = 250 on the medical data"),
        ("transfer.probe_batch", 65536, "§4.1: a batch size of 65536 for the medical datasets"),
        ("transfer.probe_stop_iters", 50, "§4.1: until the training loss stops decreasing over a number of steps"),
        ("transfer.members", 10, "Baranchuk et al., whom they follow: an ensemble of 10 MLPs"),
        ("transfer.probe_max_epochs", 2000, "§4.1: until convergence (the cap must not bind before the loss rule)"),
    ],
    "ddep": [  # Brempong et al. 2022, papers/decoder-denoising-pretraining-ddep.md
        ("transfer.strategy", "full", "Fig. 1 / §5.1: the encoder–decoder model is fine-tuned"),
        ("transfer.ce_weight", 1.0, "§5.1: the standard pixel-wise cross-entropy loss"),
        ("train.lr_schedule", "cosine", "§5.1: Adam with a cosine learning rate decay schedule"),
        ("train.lr", 0.0001, "§5.1: lr swept in [1e-5, 3e-4] (1e-4 chosen inside it)"),
        ("transfer.augment", "none", "§5.1: random cropping and left-right flipping only"),
        ("transfer.flips", "h", "§5.1: random left-right flipping"),
        ("transfer.head_hidden", 0, "§3 / Fig. 2: TransUNet, whose head is one conv3×3 to the classes"),
        ("transfer.head_lr_mult", 1.0, "§5.1: one learning rate (no separate head rate is given)"),
    ],
    "hybrid": [  # Sauvalle & Salzmann 2024, papers/hybrid-diffusion-summary.md
        ("transfer.strategy", "full", "vanilla fine-tuning of the pretrained model"),
        ("transfer.keep_head", True, "the model is a segmenter by setting the noise level to zero"),
        ("transfer.t", 0, "the noise level set to zero"),
    ],
    "hybrid-ledm": [
        ("transfer.strategy", "probe", "LEDM: pixel MLPs on the diffusion model's features"),
        ("transfer.probe_batch", 64, "Baranchuk et al.: batch 64"),
        ("transfer.members", 10, "Baranchuk et al.: an ensemble of 10"),
    ],
}
PRETRAIN = {"ct": {"data.intensity": {"scheme": "dataset-percentile"}},  # data pre-processing (ii)
            "mdm": {"data.include_test": True},  # §4.1: the training and test images are pretrained on
            "ddep": {"corruption.noise_range": "unit"},  # Fig. 4: σ on images in [0, 1]
            "hybrid": {}, "hybrid-ledm": {}, "shared": {}}


def _resolved(command: str, *argv: str):
    args = build_parser().parse_args([command, "--data", "d", "--out", "o", *argv])
    return resolve("pretrain" if command == "pretrain" else "segmentation", settings_layers(args))


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_each_protocol_sets_what_its_paper_states(name):
    cfg = flatten(_resolved("finetune", "--recipe", "finetune-cpu", "--protocol", name))
    for setting, value, source in PAPERS[name]:
        assert cfg[setting] == value, (name, setting, source)
    assert cfg["train.steps"] == 300  # scale stays the recipe's


def test_the_shipped_protocols_and_their_pretraining_blocks():
    assert set(protocols.names()) == set(PRETRAIN)
    for name, want in PRETRAIN.items():
        p = protocols.load(name)
        assert p.pretrain == want and p.paper
        assert set(p.sources) == set(p.pretrain) | set(p.finetune)  # every setting says where it comes from
    shared = flatten(_resolved("finetune", "--protocol", "shared"))
    assert (shared["transfer.strategy"], shared["transfer.augment"]) == ("full", "strong")


def test_the_command_line_wins_over_the_protocol_and_the_protocol_over_the_recipe():
    cfg = _resolved("finetune", "--recipe", "finetune-cpu", "--protocol", "ct", "--strategy", "full")
    assert cfg.transfer.strategy == "full" and cfg.train.batch_size == 4  # recipe: 8; protocol: 4
    assert cfg.sources["train.batch_size"] == "protocol ct"
    pre = _resolved("pretrain", "--recipe", "ddpm-quick", "--protocol", "mdm")
    assert pre.data.include_test is True


def test_an_unknown_protocol_names_the_shipped_ones():
    with pytest.raises(Exception, match="ct, ddep, hybrid, hybrid-ledm, mdm, shared"):
        protocols.load("nnunet")


def test_cosine_decay_follows_half_a_cosine_to_the_final_ratio():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr_final_ratio=0.0, lr_schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.5)  # half-way: (1 + cos π/2) / 2
    assert lr_factor(35, cfg) == pytest.approx((1 + math.cos(math.pi * 0.25)) / 2)
    assert lr_factor(110, cfg) == pytest.approx(0.0, abs=1e-12)
    linear = TrainConfig(steps=110, warmup_steps=10, lr_final_ratio=0.0)
    assert lr_factor(35, linear) == pytest.approx(0.75)


def test_head_hidden_0_is_one_conv3x3_to_the_classes():
    head = SegHead(16, 0, 3)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (3, 3) and convs[0].out_channels == 3
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in head.modules())
    assert head(torch.zeros(1, 16, 8, 8)).shape == (1, 3, 8, 8)


def test_mdm_medical_features_take_ddpm_at_t250_and_mdm_at_t50():
    assert default_spec("ddpm", 3, medical=True).timesteps == (250,)
    assert default_spec("ddpm", 3).timesteps == (50, 150, 250)
    assert default_spec("mdm", 3, medical=True).timesteps == (50,)


def test_the_hybrid_mask_only_twin_trains_only_the_mask_channels():
    """image_weight 0: the same inputs x_t and mask target as the hybrid, no gradient into the image channels."""
    twin = build_corruption(CorruptionConfig(method="hybrid", prediction="sample", mask_weight=1.0, image_weight=0.0))
    hybrid = build_corruption(CorruptionConfig(method="hybrid", prediction="sample", mask_weight=1.0))
    twin.out_channels(3, 2), hybrid.out_channels(3, 2)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    m = torch.randint(0, 2, (2, 16, 16))
    g = torch.Generator().manual_seed(0)
    c = twin(x, g, m)
    c_h = hybrid(x, torch.Generator().manual_seed(0), m)
    assert torch.equal(c.input, c_h.input) and torch.equal(c.t, c_h.t)  # the same footing
    pred = torch.randn(2, 5, 16, 16, requires_grad=True)
    twin.loss(pred, c).backward()
    assert pred.grad[:, :3].abs().sum() == 0 and pred.grad[:, 3:].abs().sum() > 0
    assert twin.loss(pred, c).item() == pytest.approx(F.mse_loss(pred[:, 3:], c.target[:, 3:]).item())


TINY = ["--size", "16", "--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--channels", "3",
        "--unet-channels", "8,16", "--attention", "0,0", "--head-channels", "8", "--checkpoint-every", "100"]


@pytest.mark.slow
def test_a_protocol_run_end_to_end_and_the_deviation_it_reports(tmp_path, capsys):
    data = write_labeled_dataset(tmp_path / "data", n=6, k=3)
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "pre"), "--steps", "3", *TINY]) == 0
    capsys.readouterr()
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "mdm"), "--pretrained", str(tmp_path / "pre"),
                 "--protocol", "mdm", "--labels", "2", "--members", "2", "--size", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "note: protocol mdm pretrains with another setting" in out and "data.include_test is False" in out
    saved = json.loads((tmp_path / "mdm" / "config.json").read_text())
    assert saved["transfer"]["probe_batch"] == 65536 and saved["transfer"]["features"].endswith("t=250")
    assert saved["sources"]["transfer.probe_batch"] == "protocol mdm"

    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "pre-mdm"), "--steps", "3", "--protocol",
                 "mdm", *TINY]) == 0
    trained_on = json.loads((tmp_path / "pre-mdm" / "trained_on.json").read_text())
    assert len(trained_on["stems"]) == 6  # the test images too: transductive, as the paper
    capsys.readouterr()
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "ddep"), "--pretrained",
                 str(tmp_path / "pre-mdm"), "--protocol", "ddep", "--labels", "2", "--steps", "4", "--size", "16",
                 "--batch-size", "2", "--precision", "fp32", "--device", "cpu"]) == 0
    saved = json.loads((tmp_path / "ddep" / "config.json").read_text())
    assert saved["train"]["lr_schedule"] == "cosine" and saved["transfer"]["head_hidden"] == 0
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "ddep" / "log.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs and lrs[-1] < 1e-4


@pytest.mark.slow
def test_a_study_protocol_layers_the_paper_under_its_overrides(tmp_path):
    from labeldiff.study.configs import finetune_config
    from labeldiff.study.spec import load_study

    spec = write_tiny_study(tmp_path, protocols=[{"name": "paper", "protocol": "ct",
                                                  "overrides": {"train.batch_size": 2}},
                                                 {"name": "plain"}])
    study = load_study(spec)
    paper, plain = study.protocols
    assert paper.paper == "ct" and plain.paper is None
    cfg = finetune_config(study, paper)
    assert cfg.transfer.strategy == "decoder" and cfg.transfer.augment == "none" and cfg.train.batch_size == 2
    assert finetune_config(study, plain).transfer.strategy == "full"
    bad = yaml.safe_load(spec.read_text())
    bad["protocols"] = [{"name": "p", "protocol": "nnunet"}]
    spec.write_text(yaml.safe_dump(bad))
    with pytest.raises(Exception, match="protocols\\[0\\].protocol"):
        load_study(spec)


@pytest.mark.slow
def test_a_protocol_runs_only_its_strategies_and_scratch(tmp_path, capsys):
    spec = write_tiny_study(tmp_path, strategies=["full", "decoder", "scratch"],
                            protocols=[{"name": "shared", "protocol": "shared", "strategies": ["full"]},
                                       {"name": "paper", "protocol": "ct", "strategies": ["decoder"]}])
    assert main(["study", str(spec), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    cells = sorted(line.split()[1].rsplit("-k2", 1)[0] for line in capsys.readouterr().out.splitlines()
                   if line.strip().startswith("todo"))
    assert cells == ["ddpm-decoder-paper", "ddpm-full-shared", "none-scratch-paper", "none-scratch-shared"]
    bad = yaml.safe_load(spec.read_text())
    bad["protocols"][1]["strategies"] = ["lp-ft"]
    spec.write_text(yaml.safe_dump(bad))
    assert main(["study", str(spec), "--out", str(tmp_path / "out2"), "--dry-run"]) != 0
    assert "lp-ft is not among the study's strategies" in capsys.readouterr().err
