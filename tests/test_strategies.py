"""Transfer strategies: each trains exactly its parameter set; frozen weights and BN statistics stay put."""
from __future__ import annotations

import pytest
import torch

from labeldiff.checkpoint import load_weights
from labeldiff.config import CorruptionConfig, ModelConfig, RunConfig
from labeldiff.evaluate.predict import predict_logits
from labeldiff.pretrain.run import run_pretrain
from labeldiff.transfer.finetune import frozen_parts, run_finetune

from conftest import open_segmenter


@pytest.fixture(scope="module")
def unet_run(module_dataset, tmp_path_factory):
    from conftest import tiny_run

    cfg = tiny_run(module_dataset, steps=2)
    out = tmp_path_factory.mktemp("pre") / "ddpm"
    run_pretrain(cfg, out)
    return out


@pytest.fixture(scope="module")
def effunet_run(module_dataset, tmp_path_factory):
    cfg = RunConfig(kind="pretrain", model=ModelConfig(arch="efficientnet-unet", decoder_channels=(32, 16, 16, 8, 8)),
                    corruption=CorruptionConfig(method="ddep"))
    cfg.data.path, cfg.data.size = str(module_dataset), 32
    cfg.train.steps, cfg.train.batch_size, cfg.train.precision, cfg.train.device = 2, 2, "fp32", "cpu"
    out = tmp_path_factory.mktemp("pre") / "ddep"
    run_pretrain(cfg, out)
    return out


def _init(data, pretrained, strategy, size=16) -> dict:
    """The segmenter's weights before its first step, built as run_finetune builds them."""
    from labeldiff.transfer.finetune import build_segmenter
    from labeldiff.transfer.labeled import prepare_transfer

    cfg = RunConfig(kind="segmentation")
    cfg.data.path, cfg.data.size = str(data), size
    cfg.transfer.pretrained, cfg.transfer.strategy, cfg.transfer.labels = str(pretrained), strategy, 2
    cfg.transfer.head_hidden = 8
    job = prepare_transfer(cfg)
    torch.manual_seed(cfg.train.seed)
    model, _ = build_segmenter(job.cfg, job.num_classes, job.pre)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _finetune(data, pretrained, strategy, out, size=16, steps=3):
    cfg = RunConfig(kind="segmentation")
    cfg.data.path, cfg.data.size = str(data), size
    cfg.transfer.pretrained, cfg.transfer.strategy, cfg.transfer.labels = str(pretrained), strategy, 2
    cfg.transfer.head_hidden = 8
    cfg.train.steps, cfg.train.batch_size, cfg.train.precision, cfg.train.device = steps, 2, "fp32", "cpu"
    cfg.train.lr, cfg.train.warmup_steps = 1e-2, 1
    run_finetune(cfg, out)
    return load_weights(out / "model.safetensors")


def _changed(before: dict, after: dict, prefix: str) -> tuple[list[str], list[str]]:
    keys = [k for k in after if k.startswith(prefix)]
    changed = [k for k in keys if not torch.equal(before[k[len("backbone."):]], after[k])]
    same = [k for k in keys if k not in changed]
    return changed, same


@pytest.mark.parametrize("strategy", ["linear", "decoder", "full"])
def test_unet_strategy_trains_exactly_its_parameters(module_dataset, unet_run, tmp_path, strategy):
    pre = load_weights(unet_run / "model.safetensors")
    after = _finetune(module_dataset, unet_run, strategy, tmp_path / strategy)
    frozen = frozen_parts(strategy, "unet")
    backbone = {k: v for k, v in after.items() if k.startswith("backbone.")}
    for k, v in backbone.items():
        is_frozen = any(k.startswith(p + ".") for p in frozen)
        weight_like = k.endswith("weight") and v.ndim > 1
        if is_frozen:
            assert torch.equal(v, pre[k[len("backbone."):]]), f"{strategy}: frozen {k} moved"
        elif weight_like:
            assert not torch.equal(v, pre[k[len("backbone."):]]), f"{strategy}: trainable {k} did not move"
    init = _init(module_dataset, unet_run, strategy)
    heads = [k for k in after if k.startswith("head.") and k.endswith("weight")]
    assert heads and all(not torch.equal(after[k], init[k]) for k in heads), "the head did not train"


def test_frozen_parts_by_name():
    assert frozen_parts("linear", "unet") == ("backbone",)
    assert frozen_parts("decoder", "unet") == ("backbone.conv_in", "backbone.time_embed", "backbone.down_blocks",
                                               "backbone.middle_block")
    assert frozen_parts("decoder", "efficientnet-unet") == ("backbone.encoder",)
    assert frozen_parts("full", "unet") == frozen_parts("scratch", "unet") == ()
    with pytest.raises(ValueError, match="unknown"):
        frozen_parts("lora", "unet")


def test_decoder_strategy_keeps_encoder_batchnorm_statistics(module_dataset, effunet_run, tmp_path):
    pre = load_weights(effunet_run / "model.safetensors")
    after = _finetune(module_dataset, effunet_run, "decoder", tmp_path / "dec", size=32)
    stats = [k for k in after if k.startswith("backbone.encoder.") and "running_" in k]
    assert stats
    for k in stats:
        assert torch.equal(after[k], pre[k[len("backbone."):]]), k
    moved = [k for k in after if k.startswith("backbone.decoder.") and "running_mean" in k
             and not torch.equal(after[k], pre[k[len("backbone."):]])]
    assert moved, "the decoder's BatchNorm statistics should train"


def test_strategies_that_need_a_pretrained_run(module_dataset, tmp_path):
    for strategy in ("linear", "decoder", "full"):
        cfg = RunConfig(kind="segmentation")
        cfg.data.path, cfg.data.size, cfg.transfer.strategy = str(module_dataset), 16, strategy
        with pytest.raises(ValueError, match="--pretrained"):
            run_finetune(cfg, tmp_path / strategy)


def test_tta_averages_the_flipped_prediction(module_dataset, unet_run, tmp_path):
    _finetune(module_dataset, unet_run, "full", tmp_path / "ft")
    model, cfg = open_segmenter(tmp_path / "ft")
    image = torch.rand(3, 24, 40) * 2 - 1
    plain = predict_logits(model, image, cfg.data, "fp32")
    mirror = predict_logits(model, image.flip(-1), cfg.data, "fp32").flip(-1)
    tta = predict_logits(model, image, cfg.data, "fp32", tta=True)
    assert torch.allclose(tta, (plain + mirror) / 2, atol=1e-6)
    # a flip-symmetric image gives a flip-symmetric TTA prediction
    sym = torch.cat([image[..., :20], image[..., :20].flip(-1)], dim=-1)
    t = predict_logits(model, sym, cfg.data, "fp32", tta=True)
    assert torch.allclose(t, t.flip(-1), atol=1e-5)
