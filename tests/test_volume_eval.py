"""3D metrics against hand-computed values, and volume prediction back on the input grid."""
from __future__ import annotations

import math

import numpy as np
import pytest

from labeldiff.config import DataConfig
from labeldiff.evaluate.volume import volume_scores


def blank(shape=(12, 12, 12)) -> np.ndarray:
    return np.zeros(shape, np.int64)


def only(rows, c):
    return next(r for r in rows if r["class"] == c)


def test_identical_cube_scores_perfectly():
    t = blank()
    t[2:6, 2:6, 2:6] = 1
    r = only(volume_scores(t.copy(), t, 2, (1.0, 1.0, 1.0)), 1)
    assert (r["dice"], r["hd95_mm"], r["nsd"]) == (1.0, 0.0, 1.0)


def test_shift_is_measured_in_mm_along_the_anisotropic_axis():
    t, p = blank(), blank()
    t[3, 3, 3] = 1
    p[3, 3, 5] = 1  # 2 voxels along z, 3 mm each: 6 mm
    r = only(volume_scores(p, t, 2, (1.0, 1.0, 3.0)), 1)
    assert r["dice"] == 0.0 and r["hd95_mm"] == pytest.approx(6.0)
    assert r["nsd"] == 0.0  # 6 mm is outside the 2 mm tolerance
    assert only(volume_scores(p, t, 2, (1.0, 1.0, 3.0), tolerance_mm=7.0), 1)["nsd"] == 1.0
    p2 = blank()
    p2[5, 3, 3] = 1  # 2 voxels along x at 0.5 mm: 1 mm
    assert only(volume_scores(p2, t, 2, (0.5, 1.0, 3.0)), 1)["hd95_mm"] == pytest.approx(1.0)


def test_hd95_is_the_95th_percentile_not_the_maximum():
    t, p = blank(), blank()
    t[1, 5, 5] = 1
    p[1, 5, 5] = p[11, 5, 5] = 1  # an outlier 10 mm away
    r = only(volume_scores(p, t, 2, (1.0, 1.0, 1.0)), 1)
    # directed pred → truth distances {0, 10}: 95th percentile 9.5 (linear); truth → pred {0}
    assert r["hd95_mm"] == pytest.approx(9.5)
    # surface Dice: boundary points within 2 mm over all boundary points = (1 + 1) / (2 + 1)
    assert r["nsd"] == pytest.approx(2 / 3)
    assert r["dice"] == pytest.approx(2 * 1 / (2 + 1))


