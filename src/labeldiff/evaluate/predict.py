"""Whole-image prediction at the original resolution.

The image is brought to the network's scale (``network_hw``); crop-mode models slide a
``size``² window over it (MONAI ``sliding_window_inference``, Gaussian blending), resize-mode
models see the whole resized image; logits are then resized back to the original size before
the argmax, so metrics are computed against the untouched mask. With ``tta`` the logits of the
horizontally flipped image, flipped back, are averaged with those of the image. Inference runs in
fp32 unless ``precision`` says otherwise, so a run scores the same on every CPU (``auto`` would
pick bf16 on CPUs with AMX/AVX512-BF16 and fp32 elsewhere).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from labeldiff.config import DataConfig
from labeldiff.data.datasets import network_hw, resize_image
from labeldiff.runtime import INFERENCE_PRECISION, autocast, resolve_precision


@torch.no_grad()
def predict_logits(model: torch.nn.Module, image: torch.Tensor, cfg: DataConfig, precision: str = INFERENCE_PRECISION,
                   overlap: float = 0.25, sw_batch_size: int = 8, tta: bool = False,
                   network_input=None) -> torch.Tensor:
    """``image [C, H, W]`` in [-1, 1] at original size → logits ``[K, H, W]`` at original size; a batch of
    images of one size, ``[B, C, H, W]`` → ``[B, K, H, W]`` in one forward (the slices of a volume).

    ``tta``: mean of the logits of the image and of its horizontal flip (flipped back).
    ``network_input(x [C, h, w]) -> x``: applied to the image once it is at the network's size (a test-time
    corruption sees the pixels the network sees, as ImageNet-C corrupts its 224² images); single images only.
    """
    if tta:
        plain = predict_logits(model, image, cfg, precision, overlap, sw_batch_size, network_input=network_input)
        flipped = predict_logits(model, image.flip(-1), cfg, precision, overlap, sw_batch_size,
                                 network_input=network_input).flip(-1)
        return (plain + flipped) / 2
    batched = image.dim() == 4
    if batched and network_input is not None:
        raise ValueError("network_input transforms one image; predict a batch without it")
    device = next(model.parameters()).device
    hw = tuple(image.shape[-2:])
    x = resize_image(image, network_hw(hw, cfg))
    if not batched:
        x = (x if network_input is None else network_input(x))[None]
    x = x.to(device)
    dtype = resolve_precision(precision, device)
    with autocast(device, dtype):
        if cfg.mode == "resize" or getattr(model, "whole_image", False):
            logits = model(x)
        else:
            logits = sliding_window_inference(x, roi_size=(cfg.size, cfg.size), sw_batch_size=sw_batch_size,
                                              predictor=model, overlap=overlap, mode="gaussian")
    logits = logits.float()
    if tuple(logits.shape[-2:]) != hw:
        logits = F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)
    return (logits if batched else logits[0]).cpu()


def predict_mask(model: torch.nn.Module, image: torch.Tensor, cfg: DataConfig, precision: str = INFERENCE_PRECISION,
                 tta: bool = False, network_input=None) -> torch.Tensor:
    """``image [C, H, W]`` → integer mask ``[H, W]`` at the original size."""
    return predict_logits(model, image, cfg, precision, tta=tta, network_input=network_input).argmax(0)


def entropy_map(logits: torch.Tensor) -> np.ndarray:
    """``logits [K, H, W]`` → ``[H, W]`` uint8: the entropy of the class probabilities, 255 = log K (a uniform
    guess over the K classes), 0 = certain. What ``labeldiff predict`` writes as ``uncertainty/<stem>.png``;
    for the probe, ``logits`` are those of the ensemble's mean probability."""
    k = logits.shape[0]
    probs = torch.softmax(logits.float(), dim=0)
    ent = -(probs * probs.clamp_min(1e-12).log()).sum(0) / np.log(max(k, 2))
    return (ent.clamp(0, 1) * 255).round().numpy().astype(np.uint8)


def predict_and_score(model: torch.nn.Module, cfg: DataConfig, samples: list, num_classes: int,
                      precision: str = INFERENCE_PRECISION, tta: bool = False, transform=None, desc: str = "evaluate"):
    """Per labeled sample, in order: ``(sample, image [C, H, W], target [H, W], logits [K, H, W], pred [H, W],
    stats [K, 3])``, the logits at the original size (:func:`predict_logits`), ``pred`` their argmax.

    ``transform(x, i) -> x`` (e.g. a corruption of the i-th sample) is applied to the image at the network's
    size (``network_input`` of :func:`predict_logits`); the image yielded and the mask stay as read. Ignored
    pixels (``cfg.ignore_index``) are left out of the stats.
    """
    from tqdm.auto import tqdm

    from labeldiff.evaluate.metrics import confusion_stats

    for i, s in enumerate(tqdm(samples, desc=desc, unit="img", leave=transform is None)):
        image = torch.from_numpy(s.read_image(cfg.channels))
        target = s.read_mask(num_classes)
        at_net = None if transform is None else (lambda x, i=i: transform(x, i))
        logits = predict_logits(model, image, cfg, precision, tta=tta, network_input=at_net)
        pred = logits.argmax(0).numpy()
        yield s, image, target, logits, pred, confusion_stats(pred, target, num_classes, cfg.ignore_index)
