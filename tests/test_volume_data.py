"""Volume datasets as slices: lazy, float, decoded once; fine-tuning, pretraining and predicting on them."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from labeldiff.cli import main
from labeldiff.config import DataConfig
from labeldiff.data.datasets import StepBatches
from labeldiff.data.folders import VolumeFolder, open_labeled, unlabeled_samples
from labeldiff.data.io import DataError
from labeldiff.data.slices import VolumeCache
from labeldiff.data.splits import pretraining_exclusions

from conftest import DATASETS

CT = DATASETS / "ct_abdomen"


def make_volume_dataset(root: Path, shape=(20, 16, 10), k: int = 3) -> Path:
    """imagesTr (2 labeled cases), imagesTs (1 labeled case), imagesUnlabeled (1 case); float intensities."""
    rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "imagesUnlabeled"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "liver": 1, "spleen": 2}}))
    aff = np.diag([0.8, 0.8, 3.0, 1.0])
    for split, cases in (("Tr", ("a", "b")), ("Ts", ("t",)), ("Unlabeled", ("u",))):
        for c in cases:
            lab = np.zeros(shape, np.uint8)
            lab[4:12, 3:9, 2:8] = 1
            lab[13:17, 9:14, 3:7] = 2
            x = (rng.normal(-50, 30, shape) + 120.0 * lab).astype(np.float32)  # float HU-like values
            nib.save(nib.Nifti1Image(x, aff), str(root / f"images{split}" / f"{c}_0000.nii.gz"))
            if split != "Unlabeled":
                nib.save(nib.Nifti1Image(lab, aff), str(root / f"labels{split}" / f"{c}.nii.gz"))
    return root


@pytest.fixture
def fresh_volumes(monkeypatch):
    cache = VolumeCache(max_mb=256)
    monkeypatch.setattr("labeldiff.data.slices.VOLUMES", cache)
    monkeypatch.setattr("labeldiff.data.folders.VOLUMES", cache)
    return cache


def test_volume_folder_splits_and_lazy_slices(tmp_path, fresh_volumes):
    root = make_volume_dataset(tmp_path / "Dataset001")
    ds = VolumeFolder(root)
    train = ds.stems("train")
    assert train == [f"{c}_z{i:04d}" for c in ("a", "b") for i in range(2, 8)]  # slices with ≥ 1 % labels
    assert ds.stems("test") == [f"t_z{i:04d}" for i in range(2, 8)]
    assert len(ds.stems("unlabeled")) == 10
    s = ds.samples(train[1:2])[0]  # a_z0003: both organs
    x, m = s.read_image(1), s.read_mask(3)
    assert x.shape == (1, 20, 20) and x.dtype == np.float32 and m.shape == (20, 20)
    assert len(np.unique(x)) > 256  # float intensities end to end: nothing quantised to 8 bits
    assert set(np.unique(m)) == {0, 1, 2}
    for sample in ds.samples(train):
        sample.read_image(1)
        sample.read_mask(3)
    a_image = str(root / "imagesTr" / "a_0000.nii.gz")
    assert fresh_volumes.reads[a_image] == 1  # every slice of a, one decode
    with pytest.raises(DataError, match="no split named 'val'"):
        ds.stems("val")


def test_split_file_slabs_and_pretraining_leaves_the_test_slab_out(tmp_path, fresh_volumes):
    root = make_volume_dataset(tmp_path / "Dataset002")
    split = {"train": [f"a_z{i:04d}" for i in range(2, 5)], "test": [f"a_z{i:04d}" for i in range(6, 9)]}
    (root / "split.json").write_text(json.dumps(split))
    cfg = DataConfig(path=str(root), channels=1, size=16, mode="resize")
    excluded, why = pretraining_exclusions(cfg)
    assert excluded == split["test"] and "leaves out the 3 images" in why
    stems = {s.stem for s in unlabeled_samples(root, set(excluded))}
    assert not stems & set(split["test"]) and {"u_z0000", "t_z0005", "a_z0005"} <= stems
    (root / "split.json").write_text(json.dumps({"train": ["a_z0099"]}))
    with pytest.raises(DataError, match="no slice of"):
        VolumeFolder(root).stems("train")


def test_ct_percentile_is_fitted_once_and_stored(tmp_path, fresh_volumes):
    root = make_volume_dataset(tmp_path / "Dataset003")
    cfg = DataConfig(path=str(root), channels=1, intensity={"scheme": "ct-percentile"})
    ds = open_labeled(cfg)
    assert cfg.intensity["scheme"] == "ct-percentile" and cfg.intensity["fitted_on"] == ["a", "b"]
    x = ds.samples(ds.stems("train")[:1])[0].read_image(1)
    assert -6 < float(x.min()) and float(x.max()) < 6  # z-scored HU
    stored = dict(cfg.intensity, mean=123.0)  # as a run config holds it
    cfg.intensity = stored
    open_labeled(cfg)
    assert cfg.intensity == stored  # fitted once: stored statistics are reused, never refitted


def test_dataset_percentile_is_fitted_on_the_training_cases_and_stored(tmp_path, fresh_volumes, capsys):
    root = make_volume_dataset(tmp_path / "Dataset005")
    cfg = DataConfig(path=str(root), channels=1, intensity={"scheme": "dataset-percentile"})
    ds = open_labeled(cfg)
    assert cfg.intensity["fitted_on"] == ["a", "b"] and "dataset-percentile fitted on every voxel" in capsys.readouterr().out
    x = ds.samples(ds.stems("train")[:1])[0].read_image(1)
    assert -1 <= float(x.min()) and float(x.max()) <= 1
    stored = dict(cfg.intensity)
    open_labeled(cfg)
    assert cfg.intensity == stored  # fitted once


def test_batches_from_volume_slices(tmp_path, fresh_volumes):
    root = make_volume_dataset(tmp_path / "Dataset004")
    cfg = DataConfig(path=str(root), channels=1, size=16, mode="resize")
    ds = open_labeled(cfg)
    b = StepBatches(ds.samples(ds.stems("train")), cfg, 4, seed=0, labeled=True, num_classes=3)[0]
    assert b["image"].shape == (4, 1, 16, 16) and b["mask"].shape == (4, 16, 16)
    assert int(b["mask"].max()) <= 2


def test_label_unit_volumes_takes_every_labeled_slice_of_k_cases(tmp_path, fresh_volumes):
    from labeldiff.config import RunConfig, TransferConfig
    from labeldiff.transfer.labeled import prepare_transfer

    root = make_volume_dataset(tmp_path / "Dataset005")
    for c in ("c", "d"):  # four training cases
        for sub, end in (("imagesTr", "_0000"), ("labelsTr", "")):
            (root / sub / f"{c}{end}.nii.gz").write_bytes((root / sub / f"a{end}.nii.gz").read_bytes())
    seen = set()
    for seed in range(6):
        cfg = RunConfig(data=DataConfig(path=str(root), channels=1, size=16, mode="resize"),
                        transfer=TransferConfig(strategy="scratch", labels=2, label_unit="volumes"))
        cfg.train.seed = seed
        chosen = prepare_transfer(cfg).stems
        cases = sorted({s.split("_z")[0] for s in chosen})
        assert len(cases) == 2 and chosen == [f"{c}_z{i:04d}" for c in cases for i in range(2, 8)]
        seen.add(tuple(cases))
    assert len(seen) > 1  # the seed draws the cases
    cfg.transfer.labels = 5
    with pytest.raises(DataError, match=r"\(4 cases with labeled slices\); use --labels 4"):
        prepare_transfer(cfg)
    cfg.transfer.label_unit = "slice"
    with pytest.raises(ValueError, match="--label-unit 'slice' is not one of slices, volumes"):
        prepare_transfer(cfg)


def test_label_unit_volumes_refuses_a_2d_dataset(labeled_dataset):
    from labeldiff.config import RunConfig, TransferConfig
    from labeldiff.transfer.labeled import prepare_transfer

    cfg = RunConfig(data=DataConfig(path=str(labeled_dataset), channels=3, size=16),
                    transfer=TransferConfig(strategy="scratch", labels=1, label_unit="volumes"))
    with pytest.raises(DataError, match="2D image dataset; use --label-unit slices"):
        prepare_transfer(cfg)


@pytest.mark.slow
@pytest.mark.skipif(not CT.is_dir(), reason="shared datasets absent")
def test_finetune_and_predict_on_the_real_ct_volume(tmp_path, fresh_volumes):
    """The CT paper's setting in miniature on the real abdominal CT: k = 2 labeled axial slices of the
    crop, HU windowed, then predict the whole crop back as a NIfTI on its grid and score it in 3D."""
    out = tmp_path / "ft"
    assert main(["finetune", "--data", str(CT), "--out", str(out), "--strategy", "scratch", "--labels", "2",
                 "--channels", "1", "--size", "32", "--mode", "resize", "--steps", "3", "--batch-size", "2",
                 "--precision", "fp32", "--device", "cpu", "--unet-channels", "8,16", "--attention", "0,0",
                 "--head-channels", "8", "--head-hidden", "8", "--intensity", "ct-window",
                 "--hu-window", "-160", "240"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["intensity"]["scheme"] == "ct-window" and cfg["num_classes"] == 14
    labeled = json.loads((out / "labeled.json").read_text())
    assert len(labeled["stems"]) == 2 and all(s.startswith("abdomen_z") for s in labeled["stems"])
    pred = tmp_path / "pred"
    assert main(["predict", "--model", str(out), "--input", str(CT / "imagesTr" / "abdomen_0000.nii.gz"),
                 "--out", str(pred), "--device", "cpu"]) == 0  # the run's own intensity scheme by default
    src = nib.load(str(CT / "imagesTr" / "abdomen_0000.nii.gz"))
    got = nib.load(str(pred / "abdomen.nii.gz"))
    assert got.shape == src.shape and np.allclose(got.affine, src.affine)
    ev = tmp_path / "ev"
    assert main(["evaluate", "--model", str(out), "--data", str(CT), "--split", "train", "--out", str(ev),
                 "--device", "cpu"]) == 0
    m = json.loads((ev / "metrics.json").read_text())
    assert m["intensity"]["scheme"] == "ct-window" and len(m["per_class"]) == 13
    import csv

    (eso,) = [r for r in csv.DictReader(open(ev / "per_case.csv")) if r["name"] == "esophagus"]
    assert eso["voxels_true"] == "0"  # absent from the crop: NaN and counted when also not predicted, else 0
    assert (eso["absent"] == "True") == (eso["voxels_pred"] == "0")
    liver = [r for r in csv.DictReader(open(ev / "per_case.csv")) if r["name"] == "liver"][0]
    assert int(liver["voxels_true"]) == int((np.asarray(nib.load(str(CT / "labelsTr" / "abdomen.nii.gz")).dataobj) == 1).sum())


def test_split_slabs_of_a_volume_dataset(tmp_path, fresh_volumes):
    root = make_volume_dataset(tmp_path / "Dataset005")
    f = tmp_path / "slabs.json"
    assert main(["split", "--data", str(root), "--slab-train", "0.5", "--gap", "1", "--out", str(f)]) == 0
    split = json.loads(f.read_text())
    # each imagesTr case has labeled slices z2..z7: z2–z4 train, gap z5, z6–z7 test
    assert split["train"] == [f"{c}_z{i:04d}" for c in ("a", "b") for i in (2, 3, 4)]
    assert split["test"] == [f"{c}_z{i:04d}" for c in ("a", "b") for i in (6, 7)]
    cfg = DataConfig(path=str(root), split_file=str(f))
    assert pretraining_exclusions(cfg)[0] == split["test"]


def test_split_of_a_volume_dataset_needs_slabs(tmp_path, fresh_volumes, capsys):
    root = make_volume_dataset(tmp_path / "Dataset006")
    assert main(["split", "--data", str(root), "--out", str(tmp_path / "s.json")]) == 2
    assert "--slab-train" in capsys.readouterr().err
    groups = tmp_path / "groups.json"
    groups.write_text("{}")
    assert main(["split", "--data", str(root), "--slab-train", "0.5", "--groups", str(groups),
                 "--out", str(tmp_path / "s.json")]) == 2  # a flag that cannot apply is refused, not ignored
    assert "--groups" in capsys.readouterr().err and not (tmp_path / "s.json").exists()


def test_evaluate_decides_2d_or_volumes_and_refuses_the_options_of_the_other(tmp_path, fresh_volumes, labeled_dataset):
    """One place decides how a run is scored: an nnU-Net raw folder as ``data`` in 3D, anything else image by
    image. Options of the other kind are refused before the run is opened (no run needed here)."""
    from labeldiff.errors import ConfigError
    from labeldiff.evaluate.run import evaluate

    root = make_volume_dataset(tmp_path / "Dataset009")
    with pytest.raises(ConfigError, match="--corruptions"):
        evaluate(tmp_path / "no-run", data=root, corruptions=["noise"], severities=[1])
    with pytest.raises(ConfigError, match="--slab"):
        evaluate(tmp_path / "no-run", data=labeled_dataset, slab=(2, 4))
    with pytest.raises(ConfigError, match="--slab"):
        evaluate(tmp_path / "no-run", slab=(2, 4))  # no data: the run's own, scored image by image


@pytest.mark.skipif(not CT.is_dir(), reason="shared datasets absent")
def test_pretraining_leaves_the_test_slab_out_of_the_whole_scan_too(tmp_path, fresh_volumes):
    """ct_abdomen's labeled crop is slices 82–111 of its unlabeled whole scan (found by content: the crop's
    affine keeps the scan's origin): a test slab of the crop is left out of the scan as well."""
    f = tmp_path / "slabs.json"
    assert main(["split", "--data", str(CT), "--slab-train", "0.5", "--gap", "4", "--out", str(f)]) == 0
    split = json.loads(f.read_text())
    cfg = DataConfig(path=str(CT), split_file=str(f), channels=1)
    excluded, _ = pretraining_exclusions(cfg)
    assert excluded == split["test"] == [f"abdomen_z{i:04d}" for i in range(19, 30)]
    read = {s.stem for s in unlabeled_samples(CT, set(excluded))}
    copies = {f"abdomen_full_z{82 + i:04d}" for i in range(19, 30)}
    assert not read & (set(excluded) | copies)
    assert "abdomen_full_z0100" in read and "abdomen_full_z0019" in read and "abdomen_z0014" in read


