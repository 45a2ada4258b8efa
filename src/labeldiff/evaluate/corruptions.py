"""Test-time image corruptions at severities 1..5, for ``labeldiff evaluate --corruptions``.

The MDM paper (App. B, Fig. 8) trains on clean data and scores the test images under the corruptions of
Hendrycks & Dietterich (2019, "ImageNet-C"). We keep five of them with ImageNet-C's level parameters
(``make_imagenet_c.py``), written for images in [0, 1] and applied here to [-1, 1] images through
``u = (x + 1) / 2``, plus a smooth multiplicative bias field (MONAI ``RandBiasField``, the MRI
inhomogeneity model), whose levels are ours:

=============  ===================================  ===============================  ============================
name           parameter, severity 1..5             operation (u in [0, 1])           source
=============  ===================================  ===============================  ============================
noise          std 0.08, 0.12, 0.18, 0.26, 0.38     u + N(0, std²), clipped           ImageNet-C gaussian_noise
blur           sigma 1, 2, 3, 4, 6 px               Gaussian, edge-replicated        ImageNet-C gaussian_blur
jpeg           quality 25, 18, 15, 10, 7            PIL JPEG encode + decode          ImageNet-C jpeg_compression
contrast       factor 0.4, 0.3, 0.2, 0.1, 0.05      (u - mean(u)) · factor + mean    ImageNet-C contrast
brightness     shift 0.1, 0.2, 0.3, 0.4, 0.5        HSV value + shift, clipped        ImageNet-C brightness
bias_field     coefficients in [0, c], c = 0.1, …,  u · exp(degree-3 Legendre poly)   MONAI RandBiasField; level 1
               0.2, 0.3, 0.4, 0.5                   clipped                           = MONAI's default range
=============  ===================================  ===============================  ============================

Severity 0 is the identity. Every corruption is deterministic given ``(seed, index)`` (the image's
position in the split): its random draw does not depend on the severity, so a higher severity scales
the same noise / the same field. Pixel sizes (blur's sigma, JPEG's 8×8 blocks, the noise's grain) are
those of the image given; evaluation corrupts each image at the network's input size, as ImageNet-C
corrupts its 224² images (``network_input`` of :func:`labeldiff.evaluate.predict.predict_logits`).
"""
from __future__ import annotations

import io
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from labeldiff.errors import ConfigError

LEVELS: dict[str, tuple[float, ...]] = {
    "noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "blur": (1.0, 2.0, 3.0, 4.0, 6.0),
    "jpeg": (25, 18, 15, 10, 7),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "bias_field": (0.1, 0.2, 0.3, 0.4, 0.5),
}
SOURCES = {"noise": "ImageNet-C gaussian_noise", "blur": "ImageNet-C gaussian_blur",
           "jpeg": "ImageNet-C jpeg_compression", "contrast": "ImageNet-C contrast",
           "brightness": "ImageNet-C brightness", "bias_field": "MONAI RandBiasField (degree 3), our levels"}
NAMES = tuple(LEVELS)
SEVERITIES = (1, 2, 3, 4, 5)


def _rng(seed: int, index: int, name: str) -> np.random.Generator:
    """One stream per (seed, image, corruption), the same at every severity."""
    return np.random.default_rng([seed, index, zlib.crc32(name.encode())])


def gaussian_noise(u: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    return u + std * rng.standard_normal(u.shape)


def gaussian_blur(u: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian of ``u [C, H, W]``, truncated at 4 sigma, edges replicated (skimage's defaults)."""
    r = max(int(4 * sigma + 0.5), 1)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    k = k / k.sum()
    x = torch.from_numpy(u).double()[:, None]  # [C, 1, H, W]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return x[:, 0].numpy()


def jpeg(u: np.ndarray, quality: int) -> np.ndarray:
    """PIL JPEG round trip: 3 channels as one RGB image, any other count channel by channel (greyscale)."""
    from PIL import Image

    def roundtrip(a: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(np.round(a * 255).clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=int(quality))
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float64) / 255

    if u.shape[0] == 3:
        return roundtrip(u.transpose(1, 2, 0)).transpose(2, 0, 1)
    return np.stack([roundtrip(c) for c in u])


def contrast(u: np.ndarray, factor: float) -> np.ndarray:
    mean = u.mean()
    return (u - mean) * factor + mean


def brightness(u: np.ndarray, shift: float) -> np.ndarray:
    """HSV value + ``shift`` with hue and saturation kept: each pixel's channels scale by V'/V (grey: u + shift)."""
    v = u.max(0, keepdims=True)
    v2 = np.clip(v + shift, 0, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(v > 0, u * v2 / np.where(v > 0, v, 1), v2)


def bias_field(u: np.ndarray, c: float, seed: int) -> np.ndarray:
    """``u · exp(field)``, the field a degree-3 Legendre polynomial with coefficients uniform in [0, c]
    (MONAI ``RandBiasField``; one field for all channels)."""
    from monai.transforms import RandBiasField

    t = RandBiasField(degree=3, coeff_range=(0.0, c), dtype=np.float64, prob=1.0)
    t.set_random_state(seed=seed)
    return np.asarray(t(torch.from_numpy(u)))


def corrupt(image: torch.Tensor, name: str, severity: int, seed: int = 0, index: int = 0) -> torch.Tensor:
    """``image [C, H, W]`` in [-1, 1] → the same shape and range, corrupted at ``severity`` (0 = unchanged).

    ``index``: the image's position in the split (one random draw per image).
    """
    if name not in LEVELS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(NAMES)}")
    if not 0 <= severity <= len(LEVELS[name]):
        raise ValueError(f"severity {severity} of {name}: choose 0..{len(LEVELS[name])}")
    if severity == 0:
        return image.clone()
    p = LEVELS[name][severity - 1]
    u = (image.detach().cpu().double().numpy() + 1) / 2
    rng = _rng(seed, index, name)
    if name == "noise":
        u = gaussian_noise(u, p, rng)
    elif name == "blur":
        u = gaussian_blur(u, p)
    elif name == "jpeg":
        u = jpeg(u, int(p))
    elif name == "contrast":
        u = contrast(u, p)
    elif name == "brightness":
        u = brightness(u, p)
    else:
        u = bias_field(u, p, int(rng.integers(2**31)))
    return torch.from_numpy(np.clip(u, 0, 1) * 2 - 1).to(image.dtype)


def parse_corruptions(text: str) -> list[str]:
    """``all`` or a comma list of :data:`NAMES` → the names, in the given order."""
    names = list(NAMES) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in LEVELS]
    if bad or not names:
        raise ConfigError(f"--corruptions {text!r}: unknown {', '.join(bad) or '(none given)'}; "
                         f"use all or a comma list of {', '.join(NAMES)}")
    return names


def parse_severities(text: str) -> list[int]:
    try:
        levels = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        levels = []
    if not levels or any(not 1 <= s <= len(SEVERITIES) for s in levels):
        raise ConfigError(f"--severities {text!r}: give a comma list of levels in 1..{len(SEVERITIES)}, e.g. 1,3,5")
    return levels
