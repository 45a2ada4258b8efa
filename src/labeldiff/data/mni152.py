"""The MNI152 brain template as a labeled volume dataset, built from files that ship inside nilearn (no
download): the data of ``labeldiff demo`` and of the example studies (``prepare: brain-demo``).

The MNI ICBM152 2009c nonlinear symmetric template (T1 volume, grey- and white-matter probability maps,
BSD-3) lies under ``nilearn/datasets/data/``. The maps are thresholded at 0.5 into 3 classes (0
background/CSF, 1 grey matter, 2 white matter) and written with the T1 as an nnU-Net v2 raw dataset
(NIfTI, float intensities), with a ``split.json`` of two axial slabs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from labeldiff.errors import SetupError

CLASS_NAMES = ["background/CSF", "grey matter", "white matter"]


def template_files() -> dict[str, Path]:
    """Paths of the MNI152 files inside the installed nilearn package (no download)."""
    import nilearn

    root = Path(nilearn.__file__).parent / "datasets" / "data"
    files = {k: root / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SetupError(f"nilearn is installed but lacks {missing[0]}; reinstall it with `pip install nilearn`")
    return files


CASE = "mni152"
TRAIN_FRACTION, GAP = 0.4, 4


def build_brain_dataset(out: Path) -> Path:
    """Write the template as an nnU-Net v2 raw dataset (``imagesTr/mni152_0000.nii.gz``,
    ``labelsTr/mni152.nii.gz``, ``dataset.json``) with a ``split.json`` of two axial slabs: the lower
    40 % of the labeled slices train, the rest after a gap of 4 test."""
    import nibabel as nib

    from labeldiff.data.splits import write_split
    from labeldiff.fs import atomic_write_text

    files = template_files()
    gm = np.asarray(nib.load(str(files["gm"])).dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(nib.load(str(files["wm"])).dataobj, dtype=np.float32) / 255.0
    labels = np.zeros(gm.shape, dtype=np.uint8)
    labels[(gm >= 0.5) & (gm >= wm)] = 1
    labels[(wm >= 0.5) & (wm > gm)] = 2
    t1 = nib.load(str(files["t1"]))
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj, dtype=np.float32), t1.affine), str(out / "imagesTr" / f"{CASE}_0000.nii.gz"))
    nib.save(nib.Nifti1Image(labels, t1.affine), str(out / "labelsTr" / f"{CASE}.nii.gz"))
    atomic_write_text(out / "dataset.json", json.dumps({
        "name": "MNI ICBM152 2009c (nilearn, BSD-3)", "channel_names": {"0": "T1"},
        "labels": {name: i for i, name in enumerate(CLASS_NAMES)}, "numTraining": 1, "file_ending": ".nii.gz"},
        indent=2))
    write_split(out, out / "split.json", slab_train=TRAIN_FRACTION, gap=GAP, axis=2, overwrite=True)
    return out


