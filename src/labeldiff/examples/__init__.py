"""Example studies shipped with labeldiff, addressed by name: ``labeldiff study quick --out OUT``.

- ``quick``: one cell on the MNI152 brain slices that ship inside nilearn (DDPM pretraining of a tiny
  UNet, then full fine-tuning on 2 labeled slices), about a minute on a CPU: a check that everything runs.
- ``demo``: what ``labeldiff demo`` runs: DDPM pretraining of a small UNet on the MNI152 slices, then
  pretrained vs scratch on 2 labeled slices, 3 seeds, scored per slice and as a 3D slab (3–7 minutes).
- ``brain``: the demo's data as a label-efficiency table: probe, full fine-tuning and scratch at
  k = 1, 2, 8, random and diverse picks, 3 seeds.

All build their data with ``prepare: brain-demo``, so they run anywhere labeldiff is installed. Copy
one next to your data and edit it to start a study of your own (:mod:`labeldiff.study.spec` documents
every key).
"""
from __future__ import annotations

from pathlib import Path

from labeldiff.recipes import lookup, names as _names

FOLDER = Path(__file__).resolve().parent


def names() -> list[str]:
    """The shipped example studies' names."""
    return _names(FOLDER)


def find(name_or_path: str | Path) -> Path:
    """The study file for an example's name (``quick``) or a path; see :func:`labeldiff.recipes.lookup`."""
    return lookup(FOLDER, "study", name_or_path)
