"""Runs and studies written by an earlier labeldiff stay valid.

``tests/data/legacy_study`` is a one-pretraining, two-cell study written by labeldiff before its settings
were declared once and resolved by one function, and before run folders carried weight digests, a run
marker and ``trained_on.json``. A study names its cells by the absolute path of their data, so the study
is put back where it was written before it is run again.
"""
from __future__ import annotations

import pytest

import hashlib
import json
import shutil
from pathlib import Path

from labeldiff.cli import main
from labeldiff.config import RunConfig
from labeldiff.pretrain.run import run_pretrain
from labeldiff.runs import RunFolder

LEGACY = Path(__file__).parent / "data" / "legacy_study"
WRITTEN_AT = Path("/tmp/labeldiff-legacy-fixture")


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_study_written_before_keeps_its_cells_and_its_runs_open_evaluate_and_resume(capsys):
    if WRITTEN_AT.exists():
        shutil.rmtree(WRITTEN_AT)
    shutil.copytree(LEGACY, WRITTEN_AT)
    try:
        out = WRITTEN_AT / "out"
        cells = snapshot(out / "cells")
        rows = (out / "results.csv").read_text()
        assert main(["study", str(WRITTEN_AT / "study.yaml"), "--out", str(out)]) == 0
        said = capsys.readouterr().out
        assert "2 cells (2 finished)" in said and "cells: 2 in the study, 2 finished, 0 to run" in said
        now = snapshot(out / "cells")
        added = {k for k in now if "/eval/predictions/" in k}  # the report's viewer images, predicted once
        assert {k: v for k, v in now.items() if k not in added} == cells  # nothing recomputed, nothing rewritten
        assert all(k not in cells for k in added)
        assert (out / "results.csv").read_text() == rows

        cell = next((out / "cells").glob("ddpm-full-*"))
        run = RunFolder.open(cell / "run")
        assert run.kind == "finetune" and run.config.sources is None  # written before sources were recorded
        assert main(["evaluate", "--model", str(cell / "run"), "--out", str(WRITTEN_AT / "ev"), "--device", "cpu"]) == 0
        then = json.loads((cell / "eval" / "metrics.json").read_text())["dice"]["mean"]
        assert json.loads((WRITTEN_AT / "ev" / "metrics.json").read_text())["dice"]["mean"] == then

        pre = next((out / "pretrain").glob("ddpm-*"))
        cfg = RunConfig.load(pre / "config.json")
        cfg.train.steps += 2
        run_pretrain(cfg, pre, resume=True)  # an old run resumes (here: extended by two steps)
        again = RunConfig.load(pre / "config.json")
        assert again.extended == [{"at_step": 2, "from_steps": 2, "to_steps": 4}]
        assert (pre / "model-step2.safetensors").is_file() and (pre / "model.safetensors").is_file()
    finally:
        shutil.rmtree(WRITTEN_AT, ignore_errors=True)
