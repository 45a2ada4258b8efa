"""Reading one image or one mask from disk, with errors that name the file and the fix."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
from labeldiff.portable import pixels_to_input
from PIL import Image, ImageOps, UnidentifiedImageError

from labeldiff.errors import DataError  # re-exported: bad input data, one line naming the file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# the colour of each class id in mask PNGs and overlays: 0 black, then 20 distinct colours (Sasha Trubetskoy's
# list); ids from 21 on get generated colours (:func:`class_colours`)
MASK_COLOURS = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                         [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                         [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
                         [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128], [128, 128, 128]], dtype=np.uint8)
PALETTE_CLASSES = 256  # a PNG palette holds 256 colours; more classes are written as 16-bit grey


BAD_IMAGE = (UnidentifiedImageError, OSError, SyntaxError, ValueError)  # what Pillow raises on a broken file
ORIENTATION = 0x0112  # the EXIF tag phones use instead of rotating the pixels


def _bomb(path: Path, e: Exception) -> DataError:
    return DataError(f"{path}: {e.args[0].split(',')[0]}, more than Pillow will decode (a decompression bomb?); "
                     f"downscale or tile it")


def _missing(path: Path) -> DataError:
    """Why ``path`` cannot be opened as a file, in words: a folder, a link that loops or leads nowhere, or absent."""
    path = Path(path)
    if path.is_dir():
        return DataError(f"{path}: a folder, not an image file; move it out of the image folder")
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return DataError(f"{path}: a symbolic link that loops back on itself; replace it with the file")
            return DataError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist; fix or remove it")
    return DataError(f"{path}: file not found")


def _open(path: Path) -> Image.Image:
    """The decoded image, upright as a viewer shows it (EXIF orientation applied). A multi-page TIFF is
    refused: which page is meant cannot be guessed."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        img = Image.open(path)
        pages = getattr(img, "n_frames", 1) if img.format == "TIFF" else 1
        signed = img.format == "TIFF" and img.mode == "L" and img.tag_v2.get(339) in (2, (2,))  # SampleFormat
        img.load()
        img = ImageOps.exif_transpose(img)
        img.info["labeldiff_signed"] = signed
    except FileNotFoundError:
        raise _missing(path) from None
    except Image.DecompressionBombError as e:
        raise _bomb(path, e) from None
    except BAD_IMAGE as e:
        raise DataError(f"{path}: cannot be read as an image ({e}); re-export it as PNG or remove it") from None
    if pages > 1:
        raise DataError(f"{path}: a TIFF of {pages} pages; labeldiff reads one image per file: save the page you "
                        f"mean on its own (e.g. `tiffsplit`, or ImageJ's Stack to Images)")
    return img


def _pixels(img: Image.Image) -> np.ndarray:
    """The pixel array of a decoded image, signed 8-bit TIFFs read as signed (Pillow reads them as unsigned:
    a −1 would become 255)."""
    arr = np.asarray(img)
    if arr.dtype == np.uint8 and img.info.get("labeldiff_signed"):
        arr = arr.view(np.int8)
    return arr


def _finite(path: Path, arr: np.ndarray) -> None:
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise DataError(f"{path}: pixel (row {bad[0]}, column {bad[1]}) is {arr[tuple(bad)]}; images must hold finite "
                        f"values: replace NaN and infinite pixels (e.g. with 0) and save it again")


def scan_cache_path(name: str = "decoded-v2.json") -> Path:
    """Where the input scans remember what they found (``$LABELDIFF_CACHE`` or ~/.cache/labeldiff)."""
    return Path(os.environ.get("LABELDIFF_CACHE", Path.home() / ".cache" / "labeldiff")) / name


