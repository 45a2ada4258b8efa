"""Fuzzing the commands with broken and odd inputs (issue 14).

Every case goes through ``labeldiff.cli.main`` as a user would run it. A broken input must end with a
non-zero exit, exactly one ``error:`` line on stderr that names the file, no traceback (``main``
returns instead of raising) and no output folder left behind. An odd but valid input (CMYK, palette,
16-bit, float TIFF, RGBA, an EXIF-rotated JPEG) must give a correct result: the command succeeds and
reads the pixels a viewer shows.
"""
from __future__ import annotations

import json
import random
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from labeldiff.cli import main
from labeldiff.data.io import read_image

from conftest import write_labeled_dataset

TRAIN = ["--size", "16", "--steps", "2", "--batch-size", "2", "--precision", "fp32", "--device", "cpu",
         "--channels", "3", "--checkpoint-every", "100"]
VICTIM = "img_03"  # a train image (4 train / 2 test), replaced by each case
TEST_VICTIM = "img_04"  # a test image, for evaluate


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path: Path) -> None:
    """A valid PNG header claiming 50 000 × 50 000 pixels (2.5 G), with one tiny compressed row."""
    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) +
                     _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def exif_rotated_jpeg(rgb: np.ndarray, path: Path) -> None:
    """The image stored on its side (as a phone writes it) with EXIF orientation 6: a viewer rotates it
    back 90° clockwise, so what it shows is ``rgb``."""
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1)))  # 90° counter-clockwise on disk
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, quality=95, exif=exif)


def _grey(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))  # ITU-R 601 luminance, as read_image converts


def _float_tiff_with(value: float):
    def write(rgb: np.ndarray, p: Path) -> None:
        x = _grey(rgb).astype(np.float32) / 255.0
        x[3, 3] = value
        Image.fromarray(x, "F").save(p)
    return write


def _multi_page_tiff(rgb: np.ndarray, p: Path) -> None:
    Image.fromarray(rgb).save(p, save_all=True, append_images=[Image.fromarray(255 - rgb)])


# name → (file suffix, writer(reference RGB array, path), broken?)
IMAGE_CASES = {
    "zero-byte": (".png", lambda rgb, p: p.write_bytes(b""), True),
    "truncated": (".png", lambda rgb, p: (Image.fromarray(rgb).save(p), p.write_bytes(p.read_bytes()[:200])), True),
    "not-an-image": (".png", lambda rgb, p: p.write_text("<html>404 Not Found</html>\n"), True),
    "text-as-jpeg": (".jpg", lambda rgb, p: p.write_bytes(bytes(range(256)) * 4), True),
    "bomb-50000x50000": (".png", lambda rgb, p: bomb_png(p), True),
    "cmyk-jpeg": (".jpg", lambda rgb, p: Image.fromarray(rgb).convert("CMYK").save(p, quality=95), False),
    "palette-png": (".png", lambda rgb, p: Image.fromarray(rgb).quantize(64).save(p), False),
    "16-bit-png": (".png", lambda rgb, p: Image.fromarray(_grey(rgb).astype(np.uint16) * 257).save(p), False),
    "float-tiff": (".tif", lambda rgb, p: Image.fromarray(_grey(rgb).astype(np.float32) / 255.0, "F").save(p), False),
    "rgba-png": (".png", lambda rgb, p: Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(p),
                 False),
    "exif-rotated-jpeg": (".jpg", exif_rotated_jpeg, False),
    "nan-pixel-tiff": (".tif", _float_tiff_with(float("nan")), True),
    "inf-pixel-tiff": (".tif", _float_tiff_with(float("inf")), True),
    "multi-page-tiff": (".tif", _multi_page_tiff, True),
    "folder-named-png": (".png", lambda rgb, p: p.mkdir(), True),
    "symlink-loop": (".png", lambda rgb, p: p.symlink_to(p.name), True),
    "dangling-symlink": (".png", lambda rgb, p: p.symlink_to("nowhere.png"), True),
    "grey-alpha-png": (".png", lambda rgb, p: Image.fromarray(np.dstack([_grey(rgb), np.full(rgb.shape[:2], 200, np.uint8)]),
                                                              "LA").save(p), False),
}


def _mask_255(m, p):
    m = m.copy()
    m[:3] = 255
    Image.fromarray(m).save(p)


def _mask_k_plus_1(m, p):
    m = m.copy()
    m[0, 0] = 3  # K = 3 is given
    Image.fromarray(m).save(p)


