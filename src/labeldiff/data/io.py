"""Reading one image or one mask from disk, with errors that name the file and the fix."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class DataError(ValueError):
    """Bad input data. The message is one line: the file, what is wrong, how to fix it."""


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: cannot be read as an image ({e}); re-export it as PNG or remove it") from None
    return img


def scan_cache_path() -> Path:
    """Where :func:`check_decodes` remembers the files it decoded (``$LABELDIFF_CACHE`` or ~/.cache/labeldiff)."""
    import os

    return Path(os.environ.get("LABELDIFF_CACHE", Path.home() / ".cache" / "labeldiff")) / "decoded.json"


def check_decodes(paths: list[Path], what: str = "images") -> None:
    """Decode every file once (a truncated PNG has a good header: only decoding finds it), before a run
    folder exists; a DataError names the first bad file. Files decoded before, unchanged (same size and
    mtime), are skipped, so a second run over the same data is instant."""
    import json

    from tqdm.auto import tqdm

    cache_file = scan_cache_path()
    try:
        seen = set(json.loads(cache_file.read_text()))
    except (OSError, ValueError):
        seen = set()

    def key(p: Path) -> str:
        st = p.stat()
        return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    todo = []
    for p in map(Path, paths):
        if not p.is_file():
            raise DataError(f"{p}: file not found")
        if key(p) not in seen:
            todo.append(p)
    for p in tqdm(todo, desc=f"checking {len(todo)} {what}", unit="file", disable=len(todo) < 100):
        _open(p).close()
        seen.add(key(p))
    if todo:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(sorted(seen)))
            tmp.replace(cache_file)
        except OSError:  # a read-only home: the check still ran, it is only not remembered
            pass


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: cannot be read as an image ({e}); re-export it as PNG or remove it") from None
    return h, w


def read_image(path: Path, channels: int) -> np.ndarray:
    """Read an image as float32 ``[C, H, W]`` in [-1, 1] with exactly ``channels`` channels.

    8-bit images are divided by 255, 16-bit by 65535; float images are min-max scaled. RGB → 1
    channel uses ITU-R 601 luminance; 1 → 3 channels repeats the grey level; alpha is dropped.
    """
    img = _open(Path(path))
    if img.mode in ("P", "1", "LA", "PA", "CMYK", "YCbCr", "HSV", "LAB"):
        img = img.convert("RGBA" if "A" in img.mode else "RGB")
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        x = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16 or img.mode.startswith("I;16"):
        x = arr.astype(np.float32) / 65535.0
    else:
        x = arr.astype(np.float32)
        lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.shape[2] in (2, 4):  # grey+alpha or RGBA: drop alpha
        x = x[:, :, :-1]
    c = x.shape[2]
    if channels == c:
        pass
    elif channels == 1 and c == 3:
        x = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None]
    elif channels == 3 and c == 1:
        x = np.repeat(x, 3, axis=2)
    else:
        raise DataError(f"{path}: has {c} channels, cannot convert to {channels}; set --channels {c}")
    return np.ascontiguousarray(x.transpose(2, 0, 1) * 2.0 - 1.0, dtype=np.float32)


def read_mask(path: Path, num_classes: int | None = None, ignore_index: int | None = None) -> np.ndarray:
    """Read an integer class map ``[H, W]`` (int64). Values must be integers in 0..K-1, or ``ignore_index``."""
    path = Path(path)
    img = _open(path)
    arr = np.asarray(img)
    if arr.ndim == 3:
        if arr.shape[2] >= 3 and (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            arr = arr[..., 0]
        else:
            raise DataError(f"{path}: mask is a colour image; save class indices 0..K-1 as a single-channel PNG")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DataError(f"{path}: mask holds non-integer values; masks must be integer class maps 0..K-1")
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    mask = arr.astype(np.int64)
    if mask.min() < 0:
        raise DataError(f"{path}: mask has negative values; masks must be integer class maps 0..K-1")
    labeled = mask if ignore_index is None else mask[mask != ignore_index]
    if num_classes is not None and labeled.size and labeled.max() >= num_classes:
        bad = sorted(int(v) for v in np.unique(labeled) if v >= num_classes)[:5]
        hint = " (a 0/255 binary mask? divide by 255; or --ignore-index 255 if 255 means not labeled)" if 255 in bad else ""
        raise DataError(f"{path}: mask values {bad} are ≥ K={num_classes}{hint}; "
                        f"fix the mask or pass --num-classes {int(mask.max()) + 1}")
    return mask