def test_one_pass_surface_metrics_equal_monais_own_functions():
    """HD95 and NSD come from one pass of MONAI's edge distances; they must equal what
    compute_hausdorff_distance(percentile=95) and compute_surface_dice give on irregular shapes."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice
    from scipy.ndimage import gaussian_filter

    from labeldiff.evaluate.volume import surface_metrics

    rng = np.random.default_rng(3)
    spacing = (0.7, 1.2, 2.5)
    for _ in range(3):
        p = gaussian_filter(rng.normal(size=(20, 18, 14)), 2) > 0.05
        t = gaussian_filter(rng.normal(size=(20, 18, 14)), 2) > 0.05
        hd, nsd = surface_metrics(p, t, spacing, tolerance_mm=1.5)
        pt, tt = (torch.from_numpy(a.astype(np.float32))[None, None] for a in (p, t))
        ref_hd = compute_hausdorff_distance(pt, tt, include_background=True, percentile=95, spacing=list(spacing))
        ref_nsd = compute_surface_dice(pt, tt, class_thresholds=[1.5], include_background=True, spacing=list(spacing))
        assert hd == pytest.approx(float(ref_hd), rel=1e-5) and hd > 0
        assert nsd == pytest.approx(float(ref_nsd), rel=1e-5) and 0 < nsd < 1


def test_partial_overlap_dice():
    t, p = blank(), blank()
    t[2:6, 2:6, 2:6] = 1
    p[2:6, 2:6, 3:7] = 1
    assert only(volume_scores(p, t, 2, (1.0, 1.0, 1.0)), 1)["dice"] == pytest.approx(2 * 48 / 128)


def test_absent_and_one_sided_classes():
    t, p = blank(), blank()
    t[2:4, 2:4, 2:4] = 1
    p[2:4, 2:4, 2:4] = 1
    t[8:10, 8:10, 8:10] = 3  # class 3 in the truth only; class 2 nowhere
    rows = volume_scores(p, t, 4, (1.0, 1.0, 1.0), class_names=["bg", "liver", "spleen", "aorta"])
    absent = only(rows, 2)
    assert absent["absent"] and all(math.isnan(absent[m]) for m in ("dice", "hd95_mm", "nsd"))
    missed = only(rows, 3)
    assert missed["name"] == "aorta" and not missed["absent"]
    assert missed["dice"] == 0.0 and missed["nsd"] == 0.0
    assert math.isnan(missed["hd95_mm"]) and missed["hd95_undefined"]
    assert [r["class"] for r in rows] == [1, 2, 3]


def test_shape_and_spacing_are_checked():
    with pytest.raises(ValueError, match="differ in shape"):
        volume_scores(blank((4, 4, 4)), blank((4, 4, 5)), 2, (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        volume_scores(blank(), blank(), 2, (1, 1))


# --- volume prediction: back on the input grid ------------------------------------------------------------------

def threshold_net():
    """A real 1×1 convolution with fixed weights: class 1 where the intensity is above 0."""
    import torch

    conv = torch.nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([-10.0, 10.0]).view(2, 1, 1, 1))
        conv.bias.zero_()
    return conv.eval()


def oblique_affine():
    c, s = math.cos(0.4), math.sin(0.4)
    a = np.eye(4)
    a[:3, :3] = np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]]) @ np.diag([0.8, 1.7, 3.0])
    a[:3, 3] = (-91.0, 7.5, 33.0)
    return a


def lps_permuted_affine():
    a = np.zeros((4, 4))
    a[:3, :3] = [[0, -0.8, 0], [0, 0, -1.7], [3.0, 0, 0]]  # array axes = (S, L→R reversed, A→P): nothing RAS
    a[:3, 3], a[3, 3] = (50.0, -20.0, 7.0), 1
    return a


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_predict_volumes_round_trip_through_the_canonical_frame(tmp_path, axis):
    """labeldiff's predict path on a NIfTI stored in a non-RAS voxel order: slices are taken in the RAS
    frame, and the label volume comes back in the input's own voxel order, affine and header."""
    import nibabel as nib

    from labeldiff.data.geometry import canonical, from_canonical
    from labeldiff.data.volume_io import read_volume
    from labeldiff.evaluate.volume import predict_volume, write_label_nifti

    x = np.random.default_rng(axis).normal(0, 1, (9, 13, 7)).astype(np.float32)
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(x, lps_permuted_affine()), str(src))
    can, back = canonical(read_volume(src))
    side = max(s for i, s in enumerate(can.shape) if i != axis)
    labels = predict_volume(threshold_net(), DataConfig(mode="resize", size=side, channels=1), [can], axis=axis)
    labels = from_canonical(labels, back)
    np.testing.assert_array_equal(labels, (x > 0).astype(np.int16))
    out = write_label_nifti(labels, read_volume(src).affine, tmp_path / "p.nii.gz", like=nib.load(str(src)))
    np.testing.assert_allclose(nib.load(str(out)).affine, lps_permuted_affine(), atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_volume_prediction_round_trip_keeps_the_exact_geometry(tmp_path, axis):
    import nibabel as nib

    from labeldiff.config import DataConfig
    from labeldiff.data.volume_io import read_volume
    from labeldiff.evaluate.volume import predict_volume, write_label_nifti

    rng = np.random.default_rng(axis)
    x = rng.normal(0, 1, (13, 9, 7)).astype(np.float32)  # no two axes alike: any swap shows
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(x, oblique_affine()), str(src))
    vol = read_volume(src)
    side = max(s for i, s in enumerate(x.shape) if i != axis)
    cfg = DataConfig(mode="resize", size=side, channels=1)  # the padded square: no resize, so exact
    labels = predict_volume(threshold_net(), cfg, [vol], axis=axis)
    np.testing.assert_array_equal(labels, (x > 0).astype(np.int16))  # every voxel where it came from
    out = write_label_nifti(labels, vol.affine, tmp_path / "pred.nii.gz", like=nib.load(str(src)))
    back = nib.load(str(out))
    assert back.shape == x.shape and back.get_data_dtype() == np.uint8
    np.testing.assert_allclose(back.affine, oblique_affine(), atol=1e-5)
    np.testing.assert_allclose(back.header.get_zooms(), (0.8, 1.7, 3.0), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels)


