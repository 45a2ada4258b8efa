"""The package as a user gets it: the wheel is built, installed into a fresh virtual environment outside
the checkout, and run from a temporary folder, so the recipes and the example studies must come from
the installed package data, not from the source tree."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import write_labeled_dataset

REPO = Path(__file__).resolve().parents[1]


def can_build_wheels() -> bool:
    """Whether this environment's setuptools builds a wheel alone (≥ 70.1, or older with `wheel` installed)."""
    try:
        version = tuple(int(x) for x in importlib.metadata.version("setuptools").split(".")[:2] if x.isdigit())
    except importlib.metadata.PackageNotFoundError:
        return False
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


def run(cmd: list, cwd: Path, env: dict, timeout: int = 600) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.mark.slow
def test_the_wheel_runs_outside_the_checkout(tmp_path):
    # build from a copy of the sources, so the checkout gets no build/ or egg-info
    src = tmp_path / "src-copy"
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # this environment's setuptools where it can build the wheel, else pip fetches one into an isolated build
    isolation = ["--no-build-isolation"] if can_build_wheels() else []
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", tmp_path / "dist", src], tmp_path, env)
    wheel = next((tmp_path / "dist").glob("labeldiff-*.whl"))
    shipped = zipfile.ZipFile(wheel).namelist()
    assert "labeldiff/recipes/ddpm-cpu.yaml" in shipped and "labeldiff/examples/quick.yaml" in shipped

    # a fresh venv that sees this environment's dependencies (torch, MONAI, …) through a .pth file: a path
    # entry, so that environment's own .pth files (an editable labeldiff among them) are not read
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], tmp_path, env)
    py = venv / "bin" / "python"
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "dependencies.pth").write_text("\n".join(deps) + "\n")
    run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp_path, env)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run([py, "-c", "import labeldiff, labeldiff.recipes as r; print(labeldiff.__file__); print(r.FOLDER)"],
                work, env).split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the wheel's labeldiff, not the checkout's

    labeldiff = venv / "bin" / "labeldiff"
    data = write_labeled_dataset(work / "data", n=6, k=3)
    run([labeldiff, "pretrain", "--recipe", "ddpm-cpu", "--steps", "2", "--batch-size", "2", "--size", "32",
         "--data", data, "--out", work / "pre"], work, env)
    assert (work / "pre" / "model.safetensors").is_file()

    out = run([labeldiff, "study", "quick", "--out", work / "quick"], work, env)
    assert "1 cells" in out and (work / "quick" / "results.csv").is_file()
    rows = (work / "quick" / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[0].startswith("cell,")
