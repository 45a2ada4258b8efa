"""Data reading, validation errors, subsets, per-step batches, the image cache and volume slicing."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from labeldiff.config import DataConfig
from labeldiff.data.datasets import ImageCache, StepBatches, resize_mask
from labeldiff.data.folders import LabeledFolder, Sample, list_images, unlabeled_samples
from labeldiff.data.io import DataError, image_size, read_image, read_mask
from labeldiff.data.splits import select_subset
from labeldiff.data.validation import validate_samples
from labeldiff.data.volumes import volume_to_slices


def _pair(root: Path, stem: str, image: np.ndarray, mask: np.ndarray | Image.Image, mask_ext: str = ".png") -> Sample:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{stem}.png")
    m = mask if isinstance(mask, Image.Image) else Image.fromarray(mask)
    m.save(root / "masks" / f"{stem}{mask_ext}")
    return Sample(stem, root / "images" / f"{stem}.png", root / "masks" / f"{stem}{mask_ext}")


RGB = np.full((10, 12, 3), 100, dtype=np.uint8)


# ---------------------------------------------------------------- validation errors name the file


def test_size_mismatch_names_both_files(tmp_path):
    """An image and a mask of different sizes: DataError naming the mask and the image."""
    s = _pair(tmp_path, "a", RGB, np.zeros((10, 11), np.uint8))
    with pytest.raises(DataError) as e:
        validate_samples([s], num_classes=2)
    assert str(s.mask) in str(e.value) and str(s.image) in str(e.value)


def test_mask_values_at_least_k(tmp_path):
    """A mask value ≥ K (K given) is a DataError naming the mask file and the bad value."""
    m = np.zeros((10, 12), np.uint8)
    m[0, 0] = 3
    s = _pair(tmp_path, "a", RGB, m)
    with pytest.raises(DataError, match="3") as e:
        read_mask(s.mask, num_classes=3)
    assert str(s.mask) in str(e.value)
    with pytest.raises(DataError) as e:
        validate_samples([s], num_classes=3)
    assert str(s.mask) in str(e.value)
    assert validate_samples([s], num_classes=4) == 4
    assert validate_samples([s], num_classes=None) == 4  # inferred as max + 1


def test_mask_values_are_scanned_once_and_rescanned_when_the_file_changes(tmp_path, monkeypatch):
    """The K check reads each mask once: a second validation of unchanged files reads no mask (values
    come from the size+mtime cache) and still refuses a value ≥ K; a changed mask is read again."""
    import os

    import labeldiff.data.io as io

    m = np.zeros((10, 12), np.uint8)
    m[0, 0] = 2
    s = _pair(tmp_path, "a", RGB, m)
    assert validate_samples([s], num_classes=None) == 3
    real = io._open

    def no_mask_decode(path):
        assert Path(path) != s.mask, "mask decoded again"
        return real(path)

    monkeypatch.setattr(io, "_open", no_mask_decode)
    assert validate_samples([s], num_classes=None) == 3  # from the cache
    with pytest.raises(DataError, match=r"values \[2\] are ≥ K=2"):
        validate_samples([s], num_classes=2)  # the cached values still meet the K check
    monkeypatch.setattr(io, "_open", real)
    m[0, 0] = 5
    Image.fromarray(m).save(s.mask)
    st = s.mask.stat()
    os.utime(s.mask, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime, whatever the clock's grain
    assert validate_samples([s], num_classes=None) == 6


def test_binary_255_mask_hint(tmp_path):
    """A 0/255 mask with K=2 is rejected with a hint to divide by 255."""
    m = np.zeros((10, 12), np.uint8)
    m[2:5, 2:5] = 255
    s = _pair(tmp_path, "a", RGB, m)
    with pytest.raises(DataError, match="255") as e:
        read_mask(s.mask, num_classes=2)
    assert str(s.mask) in str(e.value)


def test_float_mask_non_integer(tmp_path):
    """A float32 TIFF mask with a non-integer value is a DataError naming it; integral floats are accepted."""
    m = np.zeros((10, 12), np.float32)
    m[1, 1] = 0.5
    s = _pair(tmp_path, "a", RGB, Image.fromarray(m, mode="F"), mask_ext=".tif")
    with pytest.raises(DataError, match="non-integer") as e:
        read_mask(s.mask)
    assert str(s.mask) in str(e.value)
    m[1, 1] = 2.0
    Image.fromarray(m, mode="F").save(s.mask)
    out = read_mask(s.mask)
    assert out.dtype == np.int64 and out[1, 1] == 2 and out.sum() == 2


def test_colour_mask_rejected_grey_rgb_accepted(tmp_path):
    """An RGB mask with different channels is a DataError naming it; an RGB mask with R=G=B is read as grey."""
    m = np.zeros((10, 12, 3), np.uint8)
    m[2, 3] = (1, 0, 0)
    s = _pair(tmp_path, "a", RGB, m)
    with pytest.raises(DataError, match="colour") as e:
        read_mask(s.mask)
    assert str(s.mask) in str(e.value)
    g = np.zeros((10, 12, 3), np.uint8)
    g[2, 3] = (2, 2, 2)
    Image.fromarray(g).save(s.mask)
    out = read_mask(s.mask)
    assert out.shape == (10, 12) and out[2, 3] == 2 and out.sum() == 2


def test_corrupt_file(tmp_path):
    """Garbage bytes in a .png: every reader raises a DataError naming the file."""
    bad = tmp_path / "images" / "bad.png"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a png\x00\x01\x02" * 10)
    for fn in (lambda: read_image(bad, 3), lambda: read_mask(bad), lambda: image_size(bad),
               lambda: unlabeled_samples(tmp_path)):
        with pytest.raises(DataError) as e:
            fn()
        assert str(bad) in str(e.value)


def test_empty_folder(tmp_path):
    """A folder without images is a DataError naming the folder (directly and as a dataset root)."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images") as e:
        list_images(tmp_path / "images")
    assert str(tmp_path / "images") in str(e.value)
    with pytest.raises(DataError, match="no images"):
        unlabeled_samples(tmp_path)
    with pytest.raises(DataError, match="no images"):
        LabeledFolder(tmp_path)


