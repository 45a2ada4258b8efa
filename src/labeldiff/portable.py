"""How an image becomes what the network sees, and how its prediction goes back: the code labeldiff runs
and the code an exported MONAI bundle runs, one file for both.

This module imports nothing of labeldiff (only numpy, torch and, for volumes, nibabel), so
``labeldiff export`` copies it as it is into a bundle's ``scripts/`` folder, and the bundle predicts with
exactly the steps ``labeldiff predict`` takes, in a Python that has no labeldiff installed. labeldiff's
readers, datasets and volume prediction call the functions here.

- 2D images: :func:`pixels_to_input` (pixel array → ``[C, H, W]`` in [-1, 1]), :func:`network_hw` and
  :func:`resize_image` (to the network's scale), then logits back to the image's size.
- Volumes: :func:`canonical` (the RAS frame), :func:`apply_intensity` (the run's intensity scheme),
  :func:`to_display` / :func:`from_display` (a slice → the padded square image the network saw, and back).
- For a MONAI bundle: the dictionary transforms :class:`ImageInputd`, :class:`VolumeInputd`, :class:`SaveLabelsd`,
  :class:`ToNetworkd`, :class:`FromNetworkd` and the inferer :class:`BatchInferer`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R 601: RGB → grey
PERCENTILES = (0.5, 99.5)  # the per-volume clipping (nnU-Net's CT scheme, the CT paper's)


# ------------------------------------------------------------------------------------------- 2D images

def pixels_to_input(arr: np.ndarray, channels: int) -> np.ndarray:
    """A decoded image's pixels (``[H, W]`` or ``[H, W, C]``) → float32 ``[channels, H, W]`` in [-1, 1].

    8-bit images are divided by 255, 16-bit by 65535; float images are min-max scaled. RGB → 1 channel uses
    ITU-R 601 luminance; 1 → 3 channels repeats the grey level; alpha is dropped. Raises ValueError for
    channel counts it cannot convert."""
    if arr.dtype == np.uint8:
        x = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
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
    if channels == 1 and c == 3:
        x = x @ np.array(LUMINANCE, dtype=np.float32)[:, None]
    elif channels == 3 and c == 1:
        x = np.repeat(x, 3, axis=2)
    elif channels != c:
        raise ValueError(f"has {c} channels, cannot convert to {channels}; set --channels {c}")
    return np.ascontiguousarray(x.transpose(2, 0, 1) * 2.0 - 1.0, dtype=np.float32)


def network_hw(hw: tuple[int, int], mode: str, size: int, scale: float) -> tuple[int, int]:
    """The size an image of size ``hw`` is brought to before the network sees it: ``size``² in resize mode;
    in crop mode the image scaled by ``scale``, enlarged so its short side is at least ``size``."""
    if mode == "resize":
        return size, size
    h, w = max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale))
    if min(h, w) < size:  # too small for a crop: enlarge so the short side equals the crop
        f = size / min(h, w)
        h, w = max(size, round(h * f)), max(size, round(w * f))
    return h, w


def resize_image(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased) resize of ``[C, H, W]`` or ``[B, C, H, W]``."""
    squeeze = x.dim() == 3
    y = x[None] if squeeze else x
    if tuple(y.shape[-2:]) != tuple(hw):
        y = F.interpolate(y, size=tuple(hw), mode="bilinear", antialias=True, align_corners=False)
    return y[0] if squeeze else y