MASK_CASES = {  # name → writer(reference mask, path); every one is broken for K = 3
    "mask-with-255": _mask_255,
    "mask-with-K": _mask_k_plus_1,
    "mask-wrong-size": lambda m, p: Image.fromarray(m[:-4]).save(p),
    "mask-zero-byte": lambda m, p: p.write_bytes(b""),
    "mask-truncated": lambda m, p: (Image.fromarray(m).save(p), p.write_bytes(p.read_bytes()[:60])),
    "mask-colour": lambda m, p: Image.fromarray(np.dstack([m * 80, m * 20, m * 5]).astype(np.uint8)).save(p),
    "mask-translucent-alpha": lambda m, p: Image.fromarray(np.dstack([m, np.full_like(m, 100)]), "LA").save(p),
    "mask-int8-negative": lambda m, p: _int8_tiff_mask(m, p),
    "mask-folder": lambda m, p: (p.unlink(missing_ok=True), p.mkdir()),
}


def _int8_tiff_mask(m: np.ndarray, p: Path) -> None:
    """A signed 8-bit mask holding −1, written as a true signed TIFF under the .png name the dataset expects
    (the stem is what pairs it with its image; Pillow reads it by content)."""
    import tifffile

    signed = m.astype(np.int8)
    signed[0, 0] = -1
    tifffile.imwrite(p, signed)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_labeled_dataset(tmp_path_factory.mktemp("fuzz") / "data", n=6, k=3)


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text("model:\n  channels: [8, 16]\n  attention_levels: [false, false]\n  num_head_channels: 8\n"
                    "  norm_num_groups: 8\n  num_res_blocks: 1\ntransfer:\n  head_hidden: 8\n")
    return path


@pytest.fixture(scope="module")
def trained(base, tiny_recipe, tmp_path_factory) -> Path:
    """A tiny fine-tuned run (scratch, K = 3) for evaluate and predict."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["finetune", "--data", str(base), "--out", str(out), "--strategy", "scratch", "--labels", "4",
                 "--recipe", str(tiny_recipe), *TRAIN]) == 0
    return out


def with_image(base: Path, folder: Path, stem: str, case: str) -> Path:
    """A copy of the dataset whose image ``stem`` is replaced by the case's file."""
    data = folder / "data"
    shutil.copytree(base, data)
    suffix, write, _ = IMAGE_CASES[case]
    rgb = np.asarray(Image.open(data / "images" / f"{stem}.png").convert("RGB"))
    (data / "images" / f"{stem}.png").unlink()
    write(rgb, data / "images" / f"{stem}{suffix}")
    return data


def one_error_line(capsys, *names: str) -> str:
    err = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    for name in names:
        assert name in err[0], (name, err[0])
    return err[0]


def refused(argv: list[str], out: Path, capsys, *names: str) -> str:
    code = main(argv)  # a traceback would raise here
    assert code != 0
    assert not out.exists(), f"{out} left behind"
    return one_error_line(capsys, *names)


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_pretrain_and_finetune_on_each_image_case(case, base, tiny_recipe, tmp_path, capsys):
    data = with_image(base, tmp_path, VICTIM, case)
    broken = IMAGE_CASES[case][2]
    for cmd in (["pretrain"], ["finetune", "--strategy", "scratch", "--labels", "4"]):
        out = tmp_path / f"{cmd[0]}-run"
        argv = [*cmd, "--data", str(data), "--out", str(out), "--recipe", str(tiny_recipe), *TRAIN]
        if broken:
            refused(argv, out, capsys, VICTIM)
        else:
            assert main(argv) == 0, capsys.readouterr().err[-2000:]
            assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("case", [c for c, (_, _, broken) in IMAGE_CASES.items() if not broken])
def test_odd_images_read_as_a_viewer_shows_them(case, base, tmp_path):
    """The pixels read from each odd-but-valid encoding match the original's (grey for the grey formats;
    the EXIF-rotated JPEG upright, not on its side)."""
    data = with_image(base, tmp_path, VICTIM, case)
    ref = read_image(base / "images" / f"{VICTIM}.png", 1)
    got = read_image(next((data / "images").glob(f"{VICTIM}.*")), 1)
    assert got.shape == ref.shape
    tol = 0.12 if case in ("cmyk-jpeg", "exif-rotated-jpeg", "palette-png") else 0.02  # lossy encodings
    if case == "float-tiff":  # float images are min-max scaled: compare after the same scaling
        ref = (ref - ref.min()) / (ref.max() - ref.min()) * 2 - 1
    assert float(np.abs(got - ref).mean()) < tol, float(np.abs(got - ref).mean())