def test_missing_images_folder(tmp_path):
    """A dataset root without images/ is a DataError naming the root."""
    with pytest.raises(DataError) as e:
        LabeledFolder(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_stem_without_mask(labeled_dataset):
    """An image whose stem has no mask: DataError naming the image file."""
    (labeled_dataset / "masks" / "img_01.png").unlink()
    ds = LabeledFolder(labeled_dataset)
    with pytest.raises(DataError, match="no mask") as e:
        ds.samples(ds.stems("train"))
    assert str(labeled_dataset / "images" / "img_01.png") in str(e.value)


def test_labels_larger_than_split(labeled_dataset):
    """--labels above the split size is a DataError naming the split and its size."""
    stems = LabeledFolder(labeled_dataset).stems("train")
    with pytest.raises(DataError, match="--labels 5") as e:
        select_subset(stems, 5, seed=0, split_name="train")
    assert "'train'" in str(e.value) and "4 images" in str(e.value)
    with pytest.raises(DataError):
        select_subset(stems, 0, seed=0)
    assert len(select_subset(stems, 4, seed=0)) == 4


def test_unknown_split_name(labeled_dataset):
    """A split name missing from split.json is a DataError naming split.json and the available splits."""
    ds = LabeledFolder(labeled_dataset)
    with pytest.raises(DataError, match="'validation'") as e:
        ds.stems("validation")
    msg = str(e.value)
    assert str(labeled_dataset / "split.json") in msg and "test" in msg and "train" in msg


def test_split_naming_unknown_stem(labeled_dataset):
    """split.json naming a stem with no image is a DataError naming split.json."""
    (labeled_dataset / "split.json").write_text(json.dumps({"train": ["img_00", "ghost"]}))
    with pytest.raises(DataError, match="ghost") as e:
        LabeledFolder(labeled_dataset).stems("train")
    assert "split.json" in str(e.value)


def test_no_split_json_means_all(labeled_dataset):
    """Without split.json, split None/'all' and 'train' list every image; a test split is an error that
    says how to make one."""
    (labeled_dataset / "split.json").unlink()
    ds = LabeledFolder(labeled_dataset)
    assert ds.stems(None) == ds.stems("all") == ds.stems("train") == [f"img_{i:02d}" for i in range(6)]
    with pytest.raises(DataError, match="no split.json, so there is no 'test' split; make one with `labeldiff split"):
        ds.stems("test")


# ---------------------------------------------------------------- reading


def test_read_image_rgb_and_conversions(tmp_path):
    """RGB → [3,H,W] float32 in [-1,1]; RGB → 1 channel with ITU-R 601 weights; grey → 3 equal channels."""
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (0, 0, 255)
    rgb[0, 3] = (255, 255, 255)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    x = read_image(tmp_path / "rgb.png", 3)
    assert x.shape == (3, 5, 7) and x.dtype == np.float32
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_allclose(x, rgb.transpose(2, 0, 1) / 255.0 * 2 - 1, atol=1e-6)

    y = read_image(tmp_path / "rgb.png", 1)
    assert y.shape == (1, 5, 7) and y.dtype == np.float32
    np.testing.assert_allclose(y[0, 0, :4], np.array([0.299, 0.587, 0.114, 1.0]) * 2 - 1, atol=1e-5)
    assert y.min() >= -1 and y.max() <= 1

    grey = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    z = read_image(tmp_path / "grey.png", 3)
    assert z.shape == (3, 5, 7)
    assert np.array_equal(z[0], z[1]) and np.array_equal(z[0], z[2])
    np.testing.assert_allclose(z[0], grey / 255.0 * 2 - 1, atol=1e-6)
    assert read_image(tmp_path / "grey.png", 1).shape == (1, 5, 7)


def test_read_image_rgba_and_16bit(tmp_path):
    """Alpha is dropped; a 16-bit grey image is divided by 65535."""
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 7
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x = read_image(tmp_path / "a.png", 3)
    assert x.shape == (3, 4, 4) and np.all(x[0] == 1) and np.all(x[1:] == -1)

    g16 = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    y = read_image(tmp_path / "g16.png", 1)
    np.testing.assert_allclose(y[0], g16 / 65535.0 * 2 - 1, atol=1e-6)


def test_read_image_wrong_channel_count(tmp_path):
    """Asking for an impossible channel count is a DataError naming the file."""
    Image.fromarray(RGB).save(tmp_path / "a.png")
    with pytest.raises(DataError) as e:
        read_image(tmp_path / "a.png", 2)
    assert str(tmp_path / "a.png") in str(e.value)


def test_read_mask_16bit_png(tmp_path):
    """A 16-bit PNG mask keeps values above 255."""
    m = np.zeros((6, 8), np.uint16)
    m[1, 2], m[3, 4] = 300, 1
    Image.fromarray(m).save(tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode.startswith("I")  # really stored as 16 bit
    out = read_mask(tmp_path / "m.png")
    assert out.dtype == np.int64 and out.shape == (6, 8)
    assert out[1, 2] == 300 and out[3, 4] == 1 and out.sum() == 301
    with pytest.raises(DataError):
        read_mask(tmp_path / "m.png", num_classes=300)


def test_real_monuseg_pairs_validate(monuseg_small):
    """Real MoNuSeg pairs: images read as RGB in [-1,1], binary masks give K=2."""
    ds = LabeledFolder(monuseg_small)
    samples = ds.samples(ds.stems("train") + ds.stems("test"))
    assert validate_samples(samples, None) == 2
    for s in samples:
        x = read_image(s.image, 3)
        m = read_mask(s.mask, 2)
        assert x.shape == (3, 64, 64) and m.shape == (64, 64)
        assert -1 <= x.min() < x.max() <= 1
        assert set(np.unique(m)) == {0, 1}


# ---------------------------------------------------------------- subsets


def test_select_subset_deterministic_and_seed_dependent():
    """The same seed gives the same subset (whatever the input order); seeds give different subsets."""
    stems = [f"s{i:02d}" for i in range(20)]
    a = select_subset(stems, 5, seed=3)
    assert a == select_subset(list(reversed(stems)), 5, seed=3)
    assert len(set(a)) == 5 and set(a) <= set(stems)
    subsets = {tuple(select_subset(stems, 5, seed=s)) for s in range(8)}
    assert len(subsets) > 1


# ---------------------------------------------------------------- per-step batches


def test_step_batches_deterministic_shapes(labeled_dataset):
    """batches[step] depends only on (seed, step); images [B,C,S,S] float32, masks [B,S,S] int64."""
    ds = LabeledFolder(labeled_dataset)
    samples = ds.samples(ds.stems("train"))
    cfg = DataConfig(path=str(labeled_dataset), size=16, channels=3)
    a = StepBatches(samples, cfg, batch_size=2, seed=1, labeled=True, num_classes=3)
    b = StepBatches(samples, cfg, batch_size=2, seed=1, labeled=True, num_classes=3)
    for step in (0, 5, 17):
        x, y = a[step], b[step]
        assert x["image"].shape == (2, 3, 16, 16) and x["image"].dtype == torch.float32
        assert x["mask"].shape == (2, 16, 16) and x["mask"].dtype == torch.int64
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    c = StepBatches(samples, cfg, batch_size=2, seed=2, labeled=True, num_classes=3)
    assert any(not torch.equal(a[s]["image"], c[s]["image"]) for s in range(3))
    u = StepBatches(samples, cfg, batch_size=2, seed=1, labeled=False)
    assert set(u[0]) == {"image"}


def test_step_batches_crop_keeps_mask_values_and_alignment(labeled_dataset):
    """Crops (and flips) keep mask values and keep image and mask aligned (bright pixels = foreground)."""
    ds = LabeledFolder(labeled_dataset)
    samples = ds.samples(ds.stems("train"))
    originals = set()
    for s in samples:
        originals |= set(np.unique(read_mask(s.mask)).tolist())
    batches = StepBatches(samples, DataConfig(size=16, channels=3), batch_size=4, seed=0, labeled=True,
                          num_classes=3)
    seen = set()
    for step in range(10):
        b = batches[step]
        seen |= set(b["mask"].unique().tolist())
        bright = b["image"].mean(1) > 0  # foreground pixels are bright, background dark
        assert torch.equal(bright, b["mask"] > 0)
    assert seen <= originals and len(seen) > 1


def test_step_batches_resize_mode(labeled_dataset):
    """mode='resize' brings the whole image to size×size; nearest-neighbour masks keep their values."""
    ds = LabeledFolder(labeled_dataset)
    samples = ds.samples(ds.stems("train"))
    batches = StepBatches(samples, DataConfig(size=24, mode="resize", channels=1), batch_size=2, seed=0,
                          labeled=True, num_classes=3)
    b = batches[3]
    assert b["image"].shape == (2, 1, 24, 24) and b["mask"].shape == (2, 24, 24)
    assert set(b["mask"].unique().tolist()) <= {0, 1, 2}


def test_step_batches_small_image_enlarged(tmp_path):
    """Crop mode with an image smaller than the crop enlarges it so a full crop fits."""
    s = _pair(tmp_path, "a", np.zeros((10, 12, 3), np.uint8), np.zeros((10, 12), np.uint8))
    b = StepBatches([s], DataConfig(size=16), batch_size=2, seed=0, labeled=True)[0]
    assert b["image"].shape == (2, 3, 16, 16) and b["mask"].shape == (2, 16, 16)


# ---------------------------------------------------------------- cache


def test_image_cache_respects_byte_bound():
    """The cache never holds more than its bound, evicts the least recently used, skips oversized items."""
    cache = ImageCache(max_mb=1)
    calls = []

    def loader(key, nbytes):
        def load():
            calls.append(key)
            return np.zeros(nbytes, dtype=np.uint8)
        return load

    third = 2**20 // 3
    for key in "abc":
        cache.get(key, loader(key, third))
        assert cache.bytes <= cache.max_bytes
    cache.get("a", loader("a", third))  # hit: "a" becomes most recent
    assert calls == ["a", "b", "c"]
    cache.get("d", loader("d", third))  # evicts "b", the least recently used
    assert cache.bytes <= cache.max_bytes
    assert set(cache.items) == {"a", "c", "d"}
    assert cache.bytes == sum(v.nbytes for v in cache.items.values())
    big = cache.get("big", loader("big", 2**20 + 1))
    assert big.nbytes == 2**20 + 1 and "big" not in cache.items
    cache.get("b", loader("b", third))
    assert calls[-1] == "b"  # was evicted, so loaded again


# ---------------------------------------------------------------- volumes


def _volume(tmp_path, shape=(20, 24, 10), label_shape=None):
    rng = np.random.default_rng(0)
    vol = rng.normal(100, 20, size=shape).astype(np.float32)
    lab = np.zeros(label_shape or shape, dtype=np.uint8)
    lab[5:10, 6:12, 2:6] = 1
    lab[12:16, 14:20, 3:8] = 2
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "vol.nii.gz"))
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "lab.nii.gz"))
    return tmp_path / "vol.nii.gz", tmp_path / "lab.nii.gz"


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_volume_to_slices(tmp_path, axis):
    """One image and one mask PNG per slice along ``axis``, equal square sizes, label values kept."""
    vol, lab = _volume(tmp_path)
    out = tmp_path / "slices"
    stems = volume_to_slices(vol, out, labels=lab, axis=axis)
    n = (20, 24, 10)[axis]
    assert len(stems) == n
    images, masks = sorted((out / "images").glob("*.png")), sorted((out / "masks").glob("*.png"))
    assert len(images) == len(masks) == n
    side = max(s for i, s in enumerate((20, 24, 10)) if i != axis)
    values = set()
    for i, m in zip(images, masks):
        assert i.name == m.name
        assert image_size(i) == image_size(m) == (side, side)
        values |= set(np.unique(read_mask(m)).tolist())
    assert values == {0, 1, 2}
    ds = LabeledFolder(out)
    assert validate_samples(ds.samples(ds.stems(None)), 3) == 3