def logits_to_size(logits: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Logits ``[..., K, h, w]`` at the network's size → at ``hw`` (bilinear), as labeldiff predicts."""
    if tuple(logits.shape[-2:]) == tuple(hw):
        return logits
    squeeze = logits.dim() == 3
    y = logits[None] if squeeze else logits
    y = F.interpolate(y.float(), size=tuple(hw), mode="bilinear", align_corners=False)
    return y[0] if squeeze else y


# --------------------------------------------------------------------------------------------- volumes

def square(a: np.ndarray, fill) -> np.ndarray:
    """Pad a 2D slice to a centred square so that resizing keeps the aspect ratio."""
    h, w = a.shape
    n = max(h, w)
    out = np.full((n, n), fill, dtype=a.dtype)
    top, left = (n - h) // 2, (n - w) // 2
    out[top:top + h, left:left + w] = a
    return out


def to_display(x: np.ndarray, fill=0) -> np.ndarray:
    """A slice in the volume's voxel order → the 2D image the slice datasets hold: rotated 90° (so an
    axial NIfTI slice shows anterior up) and padded to a centred square (``fill`` outside)."""
    return square(np.rot90(x), fill)


def from_display(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Undo :func:`to_display` for a slice of ``shape`` (voxel order); leading axes (classes) are kept."""
    h, w = shape[1], shape[0]  # rot90 swaps the axes
    n = max(h, w)
    if img.shape[-2:] != (n, n):
        raise ValueError(f"expected a {n}×{n} display image for a {shape} slice, got {img.shape[-2:]}")
    top, left = (n - h) // 2, (n - w) // 2
    return np.rot90(img[..., top:top + h, left:left + w], k=-1, axes=(-2, -1))


def volume_percentiles(x, percentiles: tuple[float, float] = PERCENTILES) -> tuple[float, float]:
    """The 0.5 / 99.5 percentiles of a volume from every second voxel along each axis."""
    lo, hi = np.percentile(np.asarray(x[::2, ::2, ::2], dtype=np.float32), percentiles)
    return float(lo), float(hi)


def apply_intensity(x: np.ndarray, scheme: str, lo: float = -np.inf, hi: float = np.inf, mean: float = 0.0,
                    std: float = 1.0) -> np.ndarray:
    """Normalise a whole volume by ``scheme`` (labeldiff.data.nnunet.Intensity names them): percentile (its
    own 0.5/99.5 percentiles to [-1, 1]), ct-window and dataset-percentile ([lo, hi] to [-1, 1]),
    ct-percentile (clip to [lo, hi], then (x − mean) / std), zscore (the non-zero voxels' mean and std), none."""
    x = np.asarray(x, dtype=np.float32)
    if scheme == "percentile":
        lo, hi = volume_percentiles(x)
        return (np.clip((x - lo) / max(hi - lo, 1e-8), 0, 1) * 2 - 1).astype(np.float32)
    if scheme in ("ct-window", "dataset-percentile"):
        return ((np.clip(x, lo, hi) - lo) / max(hi - lo, 1e-8) * 2 - 1).astype(np.float32)
    if scheme == "ct-percentile":
        return ((np.clip(x, lo, hi) - mean) / max(std, 1e-8)).astype(np.float32)
    if scheme == "zscore":
        inside = x[x != 0]
        if inside.size == 0:
            return np.zeros_like(x)
        return ((x - inside.mean()) / max(float(inside.std()), 1e-8)).astype(np.float32)
    return x


def canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(array in RAS, its affine, the orientation back to the input's voxel order)``: axes permuted and
    flipped with nibabel's orientation tools, so every voxel keeps its position in mm."""
    from nibabel import orientations as o

    src, ras = o.io_orientation(affine), o.axcodes2ornt("RAS")
    to_ras = o.ornt_transform(src, ras)
    out = np.ascontiguousarray(o.apply_orientation(array, to_ras))
    return out, affine @ o.inv_ornt_aff(to_ras, array.shape), o.ornt_transform(ras, src)


def from_canonical(array: np.ndarray, back: np.ndarray) -> np.ndarray:
    """Undo :func:`canonical` on an array of the RAS frame (a prediction) → the input's voxel order."""
    from nibabel import orientations as o

    return np.ascontiguousarray(o.apply_orientation(array, back))


def slice_images(volumes: list[np.ndarray], axis: int, channels: int, fills: list[float]) -> np.ndarray:
    """``[N, C, n, n]``: every slice along ``axis`` of the normalised channel volumes as :func:`to_display`
    makes it (``fills``: each volume's lowest value), grey repeated to 3 channels where the network reads RGB."""
    n = volumes[0].shape[axis]
    out = np.stack([np.stack([to_display(np.take(v, i, axis=axis), fill=f) for v, f in zip(volumes, fills)])
                    for i in range(n)]).astype(np.float32)
    if out.shape[1] != channels:
        if channels == 3 and out.shape[1] == 1:
            return np.repeat(out, 3, axis=1)
        raise ValueError(f"the volume has {out.shape[1]} channel(s) but the network reads {channels}")
    return out


# ------------------------------------------------------------------------- a MONAI bundle's transforms

def _array(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class ImageInputd:
    """``data[key]``: the pixels MONAI's PILReader decoded (``reverse_indexing=False``: rows first) →
    ``[C, H, W]`` float32 in [-1, 1]; ``data["labeldiff_hw"]``: the image's size, for :class:`FromNetworkd`."""

    def __init__(self, key: str, channels: int):
        self.key, self.channels = key, channels

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        x = pixels_to_input(_array(d[self.key]), self.channels)
        d[self.key], d["labeldiff_hw"] = torch.from_numpy(x), tuple(x.shape[-2:])
        return d


class VolumeInputd:
    """``data[key]``: a volume MONAI's NibabelReader decoded (its affine in ``data[key + "_meta_dict"]``) →
    every slice along ``axis`` of the RAS frame as the network input ``[N, C, n, n]``, normalised by the run's
    intensity scheme; the orientation back and the slice shape are kept for :class:`FromNetworkd`."""

    def __init__(self, key: str, channels: int, axis: int, intensity: dict):
        self.key, self.channels, self.axis, self.intensity = key, channels, axis, dict(intensity)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        meta = d[f"{self.key}_meta_dict"]
        affine = _array(meta.get("original_affine", meta.get("affine"))).astype(np.float64)
        array = _array(d[self.key]).astype(np.float32)
        if array.ndim == 4 and array.shape[-1] == 1:
            array = array[..., 0]
        ras, _, back = canonical(array, affine)
        it = {k: (v if v is not None else (-np.inf if k == "lo" else np.inf)) for k, v in self.intensity.items()
              if k in ("lo", "hi", "mean", "std")}
        vol = apply_intensity(ras, self.intensity.get("scheme", "percentile"), **it)
        slices = slice_images([vol], self.axis, self.channels, [float(vol.min())])
        plane = tuple(n for i, n in enumerate(vol.shape) if i != self.axis)
        d[self.key] = torch.from_numpy(slices)
        d["labeldiff_hw"] = tuple(slices.shape[-2:])
        d["labeldiff_volume"] = {"axis": self.axis, "plane": plane, "shape": vol.shape, "back": back}
        return d


class ToNetworkd:
    """``data[key]`` ``[C, H, W]`` (or a stack of slices ``[N, C, H, W]``) → the network's scale
    (:func:`network_hw`, :func:`resize_image`)."""

    def __init__(self, key: str, mode: str, size: int, scale: float):
        self.key, self.mode, self.size, self.scale = key, mode, size, scale

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        x = torch.as_tensor(d[self.key]).float()
        d[self.key] = resize_image(x, network_hw(tuple(x.shape[-2:]), self.mode, self.size, self.scale))
        return d


class FromNetworkd:
    """``data[key]``: logits at the network's scale → the label map at the input's size (bilinear, then the
    argmax), as ``labeldiff predict`` writes it: ``[1, H, W]`` for an image; for a volume, every slice put back
    (:func:`from_display`) and the volume returned to the input's voxel order, ``[1, X, Y, Z]``."""

    def __init__(self, key: str = "pred"):
        self.key = key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        logits = logits_to_size(torch.as_tensor(d[self.key]).float(), _ints(d["labeldiff_hw"]))
        labels = logits.argmax(-3).cpu().numpy().astype(np.int16)
        vol = d.get("labeldiff_volume")
        if vol is None:
            d[self.key] = torch.from_numpy(labels[None])
            return d
        axis, plane = _ints(vol["axis"])[0], _ints(vol["plane"])
        out = np.zeros(_ints(vol["shape"]), np.int16)
        for i, lab in enumerate(labels):
            index = [slice(None)] * 3
            index[axis] = i
            out[tuple(index)] = from_display(lab, plane)
        d[self.key] = torch.from_numpy(from_canonical(out, _array(vol["back"]).reshape(3, 2))[None])
        return d


def _ints(x) -> tuple[int, ...]:
    """A size or index as ints, also after a DataLoader collated it into tensors (and MONAI decollated it)."""
    if isinstance(x, (list, tuple)):
        return tuple(int(v) for item in x for v in np.asarray(_array(item)).ravel())
    return tuple(int(v) for v in np.asarray(_array(x)).ravel())


class BatchInferer:
    """Runs ``inner`` (a MONAI inferer) on one image ``[1, C, H, W]`` as it is, or on a volume's slices
    ``[1, N, C, H, W]`` in chunks of ``chunk`` slices; returns ``[1, K, H, W]`` or ``[1, N, K, H, W]``."""

    def __init__(self, inner, chunk: int = 16):
        self.inner, self.chunk = inner, chunk

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        if inputs.dim() == 4:
            return self.inner(inputs, network, *args, **kwargs)
        x = inputs[0]
        outs = [self.inner(x[s:s + self.chunk], network, *args, **kwargs) for s in range(0, len(x), self.chunk)]
        return torch.cat(outs)[None]


class SaveLabelsd:
    """Write ``data[key]`` (the label map of :class:`FromNetworkd`) beside the input's name in ``output_dir``:
    ``NAME_seg.png`` (8-bit, pixel value = class) for an image, ``NAME_seg.nii.gz`` (int16, the input's
    affine) for a volume."""

    def __init__(self, key: str, output_dir: str, source_key: str = "image"):
        self.key, self.output_dir, self.source_key = key, output_dir, source_key

    def __call__(self, data: dict) -> dict:
        import os

        meta = data[f"{self.source_key}_meta_dict"]
        path = str(meta["filename_or_obj"])
        name = os.path.basename(path)
        for ext in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
            if name.lower().endswith(ext):
                name = name[: -len(ext)]
                break
        labels = _array(data[self.key])[0]
        os.makedirs(self.output_dir, exist_ok=True)
        if labels.ndim == 3:
            import nibabel as nib

            affine = _array(meta.get("original_affine", meta.get("affine"))).astype(np.float64)
            nib.save(nib.Nifti1Image(labels.astype(np.int16), affine),
                     os.path.join(self.output_dir, f"{name}_seg.nii.gz"))
        else:
            from PIL import Image

            Image.fromarray(labels.astype(np.uint8), mode="L").save(os.path.join(self.output_dir, f"{name}_seg.png"))
        return data
