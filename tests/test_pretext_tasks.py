"""DDeP / DeP, hybrid diffusion and supervised source pretraining: corruptions, networks, runs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from labeldiff.config import CorruptionConfig, ModelConfig, RunConfig
from labeldiff.corruption import build_corruption
from labeldiff.evaluate.metrics import confusion_stats, dice_from_stats
from labeldiff.models.effunet import EfficientNetUNet, decoder_widths, init_encoder
from labeldiff.models.efficientnet import efficientnet_lite0
from labeldiff.models.unet import DirectSegmenter, SegmentationNet, build_network
from labeldiff.pretrain.run import encoder_weights, run_pretrain
from labeldiff.sample.diffusion import sample, sample_masks, save_samples
from labeldiff.transfer.finetune import run_finetune
from labeldiff.errors import RunFolderError

from conftest import open_pretrained, open_segmenter

SMALL_DECODER = (32, 16, 16, 8, 8)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ DDeP / DeP

def test_scaled_noise_on_the_signed_range_keeps_unit_variance():
    x = torch.randn(64, 3, 32, 32, generator=_gen(1))  # unit-variance input
    for sigma in (0.22, 0.8, 2.0):
        c = build_corruption(CorruptionConfig(method="ddep", sigma=sigma, noise_range="signed"))(x, _gen(2))
        assert abs(c.input.var().item() - 1.0) < 0.02, sigma
        gamma = 1 / (1 + sigma**2)
        assert torch.allclose(c.input, math.sqrt(gamma) * x + math.sqrt(1 - gamma) * c.target, atol=1e-5)
        assert torch.equal(c.t, torch.zeros(64, dtype=torch.long))


def test_ddep_noise_is_added_to_the_image_in_0_1_as_the_paper_draws_it():
    """DDeP Fig. 4 shows σ on images in [0, 1]: labeldiff maps its [-1, 1] image there, adds the scaled noise and
    maps back, so the noise a pixel gets is twice what the same σ adds on [-1, 1]."""
    x = torch.rand(64, 3, 32, 32, generator=_gen(1)) * 2 - 1
    sigma = 0.22
    gamma = 1 / (1 + sigma**2)
    c = build_corruption(CorruptionConfig(method="ddep", sigma=sigma))(x, _gen(2))
    x01 = (x + 1) / 2
    assert torch.allclose(c.input, 2 * (math.sqrt(gamma) * x01 + math.sqrt(1 - gamma) * c.target) - 1, atol=1e-5)
    signed = build_corruption(CorruptionConfig(method="ddep", sigma=sigma, noise_range="signed"))(x, _gen(2))
    assert torch.equal(signed.target, c.target)  # the same ε: only its scale on the pixels differs
    unit_noise = c.input - (2 * math.sqrt(gamma) * x01 - 1)
    signed_noise = signed.input - math.sqrt(gamma) * x
    assert torch.allclose(unit_noise, 2 * signed_noise, atol=1e-5)
    assert CorruptionConfig().noise_range == "unit"


def test_a_ddep_run_saved_before_noise_range_existed_reads_as_signed(tmp_path):
    """A config.json without the field is what that run computed: noise on [-1, 1]."""
    import json

    from labeldiff.config import RunConfig

    d = RunConfig().to_dict()
    d["corruption"]["method"] = "ddep"
    del d["corruption"]["noise_range"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert RunConfig.load(tmp_path / "config.json").corruption.noise_range == "signed"


def test_additive_noise_and_x0_target():
    x = torch.randn(64, 3, 32, 32, generator=_gen(1))
    c = build_corruption(CorruptionConfig(method="ddep", sigma=0.5, noise="additive", noise_range="signed"))(x, _gen(2))
    assert abs(c.input.var().item() - 1.25) < 0.03  # x + σ·ε: variance 1 + σ²
    assert torch.allclose(c.input, x + 0.5 * c.target, atol=1e-6)
    u = build_corruption(CorruptionConfig(method="ddep", sigma=0.5, noise="additive"))(x, _gen(2))
    assert torch.allclose(u.input, x + 2 * 0.5 * u.target, atol=1e-5)  # on [0, 1]: x01 + σ·ε, mapped back
    c0 = build_corruption(CorruptionConfig(method="dep", prediction="sample"))(x, _gen(2))
    assert torch.equal(c0.target, x)


@pytest.mark.parametrize("bad", [{"noise": "pink"}, {"sigma": 0.0}, {"prediction": "v"}])
def test_ddep_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        build_corruption(CorruptionConfig(method="ddep", **bad))


def test_decoder_widths_scale_with_multiplier():
    assert decoder_widths((256, 128, 64, 32, 16), 1) == (256, 128, 64, 32, 16)
    assert decoder_widths((256, 128, 64, 32, 16), 2) == (512, 256, 128, 64, 32)
    assert decoder_widths((256, 128, 64, 32, 16), 3) == (768, 384, 192, 96, 48)
    with pytest.raises(ValueError, match="five|5"):
        decoder_widths((64, 32), 1)


def test_efficientnet_unet_shapes_and_grey_input():
    net = EfficientNetUNet(3, 5, SMALL_DECODER).eval()
    assert net(torch.randn(2, 3, 64, 96)).shape == (2, 5, 64, 96)
    grey = EfficientNetUNet(1, 1, SMALL_DECODER).eval()
    assert grey(torch.randn(1, 1, 64, 64)).shape == (1, 1, 64, 64)
    assert not any(k.startswith(("encoder.fc", "encoder.head_")) for k in net.state_dict())
    with pytest.raises(ValueError, match="RGB"):
        EfficientNetUNet(4, 1)


def _ddep_run(data, method, tmp, steps=3, encoder="imagenet", **model):
    cfg = RunConfig(kind="pretrain", model=ModelConfig(arch="efficientnet-unet", decoder_channels=SMALL_DECODER,
                                                       encoder=encoder, **model),
                    corruption=CorruptionConfig(method=method))
    cfg.data.path, cfg.data.size, cfg.data.channels = str(data), 32, 3
    cfg.train.steps, cfg.train.batch_size, cfg.train.precision, cfg.train.device = steps, 2, "fp32", "cpu"
    cfg.train.warmup_steps, cfg.train.ema_decay, cfg.train.lr = 1, 0.0, 1e-2
    run_pretrain(cfg, tmp / method)
    return open_pretrained(tmp / method)[0]


@pytest.mark.slow
def test_ddep_keeps_the_imagenet_encoder_bit_identical(monuseg_small, tmp_path):
    ref = efficientnet_lite0(pretrained=True).state_dict()
    net = _ddep_run(monuseg_small, "ddep", tmp_path)
    enc = net.encoder.state_dict()
    assert enc, "no encoder weights"
    for k, v in enc.items():  # weights and BatchNorm running statistics
        assert torch.equal(v, ref[k]), k
    fresh = EfficientNetUNet(3, 3, SMALL_DECODER)
    changed = [k for k, v in net.decoder.state_dict().items() if not torch.equal(v, fresh.decoder.state_dict()[k])]
    assert changed, "the decoder did not train"


@pytest.mark.slow
def test_dep_trains_the_encoder_from_random_weights(monuseg_small, tmp_path):
    net = _ddep_run(monuseg_small, "dep", tmp_path)
    ref = efficientnet_lite0(pretrained=True).state_dict()
    stem = net.encoder.state_dict()["stem_conv.weight"]
    assert not torch.allclose(stem, ref["stem_conv.weight"])  # random init, not ImageNet


def test_ddep_needs_encoder_weights(monuseg_small, tmp_path):
    with pytest.raises(ValueError, match="--encoder imagenet"):
        _ddep_run(monuseg_small, "ddep", tmp_path, encoder="none")


@pytest.mark.slow
def test_encoder_from_a_supervised_run(binary_dataset, tmp_path):
    """--encoder RUN: a labeled source run with the same encoder provides DDeP's frozen encoder."""
    cfg = RunConfig(kind="pretrain", model=ModelConfig(arch="efficientnet-unet", decoder_channels=SMALL_DECODER,
                                                       encoder="none"),
                    corruption=CorruptionConfig(method="supervised"))
    cfg.data.path, cfg.data.size = str(binary_dataset), 32
    cfg.train.steps, cfg.train.batch_size, cfg.train.precision, cfg.train.device = 2, 2, "fp32", "cpu"
    run_pretrain(cfg, tmp_path / "src")
    src = open_pretrained(tmp_path / "src")[0]
    net = EfficientNetUNet(3, 3, SMALL_DECODER)
    loaded = init_encoder(net, encoder_weights(str(tmp_path / "src")))
    assert len(loaded) == len(net.encoder.state_dict())
    for k, v in net.encoder.state_dict().items():
        assert torch.equal(v, src.encoder.state_dict()[k])
    with pytest.raises(RunFolderError, match="config.json"):
        encoder_weights(str(tmp_path / "nowhere"))