def test_volume_to_slices_size_and_foreground(tmp_path):
    """``size`` resizes slices; ``min_foreground`` keeps only slices with enough labeled pixels."""
    vol, lab = _volume(tmp_path)
    stems = volume_to_slices(vol, tmp_path / "s", labels=lab, axis=2, size=16, min_foreground=0.01)
    assert stems == [f"slice_{i:04d}" for i in range(2, 8)]  # labels occupy slices 2..7
    for s in stems:
        assert image_size(tmp_path / "s" / "images" / f"{s}.png") == (16, 16)
        assert image_size(tmp_path / "s" / "masks" / f"{s}.png") == (16, 16)


def test_volume_label_shape_mismatch(tmp_path):
    """A label volume of another shape is a DataError naming it."""
    vol, lab = _volume(tmp_path, label_shape=(20, 24, 9))
    with pytest.raises(DataError, match="must match") as e:
        volume_to_slices(vol, tmp_path / "out", labels=lab)
    assert str(lab) in str(e.value)


def test_volume_unreadable(tmp_path):
    """A file that is not NIfTI is a DataError naming it."""
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"garbage" * 20)
    with pytest.raises(DataError) as e:
        volume_to_slices(bad, tmp_path / "out")
    assert str(bad) in str(e.value)


def test_group_split_keeps_groups_on_one_side():
    from labeldiff.data.splits import group_split

    stems = [str(i) for i in range(1, 41)]
    groups = {s: (int(s) - 1) // 5 for s in stems}  # 8 groups of 5 images
    a = group_split(stems, groups, 0.3, seed=0)
    assert a == group_split(stems, groups, 0.3, seed=0)  # deterministic
    assert set(a["train"]) | set(a["test"]) == set(stems) and not set(a["train"]) & set(a["test"])
    assert {groups[s] for s in a["train"]}.isdisjoint({groups[s] for s in a["test"]})
    assert 0.3 * 40 <= len(a["test"]) < 0.3 * 40 + 5  # whole groups, just past the fraction
    assert group_split(stems, groups, 0.3, seed=1)["test_groups"] != a["test_groups"]


def test_group_split_errors():
    from labeldiff.data.splits import group_split

    with pytest.raises(DataError, match="no group"):
        group_split(["a", "b"], {"a": 1}, 0.5, 0)
    with pytest.raises(DataError, match="two groups"):
        group_split(["a", "b"], {"a": 1, "b": 1}, 0.5, 0)


def test_write_split_is_the_one_split_writer(labeled_dataset, tmp_path):
    """``labeldiff split`` and a study's ``data.split`` write through one function: a group split of a 2D
    dataset, refused over an existing file without ``overwrite``, left untouched when it already holds the
    same split (a run's record of its split file stays true), and settings for the other kind refused."""
    from labeldiff.data.splits import write_split
    from labeldiff.errors import ConfigError

    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({f"img_{i:02d}": i // 2 for i in range(6)}))
    out = tmp_path / "split.json"
    split, what = write_split(labeled_dataset, out, groups=groups, test_fraction=0.3, seed=0)
    assert json.loads(out.read_text()) == split and "from groups" in what
    assert {int(s[-2:]) // 2 for s in split["train"]}.isdisjoint({int(s[-2:]) // 2 for s in split["test"]})
    with pytest.raises(DataError, match="--overwrite"):
        write_split(labeled_dataset, out, groups=groups)
    out.write_text(json.dumps(split, indent=2))  # the same split, written another way (an older study)
    before = out.read_bytes()
    assert write_split(labeled_dataset, out, groups=groups, overwrite=True)[0] == split
    assert out.read_bytes() == before
    random_split, what = write_split(labeled_dataset, tmp_path / "random.json", seed=1)
    assert what.startswith("a random split") and len(random_split["test"]) == 2
    with pytest.raises(ConfigError, match="slab"):
        write_split(labeled_dataset, tmp_path / "slabs.json", slab_train=0.5)
    with pytest.raises(DataError, match="is a folder"):
        write_split(labeled_dataset, tmp_path, overwrite=True)


def test_split_file_replaces_split_json(labeled_dataset, tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"train": ["img_05"], "test": ["img_00"]}))
    assert LabeledFolder(labeled_dataset, f).stems("train") == ["img_05"]
    with pytest.raises(DataError, match="does not exist"):
        LabeledFolder(labeled_dataset, tmp_path / "nope.json")


@pytest.mark.parametrize("hw", [(7, 5), (20, 12), (3, 3)])
def test_resize_mask_is_nearest_neighbour(hw):
    """Resized masks keep their class indices: each output pixel is the input pixel whose centre is
    nearest (``nearest-exact``: index floor((i + 0.5)·in/out)). Bilinear, area or plain ``nearest``
    (floor(i·in/out)) resizing give other values here."""
    m = torch.tensor([[0, 7, 0, 3], [7, 0, 3, 0], [0, 3, 0, 7], [3, 0, 7, 0], [0, 7, 3, 0]])  # 5×4, classes 0/3/7
    out = resize_mask(m, hw)
    assert out.dtype == torch.long and tuple(out.shape) == hw
    rows = ((torch.arange(hw[0]) + 0.5) * m.shape[0] / hw[0]).floor().long()
    cols = ((torch.arange(hw[1]) + 0.5) * m.shape[1] / hw[1]).floor().long()
    assert torch.equal(out, m[rows][:, cols])
    assert set(out.unique().tolist()) <= {0, 3, 7}


# --- K is inferred only when it is unambiguous (issue 14) -----------------------------------------------------------

def _k(root: Path) -> int:
    from labeldiff.data.validation import validate_samples

    ds = LabeledFolder(root)
    return validate_samples(ds.samples(ds.stems("train")), None)


def test_masks_saved_as_0_255_stop_with_the_fix(binary_dataset):
    assert _k(binary_dataset) == 2
    for f in sorted((binary_dataset / "masks").glob("*.png")):
        m = np.asarray(Image.open(f))
        Image.fromarray((m * 255).astype(np.uint8), "L").save(f)
    with pytest.raises(DataError, match=r"img_00\.png: masks hold only the values 0 and 255.*mask // 255"):
        _k(binary_dataset)


def test_jpeg_masks_with_many_values_stop_with_the_fix(binary_dataset):
    f = binary_dataset / "masks" / "img_01.png"
    m = np.asarray(Image.open(f)).astype(np.float32)
    from scipy.ndimage import gaussian_filter

    soft = np.clip(gaussian_filter(m * 200.0, 2) + np.random.default_rng(0).normal(0, 3, m.shape), 0, 255)
    Image.fromarray(soft.astype(np.uint8), "L").save(f.with_suffix(".jpg"), quality=70)
    f.unlink()  # the mask of img_01 is now a lossy JPEG with soft edges
    with pytest.raises(DataError, match=r"img_01\.jpg: the masks hold \d+ distinct values.*lossless PNG"):
        _k(binary_dataset)


def test_k_comes_from_the_datasets_class_names(binary_dataset):
    """classes.json (or dataset.json) names K: here 4 classes, though the masks only use 0 and 1."""
    from labeldiff.config import RunConfig, TransferConfig
    from labeldiff.transfer.labeled import prepare_transfer

    (binary_dataset / "classes.json").write_text(json.dumps({"background": 0, "nucleus": 1, "gland": 2, "stroma": 3}))
    cfg = RunConfig(data=DataConfig(path=str(binary_dataset), channels=3, size=16),
                    transfer=TransferConfig(strategy="scratch", labels=1))
    assert prepare_transfer(cfg).num_classes == 4
    cfg = RunConfig(data=DataConfig(path=str(binary_dataset), channels=3, size=16, num_classes=2),
                    transfer=TransferConfig(strategy="scratch", labels=1))
    assert prepare_transfer(cfg).num_classes == 2  # --num-classes wins