def test_volume_prediction_through_a_resize_stays_on_the_grid():
    from labeldiff.config import DataConfig
    from labeldiff.data.volume_io import Volume
    from labeldiff.evaluate.volume import predict_volume

    zz, yy, xx = np.meshgrid(np.arange(40), np.arange(30), np.arange(6), indexing="ij")
    x = (((zz - 20) ** 2 + (yy - 12) ** 2) < 100).astype(np.float32) * 2 - 1  # a smooth cylinder along axis 2
    labels = predict_volume(threshold_net(), DataConfig(mode="resize", size=16, channels=1), [Volume(x, np.eye(4))],
                            axis=2)
    assert labels.shape == x.shape
    assert (labels == (x > 0)).mean() > 0.97  # resized 40² → 16² → 40²: only boundary voxels may move


def test_predicting_only_a_slab_gives_its_slices_and_leaves_the_rest_empty():
    """only=(first, last): those slices exactly as a whole-volume prediction has them; every other slice 0."""
    from labeldiff.config import DataConfig
    from labeldiff.data.volume_io import Volume
    from labeldiff.evaluate.volume import predict_volume

    rng = np.random.default_rng(0)
    vol = [Volume(rng.uniform(-1, 1, (9, 16, 7)).astype(np.float32), np.eye(4))]
    cfg = DataConfig(mode="resize", size=16, channels=1)
    whole = predict_volume(threshold_net(), cfg, vol, axis=0)
    part = predict_volume(threshold_net(), cfg, vol, axis=0, only=(2, 5))
    assert whole[2:6].any() and np.array_equal(part[2:6], whole[2:6])
    assert not part[:2].any() and not part[6:].any()


def test_slices_predicted_in_batches_get_their_own_labels():
    """A real UNet (GroupNorm, so a slice's output cannot depend on its batch) on 7 slices: batches of 3
    (the last one short) and of 8 give each slice the labels it gets alone, and batched logits equal the
    stacked logits of single slices; a per-image network_input is refused for a batch."""
    import pytest
    import torch

    from conftest import tiny_model
    from labeldiff.config import DataConfig
    from labeldiff.data.volume_io import Volume
    from labeldiff.evaluate.predict import predict_logits
    from labeldiff.evaluate.volume import predict_volume
    from labeldiff.models.unet import SegmentationNet

    torch.manual_seed(0)
    net = SegmentationNet(tiny_model(1), num_classes=3, head_hidden=8).eval()
    with torch.no_grad():  # weights large enough that the argmax follows the image, not one class
        for p in net.parameters():
            p.normal_(0, 0.5)
    zz, yy, xx = np.meshgrid(np.arange(7), np.arange(20), np.arange(24), indexing="ij")
    x = np.sin(yy / 3.0 + zz) * np.cos(xx / 4.0 - zz)  # differs from slice to slice along axis 0
    vol = [Volume(x.astype(np.float32), np.eye(4))]
    cfg = DataConfig(mode="resize", size=16, channels=1)
    alone = predict_volume(net, cfg, vol, axis=0, batch_size=1)
    assert len(np.unique(alone)) > 1 and not all(np.array_equal(alone[0], alone[i]) for i in range(7))
    for b in (3, 8):
        assert np.array_equal(predict_volume(net, cfg, vol, axis=0, batch_size=b), alone), b
    images = torch.from_numpy(x[:4, None].astype(np.float32))
    singles = torch.stack([predict_logits(net, im, cfg) for im in images])
    scale = float(singles.abs().max())  # float32 sums in another order for another batch size: ~1e-4 of it
    torch.testing.assert_close(predict_logits(net, images, cfg), singles, atol=1e-3 * scale, rtol=2e-3)
    with pytest.raises(ValueError, match="one image"):
        predict_logits(net, images, cfg, network_input=lambda im: im)