def test_intensity_flags_are_checked_before_a_run_folder_exists(tmp_path, capsys):
    root = make_volume_dataset(tmp_path / "Dataset009")
    for flags, message in ((["--intensity", "ct-window"], "needs --hu-window"),
                           (["--intensity", "zscore", "--hu-window", "-160", "240"], "ct-window only"),
                           (["--intensity", "ct-window", "--hu-window", "240", "-160"], "lo < hi")):
        out = tmp_path / "ft"
        assert main(["finetune", "--data", str(root), "--out", str(out), "--strategy", "scratch", "--labels", "1",
                     "--channels", "1", *flags]) == 2
        assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
def test_resampling_to_a_target_spacing_end_to_end(tmp_path, fresh_volumes):
    """--spacing 0.8,0.8,1.5 on 3 mm slices: the dataset is sliced on the resampled grid (19 axial slices
    instead of 10), the run config records the spacing, predict writes the label NIfTI on the input's own
    grid and affine, and evaluate scores on the input grid, a study slab mapped onto it."""
    from labeldiff.evaluate.volume import run_evaluate_volumes

    root = make_volume_dataset(tmp_path / "Dataset009")
    assert len(VolumeFolder(root).case_slices["train"]) == 20
    ds = VolumeFolder(root, spacing=[0.8, 0.8, 1.5])
    assert len(ds.case_slices["train"]) == 2 * 19 and ds.samples(["a_z0018"])[0].read_image(1).shape == (1, 20, 20)
    out = tmp_path / "ft"
    assert main(["finetune", "--data", str(root), "--out", str(out), "--strategy", "scratch", "--labels", "2",
                 "--channels", "1", "--size", "16", "--mode", "resize", "--steps", "2", "--batch-size", "2",
                 "--precision", "fp32", "--device", "cpu", "--unet-channels", "8,16", "--attention", "0,0",
                 "--head-channels", "8", "--head-hidden", "8", "--spacing", "0.8,0.8,1.5"]) == 0
    assert json.loads((out / "config.json").read_text())["data"]["spacing"] == [0.8, 0.8, 1.5]
    pred = tmp_path / "pred"
    src = root / "imagesTs" / "t_0000.nii.gz"
    assert main(["predict", "--model", str(out), "--input", str(src), "--out", str(pred), "--device", "cpu"]) == 0
    got, ref = nib.load(str(pred / "t.nii.gz")), nib.load(str(src))
    assert got.shape == ref.shape == (20, 16, 10) and np.allclose(got.affine, ref.affine)
    m = run_evaluate_volumes(out, root, tmp_path / "ev", split="train", slabs={"a": (4, 9)}, device="cpu", quiet=True)
    assert list(m["spacing"]) == [0.8, 0.8, 1.5] and m["scored_slabs"] == {"a": [2, 4]}  # 1.5 mm slices 4..9 = 3 mm 2..4