@pytest.mark.parametrize("case", MASK_CASES)
def test_finetune_and_evaluate_refuse_each_broken_mask(case, base, tiny_recipe, trained, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(base, data)
    for stem in (VICTIM, TEST_VICTIM):  # one train mask for finetune, one test mask for evaluate
        mask = np.asarray(Image.open(base / "masks" / f"{stem}.png"))
        MASK_CASES[case](mask, data / "masks" / f"{stem}.png")
    out = tmp_path / "ft"
    refused(["finetune", "--data", str(data), "--out", str(out), "--strategy", "scratch", "--labels", "4", "--num-classes",
             "3", "--recipe", str(tiny_recipe), *TRAIN], out, capsys, VICTIM)
    out = tmp_path / "ev"
    refused(["evaluate", "--model", str(trained), "--data", str(data), "--out", str(out), "--device", "cpu"],
            out, capsys, TEST_VICTIM)


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_evaluate_and_predict_on_each_image_case(case, base, trained, tmp_path, capsys):
    data = with_image(base, tmp_path, TEST_VICTIM, case)
    broken = IMAGE_CASES[case][2]
    image = next((data / "images").glob(f"{TEST_VICTIM}.*"))
    ev = ["evaluate", "--model", str(trained), "--data", str(data), "--out", str(tmp_path / "ev"), "--device", "cpu"]
    pr = ["predict", "--model", str(trained), "--input", str(image), "--out", str(tmp_path / "pr"), "--device", "cpu"]
    if broken:
        refused(ev, tmp_path / "ev", capsys, TEST_VICTIM)
        refused(pr, tmp_path / "pr", capsys, TEST_VICTIM)
        return
    assert main(ev) == 0, capsys.readouterr().err[-2000:]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n_images"] == 2
    assert main(pr) == 0, capsys.readouterr().err[-2000:]
    mask = np.asarray(Image.open(tmp_path / "pr" / f"{TEST_VICTIM}.png"))
    assert mask.shape == (40, 48)  # the displayed size, not the stored one (EXIF) or the network's 16²


@pytest.mark.parametrize("cmd", ["pretrain", "finetune", "predict"])
def test_empty_and_missing_folders(cmd, trained, tiny_recipe, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    out = tmp_path / "out"
    for data in (empty, empty / "images", tmp_path / "missing"):
        if cmd == "predict":
            argv = ["predict", "--model", str(trained), "--input", str(data), "--out", str(out), "--device", "cpu"]
        else:
            argv = [cmd, "--data", str(data), "--out", str(out), "--recipe", str(tiny_recipe), *TRAIN]
            argv += ["--strategy", "scratch", "--labels", "1"] if cmd == "finetune" else []
        refused(argv, out, capsys, data.name)


def random_yaml(rng: random.Random, depth: int = 0):
    """A random YAML value: scalars, lists and maps, with keys from the study schema and from nowhere."""
    keys = ["data", "methods", "strategies", "labels", "seeds", "select", "finetune", "metrics", "protocols",
            "path", "size", "recipe", "name", "pretrain_steps", "overrides", "split", "prepare", "bogus"]
    scalars = [None, True, 0, -3, 2.5, 1e9, "", "ddpm", "../nowhere", "all", [1, "two"], {"x": 1}]
    if depth > 2 or rng.random() < 0.3:
        return rng.choice(scalars)
    if rng.random() < 0.4:
        return [random_yaml(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(keys): random_yaml(rng, depth + 1) for _ in range(rng.randint(1, 5))}


def test_random_study_yamls(base, tmp_path, capsys):
    rng = random.Random(14)
    docs = [random_yaml(rng) for _ in range(40)]
    docs += [{"data": {"path": str(base)}, "methods": "ddpm"}, {"data": {"path": str(base)}, "labels": [0]},
             "just a string", [1, 2, 3]]
    texts = [yaml.safe_dump(d) for d in docs] + [":\n  - [unclosed", "\t\tkey: tab-indented", "\x00\x01binary"]
    for i, text in enumerate(texts):
        path = tmp_path / f"study_{i}.yaml"
        path.write_text(text)
        out = tmp_path / f"out_{i}"
        refused(["study", str(path), "--out", str(out), "--dry-run"], out, capsys, path.name)