def test_prediction_sees_the_slices_training_saw(tmp_path):
    """predict_volume's input for a slice is the PNG volume_to_slices wrote for it, read as training
    reads it (up to 8-bit quantisation): same rotation, padding and intensities."""
    import nibabel as nib

    from labeldiff.data.geometry import to_display
    from labeldiff.data.io import read_image
    from labeldiff.data.nnunet import Intensity
    from labeldiff.data.volumes import volume_to_slices

    x = np.random.default_rng(0).normal(100, 40, (11, 8, 5)).astype(np.float32)
    src = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(x, oblique_affine()), str(src))
    stems = volume_to_slices(src, tmp_path / "slices", axis=2)
    normalised = Intensity("percentile").apply(x)
    for i, stem in enumerate(stems):
        png = read_image(tmp_path / "slices" / "images" / f"{stem}.png", 1)[0]
        np.testing.assert_allclose(to_display(normalised[:, :, i], -1.0), png, atol=1 / 255 + 1e-6)


def test_predict_feeds_the_network_exactly_what_training_reads(tmp_path, monkeypatch):
    """The image the volume predictor gives the network for a slice equals the training sample of that
    slice (Sample.read_image of a VolumeFolder), under a scheme whose lowest value is not -1 (z-score):
    same frame, intensities and padding."""
    import json

    import nibabel as nib
    import torch

    from labeldiff.config import DataConfig
    from labeldiff.data.folders import VolumeFolder
    from labeldiff.data.nnunet import Intensity
    from labeldiff.data.slices import VolumeCache
    from labeldiff.evaluate.volume import predict_case

    cache = VolumeCache(max_mb=64)
    monkeypatch.setattr("labeldiff.data.slices.VOLUMES", cache)
    monkeypatch.setattr("labeldiff.data.folders.VOLUMES", cache)
    root = tmp_path / "Dataset008"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "a": 1}}))
    x = np.random.default_rng(3).normal(50, 20, (12, 7, 5)).astype(np.float32)  # 12 × 7 slices: padded
    nib.save(nib.Nifti1Image(x, lps_permuted_affine()), str(root / "imagesTr" / "c_0000.nii.gz"))
    nib.save(nib.Nifti1Image((x > 50).astype(np.uint8), lps_permuted_affine()), str(root / "labelsTr" / "c.nii.gz"))
    z = Intensity("zscore")
    ds = VolumeFolder(root, axis=1, intensity=z)
    net = threshold_net()
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.extend(x.clone() for x in args[0]))  # a batch of slices
    side = ds.samples([next(iter(ds.refs))])[0].size()[0]  # the padded square: no resize
    predict_case(net, DataConfig(mode="resize", size=side, channels=1), [root / "imagesTr" / "c_0000.nii.gz"],
                 z, axis=1)
    stems = sorted(ds.refs)
    assert len(seen) == len(stems)
    for stem, image in zip(stems, seen):
        trained = torch.from_numpy(ds.samples([stem])[0].read_image(1))
        torch.testing.assert_close(image, trained)
    assert float(seen[0].min()) < -1.2  # z-scored: the padding is the volume's lowest value, not -1


