"""The pixel-MLP ensemble probe: features, ensemble, streamed training, save/load, memory."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model, tiny_run, write_labeled_dataset

from labeldiff.bench.probe_memory import LazyImages, bench_probe_memory, bench_probe_memory_cli
from labeldiff.config import CorruptionConfig, DataConfig
from labeldiff.corruption.gaussian import make_scheduler
from labeldiff.data.datasets import ScaledImages
from labeldiff.data.folders import LabeledFolder
from labeldiff.evaluate.metrics import confusion_stats, iou_from_stats
from labeldiff.models.unet import build_unet
from labeldiff.models.probe import (FeatureExtractor, FeatureSpec, PixelEnsemble, default_blocks, default_spec,
                                    hidden_sizes, load_probe, save_probe)
from labeldiff.transfer.probe import (REF_WARMUP_EPOCHS, PixelCache, fit_pixels, materialized_train_probe,
                                      predict_probe, train_probe)

TINY_SPEC = FeatureSpec(blocks=(0, 1), timesteps=(0,))  # both up blocks of the tiny UNet: 16 + 8 features


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(tiny_model(3), out_channels=3)


def sign_images(n: int, seed: int, size: int = 32) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Images with a smooth random pattern; channel 0 is ±0.8 and the mask is channel 0 > 0."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(n, 3, size // 4, size // 4, generator=g), size=(size, size), mode="bilinear")
    x[:, 0] = 0.8 * x[:, 0].sign()
    x = x.clamp(-1, 1)
    return list(x), [(xi[0] > 0).long() for xi in x]


def iou(extractor, ensemble, images, masks, k=2) -> np.ndarray:
    stats = sum(confusion_stats(predict_probe(extractor, ensemble, x)[0].numpy(), m.numpy(), k)
                for x, m in zip(images, masks))
    return iou_from_stats(stats)


def test_default_spec():
    assert default_blocks(3) == (1, 2)
    assert default_blocks(18) == (8, 12)  # MDM App. B on guided-diffusion's 18 decoder blocks
    assert default_blocks(2) == (1,)
    assert default_spec("mdm", 3) == FeatureSpec((1, 2), (50,))
    assert default_spec("ddpm", 3).timesteps == (50, 150, 250)
    assert default_spec("mae", 3).timesteps == (0,)
    assert default_spec("hybrid", 3).timesteps == (0,)
    assert hidden_sizes(29) == (128, 32) and hidden_sizes(30) == (256, 128)


def test_features_shapes_and_fixed_noise(unet):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    spec = FeatureSpec(blocks=(0, 1), timesteps=(50, 150))
    sched = make_scheduler(CorruptionConfig())
    ex = FeatureExtractor(unet, spec, sched, noise_seed=0)
    assert ex.num_features == 2 * (16 + 8)
    f = ex(images)
    assert f.shape == (2, ex.num_features, 32, 32) and f.dtype == torch.float32
    assert torch.equal(f, ex(images))  # same image, same noise
    assert torch.equal(ex(images, torch.float16), f.half())  # what the disk cache stores, made directly
    torch.testing.assert_close(ex(images[1:]), f[1:], atol=1e-5, rtol=1e-5)  # noise does not depend on batch position
    assert not torch.allclose(FeatureExtractor(unet, spec, sched, noise_seed=1)(images), f, atol=1e-3)
    # no scheduler (MDM: the clean image with t): no noise at all, so the noise seed is irrelevant
    clean = FeatureExtractor(unet, FeatureSpec((1,), (50,)), None, noise_seed=0)(images)
    assert torch.equal(clean, FeatureExtractor(unet, FeatureSpec((1,), (50,)), None, noise_seed=7)(images))
    assert clean.shape == (2, 8, 32, 32)
    with pytest.raises(ValueError, match="multiple of 2"):
        ex(torch.zeros(1, 3, 31, 32))
    with pytest.raises(ValueError, match="blocks must be in 0..1"):
        FeatureExtractor(unet, FeatureSpec((2,), (0,)))


def test_hooks_removed(unet):
    ex = FeatureExtractor(unet, TINY_SPEC)
    ex(torch.zeros(1, 3, 32, 32))
    assert all(len(b._forward_hooks) == 0 for b in unet.up_blocks)
    with pytest.raises(RuntimeError):  # fails inside the UNet (2 channels instead of 3), hooks still go
        ex(torch.zeros(1, 2, 32, 32))
    assert all(len(b._forward_hooks) == 0 for b in unet.up_blocks)


def test_streamed_probe_learns_and_writes_a_float16_cache(unet, tmp_path):
    images, masks = sign_images(6, seed=0)
    test_images, test_masks = sign_images(3, seed=1)
    ex = FeatureExtractor(unet, TINY_SPEC)
    ens = train_probe(ex, images, masks, num_classes=2, members=3, batch_pixels=512, max_epochs=15, patience=3,
                      seed=0, cache_dir=tmp_path / "cache", progress=False)
    assert (iou(ex, ens, test_images, test_masks) > 0.9).all()
    files = sorted((tmp_path / "cache").glob("*.features.f16"))
    assert len(files) == 6 and all(f.stat().st_size == 32 * 32 * ex.num_features * 2 for f in files)
    # the cache holds each image's features (pixels shuffled) and its labels
    rows = np.fromfile(files[0], dtype=np.float16).reshape(-1, ex.num_features)
    want = ex(images[0][None])[0].reshape(ex.num_features, -1).T.half().numpy()
    np.testing.assert_array_equal(np.sort(rows, axis=0), np.sort(want, axis=0))
    labels = np.fromfile(tmp_path / "cache" / "000000.labels.i16", dtype=np.int16)
    assert np.bincount(labels, minlength=2).tolist() == np.bincount(masks[0].numpy().ravel(), minlength=2).tolist()

    labels_map, probs, unc = predict_probe(ex, ens, test_images[0])
    assert labels_map.shape == (32, 32) and probs.shape == (2, 32, 32) and unc.shape == (32, 32)
    torch.testing.assert_close(probs.sum(0), torch.ones(32, 32))
    assert unc.min() >= 0 and unc.max() <= math.log(2) + 1e-6


def test_materialized_probe_learns_too(unet):
    images, masks = sign_images(6, seed=0)
    test_images, test_masks = sign_images(3, seed=1)
    ex = FeatureExtractor(unet, TINY_SPEC)
    ens = materialized_train_probe(ex, images, masks, num_classes=2, members=2, batch_pixels=512, max_epochs=15,
                                   seed=0, progress=False)
    assert (iou(ex, ens, test_images, test_masks) > 0.9).all()


def test_uncertainty_is_higher_where_labels_are_ambiguous():
    """Features x ∈ [−2, −1] are class 0, [1, 2] class 1, and [−0.2, 0.2] a coin flip."""
    g = torch.Generator().manual_seed(0)
    n = 3000
    x = torch.cat([-1 - torch.rand(n, generator=g), 1 + torch.rand(n, generator=g),
                   0.4 * torch.rand(n, generator=g) - 0.2])
    y = torch.cat([torch.zeros(n), torch.ones(n), torch.randint(0, 2, (n,), generator=g)]).long()
    feats = torch.stack([x, torch.randn(3 * n, generator=g)], 1)
    ens = fit_pixels(feats, y, num_classes=2, members=4, batch_pixels=256, max_epochs=20, patience=3, progress=False)
    probe = torch.tensor([[-1.5, 0.0], [1.5, 0.0], [0.0, 0.0]])
    unc = ens.uncertainty(probe)
    assert (unc >= 0).all() and (unc <= math.log(2) + 1e-6).all()
    assert unc[2] > 0.6 and unc[2] > unc[0] + 0.3 and unc[2] > unc[1] + 0.3
    dis = ens.disagreement(probe)
    assert ((dis >= 0) & (dis <= 1)).all() and dis[0] == 0 and dis[1] == 0
    # early stopping on the epoch training loss: stop only after `patience` epochs without a new best
    for h in ens.history:
        assert len(h) == 20 or min(h[-3:]) >= min(h[:-3])


def test_members_are_seeded_independently():
    a, b = PixelEnsemble(5, 3, members=2, seed=0), PixelEnsemble(5, 3, members=2, seed=0)
    w = [m.layers[0].weight for m in a.members]
    assert torch.equal(w[0], b.members[0].layers[0].weight) and not torch.equal(w[0], w[1])
    assert not torch.equal(w[0], PixelEnsemble(5, 3, members=1, seed=1).members[0].layers[0].weight)


def test_save_load_round_trip(unet, tmp_path):
    images, masks = sign_images(2, seed=0)
    ex = FeatureExtractor(unet, TINY_SPEC, noise_seed=3)
    ens = train_probe(ex, images, masks, num_classes=2, members=2, max_epochs=2, progress=False)
    save_probe(tmp_path / "probe", ens, ex.spec, noise_seed=3)
    loaded, spec, meta = load_probe(tmp_path / "probe")
    assert spec == TINY_SPEC and meta["noise_seed"] == 3 and meta["members"] == 2 and meta["hidden"] == [128, 32]
    assert meta["num_features"] == ex.num_features == 24
    for a, b in zip(predict_probe(ex, ens, images[1]), predict_probe(ex, loaded, images[1])):
        assert torch.equal(a, b)
    meta["num_features"] = 25  # weights no longer fit the description
    (tmp_path / "probe" / "probe.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="wrong shape"):
        load_probe(tmp_path / "probe")
    meta.update(num_features=24, members=3)
    (tmp_path / "probe" / "probe.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="16 missing"):
        load_probe(tmp_path / "probe")


def test_streamed_memory_stays_flat(unet, tmp_path):
    """Each approach in its own process, 96 features per pixel (24 per timestep × 4 timesteps): the
    streamed trainer on 4 and on 32 labeled 64² images, whose peak must not grow with the 28·64²·96·4 B
    = 42 MB the reference's matrix grows by; the reference on 32, whose training must cost that matrix.
    Measured here: materialized +43 MB from 4 to 32 images, streamed ±0.5 MB (peaks of repeated runs
    agree to ~0.5 MB, see labeldiff.bench.probe_memory); an unbounded shuffle buffer would add ~8 MB.
    (The reference on 4 images, a fourth child process of ~8 s, would only repeat the matrix check.)"""
    root = write_labeled_dataset(tmp_path / "data", n=33, k=3, hw=(64, 64), n_train=32)
    ds = LabeledFolder(root)
    loader = ScaledImages(DataConfig(path=str(root), size=64, mode="resize", channels=3, cache_mb=0))
    train, test = ds.samples(ds.stems("train")), ds.samples(ds.stems("test"))
    spec = FeatureSpec((0, 1), (0, 10, 20, 30))
    runs = {}
    for n, approaches in ((4, ("streamed",)), (32, ("materialized", "streamed"))):
        runs[n] = bench_probe_memory(unet, LazyImages(train[:n], loader), LazyImages(train[:n], loader, "mask", 3),
                                     LazyImages(test, loader), LazyImages(test, loader, "mask", 3), spec, None, 3,
                                     seed=0, members=1, max_epochs=1, patience=1, approaches=approaches)
        assert runs[n]["num_features"] == 96 and runs[n]["n_pixels"] == n * 64 * 64
    growth = (32 - 4) * 64 * 64 * 96 * 4 / 2**20
    peaks = {n: runs[n]["streamed"]["peak_rss_mb"] for n in (4, 32)}
    assert peaks[32] - peaks[4] < 0.1 * growth, peaks
    matrix_32 = 32 * 64 * 64 * 96 * 4 / 2**20
    train_mb = {a: runs[32][a]["train_rss_mb"] for a in ("materialized", "streamed")}
    assert train_mb["materialized"] > train_mb["streamed"] + 0.6 * matrix_32, train_mb
    assert runs[32]["rss_ratio"] > 1 and runs[32]["train_rss_ratio"] > 1.5


def test_bench_cli_on_a_pretrained_run(tmp_path, capsys):
    from labeldiff.pretrain.run import run_pretrain

    data = write_labeled_dataset(tmp_path / "data", n=4, k=3, hw=(32, 32), n_train=3)
    run_pretrain(tiny_run(data), tmp_path / "pre")
    r = bench_probe_memory_cli(str(tmp_path / "pre"), str(data), labels=2, seed=0, size=32, members=2,
                               max_epochs=2, approaches=("streamed",))
    assert r["n_images"] == 2 and r["n_pixels"] == 2 * 32 * 32
    assert r["num_features"] == 8 * 3 and r["streamed"]["peak_rss_mb"] > r["streamed"]["start_rss_mb"] > 0
    assert 0 <= r["streamed"]["miou"] <= 1 and r["streamed"]["epochs"] == [2, 2]
    out = capsys.readouterr().out
    assert "streamed" in out and "ddpm" in out


def test_cache_epoch_yields_every_pixel_once_with_its_label(tmp_path):
    """An epoch of the disk cache is a permutation of all labeled pixels (sizes not multiples of the
    chunk or batch size), each row with its own label, and batches mix several images."""
    sizes = [(10, 30), (25, 40), (7, 11)]  # 300, 1000 and 77 pixels
    cache = PixelCache(tmp_path, num_features=2, batch_pixels=128)
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate(sizes):
        ids = torch.arange(h * w, dtype=torch.float32).reshape(h, w)
        feats = torch.stack([torch.full((h, w), float(i)), ids])  # [F=2, H, W]: (image, pixel) exactly in float16
        cache.add(feats, (ids.long() * 7 + i) % 5, g)
    seen, mixed = [], 0
    for x, y in cache.batches(torch.Generator().manual_seed(1)):
        image, pixel = x[:, 0].long(), x[:, 1].long()
        assert torch.equal(y, (pixel * 7 + image) % 5)  # the label travelled with its row
        seen += list(zip(image.tolist(), pixel.tolist()))
        mixed = max(mixed, len(set(image.tolist())))
    assert sorted(seen) == [(i, p) for i, (h, w) in enumerate(sizes) for p in range(h * w)]
    assert mixed == 3


def test_reference_iteration_rule_stops_after_the_warmup_epochs():
    # unlearnable pixels (random labels): the epoch loss keeps wobbling, so with a huge epoch patience
    # only the per-iteration rule can stop a member, and never before epoch REF_WARMUP_EPOCHS + 1
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4096, 8, generator=g), torch.randint(0, 2, (4096,), generator=g)
    kwargs = dict(members=2, batch_pixels=64, max_epochs=20, patience=100, progress=False)
    epochs_only = fit_pixels(x, y, 2, **kwargs)
    assert [len(h) for h in epochs_only.history] == [20, 20]
    eager = fit_pixels(x, y, 2, stop_iters=1, **kwargs)
    assert [len(h) for h in eager.history] == [REF_WARMUP_EPOCHS + 1] * 2  # the first batch of epoch 5 not beating its predecessor
    ref = fit_pixels(x, y, 2, stop_iters=10, **kwargs)
    assert all(REF_WARMUP_EPOCHS + 1 <= len(h) < 20 for h in ref.history)