def test_timestep_methods_refuse_the_efficientnet_unet(monuseg_small, tmp_path):
    with pytest.raises(ValueError, match="timestep"):
        _ddep_run(monuseg_small, "ddpm", tmp_path)


@pytest.mark.slow
def test_ddep_run_transfers_into_a_segmenter(monuseg_small, tmp_path):
    _ddep_run(monuseg_small, "ddep", tmp_path, steps=2)
    cfg = RunConfig(kind="segmentation")
    cfg.data.path, cfg.data.size = str(monuseg_small), 32
    cfg.transfer.pretrained, cfg.transfer.labels, cfg.transfer.head_hidden = str(tmp_path / "ddep"), 2, 8
    cfg.train.steps, cfg.train.batch_size, cfg.train.precision, cfg.train.device = 2, 2, "fp32", "cpu"
    run_finetune(cfg, tmp_path / "ft")
    model, loaded_cfg = open_segmenter(tmp_path / "ft")
    assert loaded_cfg.model.arch == "efficientnet-unet"
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2, 32, 32)


# ------------------------------------------------------------------------------------------ hybrid

def test_hybrid_channels_target_and_loss():
    cfg = CorruptionConfig(method="hybrid", prediction="sample", mask_weight=0.25)
    h = build_corruption(cfg)
    assert h.out_channels(3, 4) == 7
    x = torch.rand(2, 3, 16, 16, generator=_gen(0)) * 2 - 1
    m = torch.randint(0, 4, (2, 16, 16), generator=_gen(1))
    c = h(x, _gen(2), m)
    assert c.target.shape == (2, 7, 16, 16)
    assert torch.equal(c.target[:, :3], x)  # image part: x0 target
    assert torch.equal(c.target[:, 3:].argmax(1), m) and torch.equal(c.target[:, 3:].sum(1), torch.ones(2, 16, 16))
    assert not torch.equal(c.input, x)  # the network sees the noisy image only
    pred = torch.randn(2, 7, 16, 16, generator=_gen(3))
    expected = F.mse_loss(pred[:, :3], x) + 0.25 * F.mse_loss(pred[:, 3:], c.target[:, 3:])
    assert torch.allclose(h.loss(pred, c), expected)
    img, mask = h.split(pred, 3)
    assert img.shape[1] == 3 and mask.shape[1] == 4
    with pytest.raises(ValueError, match="labeled"):
        h(x, _gen(0), None)