# --- optional resampling to a target spacing --------------------------------------------------------------------

def test_resampling_keeps_every_voxel_centre_in_place_and_labels_come_back_exactly():
    """MONAI's Spacing to half the voxel size (oblique, anisotropic): the geometry labeldiff computes from
    the header alone is the one the resampler makes, an input voxel centre keeps its position in mm
    (voxel i → 2i), and labels resampled (nearest) and put back give exactly the input."""
    from labeldiff.data.geometry import resample, resample_labels_to, resampled_geometry
    from labeldiff.data.volume_io import Volume

    rng = np.random.default_rng(5)
    lab = rng.integers(0, 4, (7, 5, 4)).astype(np.int16)
    vol = Volume(lab, oblique_affine())
    target = (0.4, 0.85, 1.5)  # half of (0.8, 1.7, 3.0)
    fine = resample(vol, target, label=True)
    assert fine.shape == (13, 9, 7) == resampled_geometry(vol.shape, vol.affine, target)[0]
    np.testing.assert_allclose(fine.affine, resampled_geometry(vol.shape, vol.affine, target)[1], atol=1e-6)
    np.testing.assert_allclose(fine.spacing, target, atol=1e-6)
    np.testing.assert_allclose(fine.affine @ [6, 4, 2, 1], vol.affine @ [3, 2, 1, 1], atol=1e-6)
    np.testing.assert_array_equal(fine.array[::2, ::2, ::2], lab)
    # nearest, not interpolated-and-rounded: every new voxel takes the label of one of its coarse neighbours
    idx = np.indices(fine.shape)
    near = [lab[tuple((idx[d] + o[d]) // 2 for d in range(3))] for o in np.ndindex(2, 2, 2)]
    assert (np.stack(near) == fine.array).any(axis=0).all()
    np.testing.assert_array_equal(resample_labels_to(fine.array, fine.affine, vol.shape, vol.affine), lab)


def test_slab_on_grid_by_hand():
    """Slices 4..9 of a 1.5 mm grid span z ∈ [5.25, 14.25) mm from the first centre; the 3 mm slices
    whose centres (0, 3, 6, ...) lie there are 2..4."""
    from labeldiff.data.geometry import slab_on_grid

    fine, coarse = np.diag([1.0, 1.0, 1.5, 1.0]), np.diag([1.0, 1.0, 3.0, 1.0])
    assert slab_on_grid(4, 9, 2, fine, coarse, 10) == (2, 4)
    # and back: fine centres in [4.5, 13.5) mm, 3..8 (one on an edge belongs to the slice above it)
    assert slab_on_grid(2, 4, 2, coarse, fine, 19) == (3, 8)


def test_prediction_on_a_resampled_grid_comes_back_on_the_input_grid(tmp_path):
    """predict_case with data.spacing: the volume is resampled (half the voxel size of an oblique,
    anisotropic NIfTI), predicted there slice by slice, and the labels come back voxel for voxel on the
    input's grid (a threshold net is exact: original centres are samples of the finer grid)."""
    import nibabel as nib

    from labeldiff.data.geometry import from_canonical
    from labeldiff.data.nnunet import Intensity
    from labeldiff.evaluate.volume import predict_case

    x = np.random.default_rng(1).normal(0, 1, (9, 6, 5)).astype(np.float32)
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(x, oblique_affine()), str(src))
    cfg = DataConfig(mode="resize", size=17, channels=1, spacing=[0.4, 0.85, 1.5])  # the 17 × 11 slices, padded
    vols, labels, back, affine = predict_case(threshold_net(), cfg, [src], Intensity("none"), axis=2)
    assert vols[0].shape == labels.shape == x.shape
    np.testing.assert_array_equal(from_canonical(labels, back), (x > 0).astype(np.int16))
    np.testing.assert_allclose(affine, oblique_affine())