class ScanCache:
    """What a scan found per file, keyed by the file's resolved path, size and mtime: a changed file is
    scanned again, an unchanged one never. Kept as one JSON file; a read-only or missing cache folder
    only means nothing is remembered."""

    def __init__(self, name: str):
        self.file = scan_cache_path(name)
        try:
            self.found = dict(json.loads(self.file.read_text()))
        except (OSError, ValueError, TypeError):
            self.found = {}
        self.changed = False

    @staticmethod
    def key(p: Path) -> str:
        st = p.stat()
        return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def get(self, p: Path):
        return self.found.get(self.key(p))

    def put(self, p: Path, value) -> None:
        self.found[self.key(p)] = value
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.found, sort_keys=True))
            tmp.replace(self.file)
        except OSError:  # a read-only home: the scan still ran, it is only not remembered
            pass


def _progress(items: list, desc: str, unit: str = "file"):
    """A progress bar over ``items`` when there are enough of them to take a while (≥ 100 files)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, disable=len(items) < 100, leave=False)


def check_decodes(paths: list[Path], what: str = "images") -> None:
    """Decode every file once (a truncated PNG has a good header: only decoding finds it), before a run
    folder exists; a DataError names the first bad file. Files decoded before, unchanged (same size and
    mtime), are skipped, so a second run over the same data is instant."""
    cache = ScanCache("decoded-v2.json")
    todo = []
    for p in map(Path, paths):
        if not p.is_file():
            raise _missing(p)
        if cache.get(p) is None:
            todo.append(p)
    try:
        for p in _progress(todo, f"checking {len(todo)} {what}"):
            img = _open(p)
            if img.mode in ("F", "I") or img.mode.startswith("I;"):  # float pixels may be NaN or infinite
                _finite(p, _pixels(img).astype(np.float64) if img.mode != "F" else _pixels(img))
            img.close()
            cache.put(p, 1)
    finally:
        cache.save()  # what was checked before a bad file stays checked


def mask_values(paths: list[Path]) -> list[list[int]]:
    """The sorted distinct values of each mask file, read once (a DataError names a colour, non-integer
    or negative mask) and remembered by size and mtime, so the K check of a second run is instant."""
    cache = ScanCache("mask_values-v2.json")
    out: list[list[int] | None] = [cache.get(Path(p)) if Path(p).is_file() else None for p in paths]
    todo = [i for i, v in enumerate(out) if v is None]
    try:
        for i in _progress(todo, f"scanning {len(todo)} masks"):
            out[i] = np.unique(read_mask(Path(paths[i]))).tolist()
            cache.put(Path(paths[i]), out[i])
    finally:
        cache.save()
    return out  # type: ignore[return-value]


def check_mask_values(path: Path, values: list[int], num_classes: int, ignore_index: int | None,
                      hint: str | None = None) -> None:
    """The error :func:`read_mask` gives for values ≥ K, from a mask's known values. ``hint``: the fix to
    name instead of ``--num-classes`` (evaluate, whose K is the run's)."""
    bad = [v for v in values if v >= num_classes and v != ignore_index][:5]
    if bad:
        why = " (a 0/255 binary mask? divide by 255; or --ignore-index 255 if 255 means not labeled)" if 255 in bad else ""
        fix = hint or f"fix the mask or pass --num-classes {max(values) + 1}"
        raise DataError(f"{path}: mask values {bad} are ≥ K={num_classes}{why}; {fix}")


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) as a viewer shows the image (EXIF orientation applied), from the file header
    without decoding the pixels."""
    if not Path(path).is_file():
        raise _missing(Path(path))
    try:
        with Image.open(path) as img:
            w, h = img.size
            turned = img.getexif().get(ORIENTATION) in (5, 6, 7, 8)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Image.DecompressionBombError as e:
        raise _bomb(path, e) from None
    except BAD_IMAGE as e:
        raise DataError(f"{path}: cannot be read as an image ({e}); re-export it as PNG or remove it") from None
    return (w, h) if turned else (h, w)


def read_image(path: Path, channels: int) -> np.ndarray:
    """Read an image as float32 ``[C, H, W]`` in [-1, 1] with exactly ``channels`` channels.

    8-bit images are divided by 255, 16-bit by 65535; float images are min-max scaled. RGB → 1
    channel uses ITU-R 601 luminance; 1 → 3 channels repeats the grey level; alpha is dropped.
    """
    img = _open(Path(path))
    if img.mode in ("P", "1", "LA", "PA", "CMYK", "YCbCr", "HSV", "LAB"):
        img = img.convert("RGBA" if "A" in img.mode else "RGB")
    arr = _pixels(img)
    _finite(Path(path), arr)
    if img.mode.startswith("I;16") and arr.dtype != np.uint16:
        arr = arr.astype(np.uint16)
    try:
        return pixels_to_input(arr, channels)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None


def read_mask(path: Path, num_classes: int | None = None, ignore_index: int | None = None) -> np.ndarray:
    """Read an integer class map ``[H, W]`` (int64). Values must be integers in 0..K-1, or ``ignore_index``."""
    path = Path(path)
    img = _open(path)
    arr = _pixels(img)
    if arr.ndim == 3 and arr.shape[2] in (2, 4):  # grey + alpha, RGBA: an opaque alpha carries nothing
        if not np.all(arr[..., -1] == np.iinfo(arr.dtype).max if arr.dtype.kind in "ui" else arr[..., -1] == 1):
            raise DataError(f"{path}: mask has a transparency (alpha) channel that is not fully opaque; save the class "
                            f"indices 0..K-1 as a single-channel PNG without alpha")
        arr = arr[..., :-1]
    if arr.ndim == 3:
        if arr.shape[2] == 1 or (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
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
    if num_classes is not None and mask.max() >= num_classes:
        check_mask_values(path, np.unique(mask).tolist(), num_classes, ignore_index)
    return mask


def class_colours(n: int) -> np.ndarray:
    """``[n, 3]`` uint8, the colour of class ids 0..n-1: :data:`MASK_COLOURS` first, then colours stepped
    round the hue circle by the golden ratio at three saturation and four brightness levels. The first
    :data:`PALETTE_CLASSES` are distinct and only class 0 is black."""
    import colorsys

    out = [tuple(int(v) for v in c) for c in MASK_COLOURS[:n]]
    seen = set(out)
    i = len(out)
    while len(out) < n:
        h, s, v = (i * 0.6180339887) % 1.0, (0.95, 0.7, 0.5)[i % 3], (1.0, 0.85, 0.7, 0.55)[(i // 3) % 4]
        c = tuple(int(round(x * 255)) for x in colorsys.hsv_to_rgb(h, s, v))
        i += 1
        if c in seen and len(out) < PALETTE_CLASSES:  # the palette's colours stay distinct
            continue
        seen.add(c)
        out.append(c)
    return np.array(out, dtype=np.uint8).reshape(n, 3)


def write_mask(mask: np.ndarray, path: Path, num_classes: int) -> str:
    """Write the class ids ``mask [H, W]`` (0..num_classes-1) as a PNG that viewers show in colour and
    :func:`read_mask` (``np.asarray(Image.open(path))``) reads as the ids: a palette PNG (mode "P", the
    pixel values are the ids, the palette colours them, class 0 black) up to :data:`PALETTE_CLASSES`
    classes, a 16-bit grey PNG above (a palette holds 256 colours). Returns the format written, in words."""
    mask = np.asarray(mask)
    if mask.size and (mask.min() < 0 or mask.max() >= num_classes):
        raise ValueError(f"class ids {int(mask.min())}..{int(mask.max())} outside 0..{num_classes - 1}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if num_classes <= PALETTE_CLASSES:
        img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))  # mode "L" ...
        img.putpalette(class_colours(num_classes).tobytes(), rawmode="RGB")  # ... becomes "P": same bytes, coloured
        img.save(path, compress_level=1)
        return "palette PNG"
    if num_classes > 65536:
        raise ValueError(f"{num_classes} classes: a PNG holds at most 65,536 class ids")
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint16)).save(path, compress_level=1)
    return "16-bit grey PNG"
