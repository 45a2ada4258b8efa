"""Volume datasets: the nnU-Net v2 raw layout, NIfTI and DICOM geometry, intensity schemes, the volume cache."""
from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from labeldiff.data.io import DataError
from labeldiff.data.nnunet import Case, Intensity, NnUNetRaw, fit_ct_percentile
from labeldiff.data.slices import VolumeCache
from labeldiff.data.volume_io import is_dicom_series, read_volume

from conftest import DATASETS

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def oblique_affine(spacing=(0.7, 1.3, 3.0), origin=(-90.0, 12.5, 40.0)) -> np.ndarray:
    """A voxel → RAS affine with a rotation about z and anisotropic spacing."""
    c, s = math.cos(0.3), math.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def test_nifti_volume_keeps_values_affine_and_spacing(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(40, 300, (9, 7, 5)).astype(np.float32)  # float HU, nothing quantised
    aff = oblique_affine()
    vol = read_volume(write_nifti(tmp_path / "ct.nii.gz", x, aff))
    np.testing.assert_array_equal(vol.array, x)
    np.testing.assert_allclose(vol.affine, aff)
    np.testing.assert_allclose(vol.spacing, (0.7, 1.3, 3.0))


def test_label_volume_must_hold_integers(tmp_path):
    p = write_nifti(tmp_path / "lab.nii.gz", np.full((3, 3, 3), 0.5, np.float32), np.eye(4))
    with pytest.raises(DataError, match="integers"):
        read_volume(p, np.int64)
    p = write_nifti(tmp_path / "ok.nii.gz", np.full((3, 3, 3), 2.0, np.float32), np.eye(4))
    assert read_volume(p, np.int64).array.dtype == np.int64


def test_unreadable_and_missing_volumes_name_the_file(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a volume")
    with pytest.raises(DataError, match="bad.nii.gz"):
        read_volume(bad)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="not a DICOM series"):
        read_volume(tmp_path / "folder")


# --- DICOM ------------------------------------------------------------------------------------------------------

def write_dicom_series(folder: Path, hu: np.ndarray, spacing=(0.8, 0.6), dz=2.5, origin=(10.0, -20.0, 100.0),
                       slope=1.0, intercept=-1024.0, uid="1.2.3.4") -> list[Path]:
    """Write ``hu[z, row, col]`` as a DICOM CT series (LPS positions, z descending), files in scrambled order."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    order = np.random.default_rng(1).permutation(hu.shape[0])
    for z in order:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        p = folder / f"IM{int(z) * 7 % 11:02d}_{z}.dcm"
        ds = FileDataset(str(p), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", uid, "1.2.3"
        ds.InstanceNumber = int(z) + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] - dz * int(z)]
        ds.PixelSpacing = [spacing[0], spacing[1]]  # row spacing, column spacing
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        stored = np.round((hu[z] - intercept) / slope).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def check_dicom_geometry(folder: Path) -> None:
    """Every file's pixels (with rescale) sit in the volume where its ImagePositionPatient, read with
    pydicom, says, and the in-plane steps are the PixelSpacing along ImageOrientationPatient."""
    import pydicom

    vol = read_volume(folder)
    inv = np.linalg.inv(vol.affine)
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        iop = np.array(ds.ImageOrientationPatient, float)
        row_dir, col_dir = LPS_TO_RAS @ iop[:3], LPS_TO_RAS @ iop[3:]
        dr, dc = (float(v) for v in ds.PixelSpacing)
        np.testing.assert_allclose(vol.affine[:3, 0], row_dir * dc, atol=1e-4)  # array axis 0: along a row
        np.testing.assert_allclose(vol.affine[:3, 1], col_dir * dr, atol=1e-4)
        ijk = inv @ np.r_[LPS_TO_RAS @ np.array(ds.ImagePositionPatient, float), 1.0]
        np.testing.assert_allclose(ijk[:2], 0, atol=1e-3)
        k = int(round(ijk[2]))
        assert abs(ijk[2] - k) < 1e-3
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(vol.array[:, :, k], hu.T)  # [column, row] as NIfTI's x, y


def test_dicom_series_has_the_geometry_pydicom_reports(tmp_path):
    hu = np.random.default_rng(0).integers(-1000, 1500, (6, 5, 7)).astype(np.float32)
    write_dicom_series(tmp_path / "series", hu)
    assert is_dicom_series(tmp_path / "series")
    vol = read_volume(tmp_path / "series")
    assert vol.shape == (7, 5, 6)
    np.testing.assert_allclose(vol.spacing, (0.6, 0.8, 2.5), atol=1e-5)
    check_dicom_geometry(tmp_path / "series")


def test_two_series_in_one_folder_are_refused(tmp_path):
    hu = np.zeros((2, 4, 4), np.float32)
    write_dicom_series(tmp_path / "s", hu, uid="1.1")
    for p in write_dicom_series(tmp_path / "t", hu, uid="2.2"):
        p.rename(tmp_path / "s" / ("b" + p.name))
    with pytest.raises(DataError, match="2 DICOM series"):
        read_volume(tmp_path / "s")


@pytest.mark.slow
@pytest.mark.skipif(not (DATASETS / "ct_abdomen" / "dicom_unlabeled").is_dir(), reason="shared datasets absent")
def test_real_ct_dicom_series_geometry():
    folder = DATASETS / "ct_abdomen" / "dicom_unlabeled"
    vol = read_volume(folder)
    assert vol.shape == (512, 512, 20)
    assert vol.array.min() >= -1024 - 1e-3  # Hounsfield units, not stored values
    check_dicom_geometry(folder)


# --- the nnU-Net v2 raw layout ----------------------------------------------------------------------------------

def make_raw(root: Path, cases=("a", "b"), channels=("T1", "T2"), labels=True, unlabeled=("u",)) -> Path:
    meta = {"channel_names": {str(i): c for i, c in enumerate(channels)},
            "labels": {"background": 0, "tumour": 1, "oedema": 2}, "file_ending": ".nii.gz"}
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for c in cases:
        for i in range(len(channels)):
            write_nifti(root / "imagesTr" / f"{c}_{i:04d}.nii.gz", np.zeros((4, 4, 3), np.float32), np.eye(4))
        if labels:
            write_nifti(root / "labelsTr" / f"{c}.nii.gz", np.zeros((4, 4, 3), np.uint8), np.eye(4))
    for c in unlabeled:
        for i in range(len(channels)):
            write_nifti(root / "imagesUnlabeled" / f"{c}_{i:04d}.nii.gz", np.zeros((4, 4, 3), np.float32), np.eye(4))
    return root


def test_raw_layout_cases_channels_and_class_names(tmp_path):
    raw = NnUNetRaw(make_raw(tmp_path / "Dataset001"))
    assert raw.channels == ["T1", "T2"] and raw.num_classes == 3
    assert raw.class_names == ["background", "tumour", "oedema"]
    tr = raw.cases("train")
    assert [c.name for c in tr] == ["a", "b"]
    assert [p.name for p in tr[0].images] == ["a_0000.nii.gz", "a_0001.nii.gz"] and tr[0].label.name == "a.nii.gz"
    assert [c.name for c in raw.cases("unlabeled")] == ["u"] and raw.cases("unlabeled")[0].label is None
    assert raw.cases("test") == []


def test_raw_layout_errors_say_what_to_fix(tmp_path):
    root = make_raw(tmp_path / "d")
    (root / "imagesTr" / "b_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case 'b' has channel files \[0\].*b_XXXX"):
        NnUNetRaw(root).cases("train")
    root = make_raw(tmp_path / "e")
    (root / "labelsTr" / "a.nii.gz").unlink()
    with pytest.raises(DataError, match="imagesUnlabeled"):
        NnUNetRaw(root).cases("train")
    root = make_raw(tmp_path / "f")
    (root / "imagesTr" / "a_0000.nii.gz").rename(root / "imagesTr" / "a.nii.gz")
    with pytest.raises(DataError, match="CASE_XXXX"):
        NnUNetRaw(root).cases("train")
    (tmp_path / "g").mkdir()
    with pytest.raises(DataError, match="no dataset.json"):
        NnUNetRaw(tmp_path / "g")
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "liver": 2}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="0, 1, ..., K-1"):
        NnUNetRaw(root)


@pytest.mark.skipif(not (DATASETS / "colin27_aal").is_dir(), reason="shared datasets absent")
def test_real_raw_datasets_read():
    colin = NnUNetRaw(DATASETS / "colin27_aal")
    assert colin.num_classes == 10 and colin.class_names[8] == "cerebellum"
    (case,) = colin.cases("train")
    vol, lab = read_volume(case.images[0]), read_volume(case.label, np.int64)
    assert vol.shape == lab.shape == (181, 217, 181)
    assert set(np.unique(lab.array)) == set(range(10))
    ct = NnUNetRaw(DATASETS / "ct_abdomen")
    assert ct.class_names[10] == "esophagus" and [c.name for c in ct.cases("unlabeled")] == ["abdomen_full"]
    (case,) = ct.cases("train")
    assert 10 not in np.unique(read_volume(case.label, np.int64).array)  # the esophagus is absent from the crop


# --- intensities ------------------------------------------------------------------------------------------------

def test_ct_percentile_matches_hand_computed_foreground_statistics(tmp_path):
    rng = np.random.default_rng(0)
    cases = []
    fg_values = []
    for name in ("a", "b"):
        x = rng.normal(0, 400, (10, 10, 4)).astype(np.float32)
        lab = (rng.random((10, 10, 4)) < 0.3).astype(np.uint8)
        img = write_nifti(tmp_path / f"{name}_0000.nii.gz", x, np.eye(4))
        lp = write_nifti(tmp_path / f"{name}.nii.gz", lab, np.eye(4))
        cases.append(Case(name, [img], lp))
        fg_values.append(x[lab > 0])
    fg = np.concatenate(fg_values).astype(np.float64)
    it = fit_ct_percentile(cases)
    lo, hi = np.percentile(fg, [0.5, 99.5])
    assert (it.lo, it.hi) == pytest.approx((lo, hi)) and it.mean == pytest.approx(fg.mean())
    assert it.std == pytest.approx(fg.std()) and it.fitted_on == ["a", "b"]
    x = np.array([-5000.0, 0.0, 5000.0], np.float32)
    np.testing.assert_allclose(it.apply(x), (np.clip(x, lo, hi) - fg.mean()) / fg.std(), rtol=1e-5)
    again = Intensity.from_dict(json.loads(json.dumps(it.to_dict())))  # as stored in the run config
    assert again == it


def test_dataset_percentile_pools_every_voxel_of_the_training_cases(tmp_path):
    """The CT paper's scheme: the 0.5 / 99.5 percentiles of all voxels of all training cases (labels play no
    part), every volume clipped to them and scaled to [-1, 1]; stored and read back unchanged."""
    from labeldiff.data.nnunet import fit_dataset_percentile

    rng = np.random.default_rng(1)
    cases, voxels = [], []
    for name, scale in (("a", 300), ("b", 900)):
        x = rng.normal(0, scale, (10, 10, 4)).astype(np.float32)
        cases.append(Case(name, [write_nifti(tmp_path / f"{name}_0000.nii.gz", x, np.eye(4))], None))
        voxels.append(x.ravel())
    lo, hi = np.percentile(np.concatenate(voxels).astype(np.float64), [0.5, 99.5])
    it = fit_dataset_percentile(cases)
    assert (it.scheme, it.lo, it.hi, it.fitted_on) == ("dataset-percentile", pytest.approx(lo), pytest.approx(hi),
                                                       ["a", "b"])
    x = np.array([-1e4, lo, (lo + hi) / 2, hi, 1e4], np.float32)
    np.testing.assert_allclose(it.apply(x), [-1, -1, 0, 1, 1], atol=1e-5)
    assert Intensity.from_dict(json.loads(json.dumps(it.to_dict()))) == it


def test_the_command_line_offers_every_intensity_scheme():
    from labeldiff.cli.options import INTENSITY_SCHEMES as offered
    from labeldiff.data.nnunet import INTENSITY_SCHEMES

    assert sorted(offered) == sorted(INTENSITY_SCHEMES)


def test_window_and_zscore_schemes():
    w = Intensity("ct-window", lo=-160, hi=240)
    np.testing.assert_allclose(w.apply(np.array([-1000, -160, 40, 240, 3000])), [-1, -1, 0, 1, 1])
    assert Intensity.from_dict(json.loads(json.dumps(w.to_dict()))) == w
    x = np.array([0, 0, 2, 4, 6], np.float32)  # MRI: 0 is background, left out of the statistics
    np.testing.assert_allclose(Intensity("zscore").apply(x)[2:], [-math.sqrt(1.5), 0, math.sqrt(1.5)], rtol=1e-5)
    assert Intensity.named("ct-window", (-160, 240)) == w and Intensity.named("zscore") == Intensity("zscore")
    with pytest.raises(ValueError, match="needs --hu-window"):
        Intensity.named("ct-window")
    with pytest.raises(ValueError, match="ct-window only"):
        Intensity.named("zscore", (-160, 240))
    with pytest.raises(ValueError, match="lo < hi"):
        Intensity("ct-window", lo=100, hi=-100)
    assert Intensity.from_dict(Intensity("none").to_dict()) == Intensity("none")


# --- the volume cache -------------------------------------------------------------------------------------------

def test_cache_decodes_a_volume_once_per_intensity_scheme(tmp_path):
    x = np.arange(6 * 5 * 8, dtype=np.float32).reshape(6, 5, 8)
    p = write_nifti(tmp_path / "v.nii.gz", x, np.eye(4))
    cache = VolumeCache(max_mb=16)
    z = Intensity("zscore")
    for _ in range(3):
        np.testing.assert_array_equal(cache.get(p).array, x)
        np.testing.assert_allclose(cache.get(p, intensity=z).array, z.apply(x))  # the normalised copy
    assert cache.reads == {str(p): 2} and len(cache.items) == 2


def test_cache_bound_evicts_the_least_recently_used(tmp_path):
    paths = [write_nifti(tmp_path / f"v{i}.nii.gz", np.zeros((64, 64, 64), np.float32), np.eye(4)) for i in range(3)]
    cache = VolumeCache(max_mb=2)  # each volume is 1 MiB: two fit
    for p in paths[:2]:
        cache.get(p)
    cache.get(paths[0])  # v0 is now the most recent
    cache.get(paths[2])  # evicts v1
    assert cache.bytes <= 2 * 2**20
    cache.get(paths[0])
    cache.get(paths[1])
    assert cache.reads[str(paths[0])] == 1 and cache.reads[str(paths[1])] == 2


def test_canonical_frame_keeps_every_voxel_where_it_is():
    from labeldiff.data.geometry import canonical, from_canonical
    from labeldiff.data.volume_io import Volume

    x = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    aff = np.zeros((4, 4))
    aff[:3, :3] = [[0, 0, -2.0], [-1.0, 0, 0], [0, 3.0, 0]]  # axes permuted and flipped (LPS-like storage)
    aff[:3, 3], aff[3, 3] = (10, 20, 30), 1
    vol = Volume(x, aff)
    can, back = canonical(vol)
    assert can.shape == (7, 5, 6) and np.all(np.diag(can.affine)[:3] > 0)  # RAS: each axis along +x, +y, +z
    inv = np.linalg.inv(can.affine)
    for ijk in [(0, 0, 0), (4, 5, 6), (2, 1, 3)]:
        world = aff @ np.r_[ijk, 1.0]
        j = np.round(inv @ world).astype(int)[:3]
        assert can.array[tuple(j)] == x[ijk]
    np.testing.assert_array_equal(from_canonical(can.array, back), x)
    np.testing.assert_allclose(sorted(can.spacing), sorted(vol.spacing))


def test_dicom_and_its_nifti_export_give_the_same_canonical_slices(tmp_path):
    """A series stored LPS and the same scan saved as NIfTI in another voxel order slice identically."""
    from labeldiff.data.geometry import canonical

    hu = np.random.default_rng(2).integers(-1000, 1500, (5, 6, 7)).astype(np.float32)
    write_dicom_series(tmp_path / "series", hu)
    dcm = read_volume(tmp_path / "series")
    flipped = np.ascontiguousarray(dcm.array[::-1, :, ::-1])  # the same voxels, stored in another order
    aff = dcm.affine.copy()
    aff[:3, 0], aff[:3, 2] = -dcm.affine[:3, 0], -dcm.affine[:3, 2]
    aff[:3, 3] = dcm.affine[:3, 3] + dcm.affine[:3, 0] * (dcm.shape[0] - 1) + dcm.affine[:3, 2] * (dcm.shape[2] - 1)
    nii = read_volume(write_nifti(tmp_path / "same.nii.gz", flipped, aff))
    a, b = canonical(dcm)[0], canonical(nii)[0]
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