def _labeled_run(data, method, tmp, steps, tiny_model, size=16, batch=4, **corr):
    cfg = RunConfig(kind="pretrain", model=tiny_model(3), corruption=CorruptionConfig(method=method, **corr))
    cfg.data.path, cfg.data.size, cfg.data.channels = str(data), size, 3
    cfg.train.steps, cfg.train.batch_size, cfg.train.precision, cfg.train.device = steps, batch, "fp32", "cpu"
    cfg.train.warmup_steps, cfg.train.ema_decay, cfg.train.lr, cfg.train.log_every = 5, 0.0, 5e-3, 10
    run_pretrain(cfg, tmp / method)
    return tmp / method


@pytest.mark.slow
def test_hybrid_mask_channels_segment_a_learnable_case_at_t0(binary_dataset, tmp_path, tiny_model_config):
    """Bright shapes on a dark background: after a short hybrid run, t = 0 mask channels segment them."""
    run = _labeled_run(binary_dataset, "hybrid", tmp_path, 300, tiny_model_config, size=32, batch=8,
                       prediction="sample", mask_weight=1.0)
    seg, cfg = open_segmenter(run)
    assert isinstance(seg, DirectSegmenter) and seg.first == 3 and cfg.num_classes == 2
    from labeldiff.data.folders import LabeledFolder
    from labeldiff.data.io import read_image, read_mask
    ds = LabeledFolder(binary_dataset)
    dices = []
    for s in ds.samples(ds.stems("test")):
        x = torch.from_numpy(read_image(s.image, 3))[None, :, :32, :48]
        with torch.no_grad():
            pred = seg(x).argmax(1)[0].numpy()
        dices.append(dice_from_stats(confusion_stats(pred, read_mask(s.mask, 2)[:32, :48], 2))[1])
    assert min(dices) > 0.9, dices


