"""A study reuses a run you pretrained by hand (``methods: [{name, run: FOLDER}]``): used as it is, never
retrained or written to, its cells named by the hash of its identity; refused, with the reason, when its data
geometry is not the cells' or it read the study's test images."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

import labeldiff.study.runner as runner
from labeldiff.cli import main
from labeldiff.study.spec import StudyError, load_study

from conftest import write_labeled_dataset

PRE = ["--size", "16", "--steps", "2", "--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--channels",
       "3", "--unet-channels", "8,16", "--attention", "0,0", "--head-channels", "8", "--checkpoint-every", "100"]
FT = {"train": {"steps": 2, "batch_size": 2, "precision": "fp32", "device": "cpu", "checkpoint_every": 100},
      "transfer": {"head_hidden": 8, "augment": "none"}}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """data/ (6 images, K=3, 4 train / 2 test), ft.yaml, and two runs pretrained by hand: pre/ (the test
    images left out) and leaky/ (--include-test)."""
    root = tmp_path_factory.mktemp("reuse")
    write_labeled_dataset(root / "data", n=6, k=3)
    (root / "ft.yaml").write_text(yaml.safe_dump(FT))
    for name, extra in (("pre", []), ("leaky", ["--include-test"])):
        assert main(["pretrain", "--data", str(root / "data"), "--out", str(root / name), *PRE, *extra]) == 0
    return root


def study_file(root: Path, run: str = "pre", name: str = "s.yaml", **changes) -> Path:
    s = {"data": {"path": "data", "size": 16, "channels": 3}, "methods": [{"name": "mine", "run": run}],
         "strategies": ["full", "scratch"], "labels": [2], "seeds": [0], "finetune": {"recipe": "ft.yaml"}}
    s.update(changes)
    (root / name).write_text(yaml.safe_dump(s))
    return root / name


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cell_ids(capsys, path: Path, out: Path) -> list[str]:
    capsys.readouterr()
    runner.run_study(path, out, dry_run=True)
    return [ln.split()[1] for ln in capsys.readouterr().out.splitlines() if ln.startswith(("  todo", "  done"))]


@pytest.mark.slow
def test_a_study_fine_tunes_the_run_you_pretrained_and_never_writes_to_it(root, tmp_path, capsys):
    pre = root / "pre"
    before = digests(pre)
    path = study_file(root)
    ids = cell_ids(capsys, path, tmp_path / "a")
    assert cell_ids(capsys, path, tmp_path / "elsewhere") == ids  # named by the run's identity, not by where
    mine = [c for c in ids if c.startswith("mine-full-k2-s0-random-")]
    assert len(mine) == 1 and any(c.startswith("none-scratch-") for c in ids)
    out = tmp_path / "a"
    assert main(["study", str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"mine: your run {pre}, used as it is" in text and "[pretrain 1/1] mine: your run, used as it is" in text
    assert not (out / "pretrain").exists()  # nothing pretrained
    assert digests(pre) == before  # nor written into the run
    cell = out / "cells" / mine[0]
    cfg = json.loads((cell / "run" / "config.json").read_text())
    assert cfg["transfer"]["pretrained"] == str(pre) and cfg["model"]["channels"] == [8, 16]
    assert (cell / "eval" / "metrics.json").is_file()
    assert cell_ids(capsys, path, out) == ids  # planned again: the same cells, now done


def test_a_run_at_another_geometry_is_refused_with_the_values(root, tmp_path):
    path = study_file(root, name="size.yaml", data={"path": "data", "size": 32, "channels": 3})
    with pytest.raises(StudyError, match=r"methods \(mine\)\.run: .*pre was pretrained at another data geometry .*"
                                         r"data\.size: the run 16, the cells 32"):
        runner.run_study(path, tmp_path / "out", dry_run=True)
    assert not (tmp_path / "out" / "cells").exists()


def test_a_run_that_read_the_test_images_is_refused(root, tmp_path):
    path = study_file(root, run="leaky", name="leaky.yaml")
    with pytest.raises(StudyError, match=r"read 2 of the study's 2 test images when it was pretrained \(img_04, "
                                         r"img_05\)"):
        runner.run_study(path, tmp_path / "out", dry_run=True)
    shutil.copytree(root / "pre", tmp_path / "old")
    (tmp_path / "old" / "trained_on.json").unlink()  # a run written before the record: it cannot be checked
    with pytest.raises(StudyError, match="has no trained_on.json"):
        runner.run_study(study_file(root, run=str(tmp_path / "old"), name="old.yaml"), tmp_path / "out", dry_run=True)


def test_what_a_run_key_cannot_be(root, tmp_path):
    with pytest.raises(StudyError, match=r"methods\[0\] \(mine\): 'recipe' with run: a run of your own is used as it "
                                         r"is"):
        load_study(study_file(root, name="r.yaml", methods=[{"name": "mine", "run": "pre", "recipe": "ddpm-cpu"}]))
    with pytest.raises(StudyError, match=r"methods\[0\] \(mine\)\.run: .*data: no config.json there"):
        load_study(study_file(root, run="data", name="d.yaml"))
    shutil.copytree(root / "pre", tmp_path / "unfinished")
    (tmp_path / "unfinished" / "model.safetensors").unlink()
    with pytest.raises(StudyError, match=r"is not finished \(no model\.safetensors\); finish it first"):
        load_study(study_file(root, run=str(tmp_path / "unfinished"), name="u.yaml"))