def test_spacing_is_checked_before_a_run_folder(tmp_path, capsys):
    root = make_volume_dataset(tmp_path / "Dataset010")
    out = tmp_path / "ft"
    assert main(["finetune", "--data", str(root), "--out", str(out), "--strategy", "scratch", "--labels", "1",
                 "--spacing", "1,0,2"]) == 2 and not out.exists()
    assert "--spacing must be three positive sizes" in capsys.readouterr().err


@pytest.mark.slow
def test_select_picks_slices_on_the_pretrained_runs_grid(tmp_path, fresh_volumes, capsys):
    """`labeldiff select` on an nnU-Net dataset: the candidates are the slices of every case on the grid
    the run was pretrained on (--spacing 0.8,0.8,1.5: 19 axial slices per case instead of 10), the test
    split's slices left out."""
    root = make_volume_dataset(tmp_path / "Dataset009")
    pre = tmp_path / "pre"
    assert main(["pretrain", "--data", str(root), "--out", str(pre), "--channels", "1", "--size", "16", "--mode",
                 "resize", "--steps", "2", "--batch-size", "2", "--precision", "fp32", "--device", "cpu",
                 "--unet-channels", "8,16", "--attention", "0,0", "--head-channels", "8",
                 "--spacing", "0.8,0.8,1.5"]) == 0
    capsys.readouterr()
    assert main(["select", "--pretrained", str(pre), "--data", str(root), "--labels", "500"]) == 2
    # 4 cases × 19 resampled slices, less the test case's 11 labeled ones (left out as pretraining leaves them)
    assert "has 65 slices; choose k from 1 to 65" in capsys.readouterr().err
    out = tmp_path / "picks.txt"
    assert main(["select", "--pretrained", str(pre), "--data", str(root), "--labels", "3", "--out", str(out)]) == 0
    stems = [line.split("\t")[0] for line in out.read_text().splitlines()]
    assert len(set(stems)) == 3 and all(s.split("_z")[0] in {"a", "b", "t", "u"} for s in stems)