def test_hybrid_samples_image_mask_pairs(binary_dataset, tmp_path, tiny_model_config):
    run = _labeled_run(binary_dataset, "hybrid", tmp_path, 2, tiny_model_config, prediction="sample")
    model, cfg = open_pretrained(run)
    images = sample(model, cfg, n=3, sampler="ddim", steps=4, seed=0, batch_size=2, precision="fp32")
    masks = sample_masks(model, cfg, images, precision="fp32")
    assert images.shape == (3, 3, 16, 16) and masks.shape == (3, 16, 16)
    assert masks.min() >= 0 and masks.max() < 2
    grid = save_samples(images, tmp_path / "s", masks=masks)
    assert grid.is_file() and (tmp_path / "s" / "mask_002.png").is_file()


def test_supervised_pretraining_is_a_segmenter_and_transfers(binary_dataset, tmp_path, tiny_model_config):
    run = _labeled_run(binary_dataset, "supervised", tmp_path, 3, tiny_model_config)
    seg, cfg = open_segmenter(run)
    assert isinstance(seg, DirectSegmenter) and seg.first == 0
    assert seg(torch.randn(1, 3, 16, 16)).shape == (1, 2, 16, 16)
    from labeldiff.checkpoint import load_weights
    from labeldiff.models.unet import load_backbone_strict
    pretrained = load_weights(run / "model.safetensors")
    net = SegmentationNet(cfg.model, num_classes=2)
    report = load_backbone_strict(net, pretrained)
    # MONAI's out = GroupNorm (out.0) → SiLU → conv (out.2.conv): dropping `out` skips exactly these four
    assert report["skipped"] == ["out.0.bias", "out.0.weight", "out.2.conv.bias", "out.2.conv.weight"]
    assert report["loaded"] == sorted(k for k in pretrained if not k.startswith("out."))
    kept = SegmentationNet(cfg.model, num_classes=2, keep_out_norm=True)
    report = load_backbone_strict(kept, pretrained)
    assert report["skipped"] == ["out.2.conv.bias", "out.2.conv.weight"]
    assert torch.equal(kept.backbone.out[0].weight, pretrained["out.0.weight"])
    assert torch.equal(kept.backbone.out[0].bias, pretrained["out.0.bias"])
    with pytest.raises(ValueError, match="missing"):  # the norm must come from the run, not stay random
        load_backbone_strict(kept, {k: v for k, v in pretrained.items() if not k.startswith("out.0")})


def test_labeled_methods_need_masks(tmp_path, tiny_model_config):
    import numpy as np
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
    from labeldiff.data.io import DataError
    with pytest.raises(DataError, match="masks"):
        _labeled_run(tmp_path / "imgs", "hybrid", tmp_path, 1, tiny_model_config)


def test_build_network_dispatches_on_arch():
    assert type(build_network(ModelConfig(arch="efficientnet-unet", decoder_channels=SMALL_DECODER), 2)).__name__ == \
        "EfficientNetUNet"
    with pytest.raises(ValueError, match="arch"):
        build_network(ModelConfig(arch="vit"), 2)
