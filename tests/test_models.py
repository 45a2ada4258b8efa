"""The UNet, the segmentation network and strict loading of pretrained backbones."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from labeldiff.config import ModelConfig
from labeldiff.models.unet import (SegmentationNet, build_unet, check_model_config, load_backbone_strict,
                                   size_multiple)


def test_unet_output_shape(tiny_model_config):
    """The pretext UNet maps [B,C,H,W] and [B] timesteps to [B,C,H,W]."""
    for c in (1, 3):
        net = build_unet(tiny_model_config(c), out_channels=c)
        x = torch.randn(2, c, 16, 16)
        y = net(x, torch.tensor([0, 999]))
        assert y.shape == x.shape


def test_segmentation_output_and_timestep(tiny_model_config):
    """SegmentationNet gives logits [B,K,H,W]; the fixed timestep t changes the output."""
    torch.manual_seed(0)
    net = SegmentationNet(tiny_model_config(3), num_classes=4, t=0, head_hidden=8).eval()
    x = torch.randn(2, 3, 32, 32)
    y = net(x)
    assert y.shape == (2, 4, 32, 32)
    assert net.features(x).shape == (2, 8, 32, 32)  # channels[0] decoder features
    # perturb the time embedding weights so that t matters even for the zero-initialised parts
    with torch.no_grad():
        for p in net.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    y0 = net(x)
    net.t = 500
    assert not torch.allclose(y0, net(x))


def test_head_structure(tiny_model_config):
    """The head is (conv3×3 → BN → ReLU) × 2 → conv1×1 to K classes."""
    net = SegmentationNet(tiny_model_config(3), num_classes=3, head_hidden=16)
    layers = list(net.head.layers)
    assert [type(m) for m in layers] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.ReLU,
                                         nn.Conv2d]
    assert layers[0].kernel_size == (3, 3) and layers[0].in_channels == 8 and layers[0].out_channels == 16
    assert layers[3].kernel_size == (3, 3) and layers[3].in_channels == 16
    assert layers[6].kernel_size == (1, 1) and layers[6].out_channels == 3
    assert isinstance(net.backbone.out, nn.Identity)  # the whole pretext output layer is gone (the default)
    kept = SegmentationNet(tiny_model_config(3), 3, keep_out_norm=True)  # only its conv is
    assert [type(m) for m in kept.backbone.out] == [nn.GroupNorm, nn.SiLU]


def test_load_backbone_strict(tiny_model_config):
    """Pretrained UNet weights land in the backbone; skipped = the `out.*` keys, new = the head.* keys."""
    torch.manual_seed(1)
    pre = build_unet(tiny_model_config(3), out_channels=3)
    sd = pre.state_dict()
    torch.manual_seed(2)
    net = SegmentationNet(tiny_model_config(3), num_classes=2, head_hidden=8)
    assert not torch.equal(net.backbone.conv_in.conv.weight, sd["conv_in.conv.weight"])
    report = load_backbone_strict(net, sd)
    out_keys = sorted(k for k in sd if k.startswith("out."))
    assert out_keys and report["skipped"] == out_keys
    assert report["new"] == sorted(f"head.{k}" for k in net.head.state_dict())
    assert report["loaded"] == sorted(k for k in sd if not k.startswith("out."))
    own = net.backbone.state_dict()
    assert set(own) == set(report["loaded"])
    for k in own:
        assert torch.equal(own[k], sd[k]), k


def test_load_backbone_strict_errors(tiny_model_config):
    """A missing key, an unknown extra key and a shape mismatch each raise ValueError."""
    sd = build_unet(tiny_model_config(3), out_channels=3).state_dict()
    net = SegmentationNet(tiny_model_config(3), num_classes=2, head_hidden=8)

    missing = dict(sd)
    del missing["conv_in.conv.weight"]
    with pytest.raises(ValueError, match="1 missing"):
        load_backbone_strict(net, missing)

    extra = dict(sd)
    extra["decoder_extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="1 unexpected"):
        load_backbone_strict(net, extra)

    wide = ModelConfig(in_channels=3, channels=(16, 32), num_res_blocks=1, attention_levels=(False, False),
                       norm_num_groups=8, num_head_channels=8)
    with pytest.raises(ValueError, match="wrong shape"):
        load_backbone_strict(net, build_unet(wide, out_channels=3).state_dict())

    grey = build_unet(tiny_model_config(1), out_channels=1).state_dict()
    with pytest.raises(ValueError, match="conv_in"):
        load_backbone_strict(net, grey)


def test_check_model_config_errors():
    """Widths not divisible by the norm groups, or attention levels of the wrong length, are ValueErrors."""
    with pytest.raises(ValueError, match="norm_num_groups"):
        check_model_config(ModelConfig(channels=(12, 16), attention_levels=(False, False), norm_num_groups=8))
    with pytest.raises(ValueError, match="attention_levels"):
        check_model_config(ModelConfig(channels=(8, 16), attention_levels=(False, False, False)))
    with pytest.raises(ValueError, match="num_head_channels"):
        check_model_config(ModelConfig(channels=(8, 24), attention_levels=(False, True), num_head_channels=16))
    # the middle block always has attention at the last width, even with every level's attention off
    with pytest.raises(ValueError, match="middle block"):
        check_model_config(ModelConfig(channels=(8, 16), attention_levels=(False, False), num_head_channels=32))
    check_model_config(ModelConfig(channels=(8, 16), attention_levels=(False, True), num_head_channels=8))
    with pytest.raises(ValueError):
        build_unet(ModelConfig(channels=(12, 16), attention_levels=(False, False)), out_channels=3)


@pytest.mark.parametrize("channels,attention,heads", [
    ((8, 16), (False, False), 32), ((8, 16), (False, False), 16), ((16, 32), (False, False), 32),
    ((8, 24), (False, False), 16), ((8, 24), (True, False), 8), ((16, 24), (True, False), 16),
    ((8, 16, 32), (False, True, False), 16), ((8, 16, 32), (False, True, False), 32),
])
def test_check_model_config_agrees_with_monai(channels, attention, heads):
    """check_model_config accepts a config exactly when MONAI can build the UNet from it."""
    cfg = ModelConfig(in_channels=1, channels=channels, attention_levels=attention, norm_num_groups=8,
                      num_head_channels=heads)
    try:
        check_model_config(cfg)
        ours = None
    except ValueError as e:
        ours = e
    from monai.networks.nets import DiffusionModelUNet

    try:
        DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=channels, num_res_blocks=1,
                           attention_levels=attention, norm_num_groups=8, num_head_channels=heads)
        monai_ok = True
    except ValueError:
        monai_ok = False
    assert (ours is None) == monai_ok, ours


def test_size_multiple():
    """Inputs must be multiples of 2^(levels−1)."""
    assert size_multiple(ModelConfig(channels=(8, 16), attention_levels=(False, False))) == 2
    assert size_multiple(ModelConfig()) == 4


def test_memory_efficient_attention_matches_the_explicit_matrix(tiny_model_config):
    """build_unet uses torch's scaled_dot_product_attention; it must compute what MONAI's explicit
    [tokens × tokens] attention computes (no dropout, same scale), in training and eval mode."""
    cfg = tiny_model_config(1)
    cfg.attention_levels = (False, True)
    net = build_unet(cfg, out_channels=1)
    attention = [m for m in net.modules() if hasattr(m, "use_flash_attention")]
    assert attention and all(m.use_flash_attention for m in attention)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    for mode in (True, False):
        net.train(mode)
        with torch.no_grad():
            fast = net(x, t)
            for m in attention:
                m.use_flash_attention = False
            explicit = net(x, t)
            for m in attention:
                m.use_flash_attention = True
        torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-4)
