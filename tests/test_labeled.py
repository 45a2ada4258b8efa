"""Choose your labels: ``finetune --labeled STEM,STEM…`` or ``--labeled FILE`` trains on exactly those
images of the train split (stored in config.json), ``--labels`` is their count; ``labeldiff select --out``
writes such a file, so select → label → fine-tune is one path."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from labeldiff.cli import main
from labeldiff.data.splits import labeled_stems
from labeldiff.study.spec import StudyError, parse_study

from conftest import write_labeled_dataset

TINY = ["--size", "16", "--steps", "2", "--batch-size", "2", "--precision", "fp32", "--device", "cpu",
        "--checkpoint-every", "100"]
NET = ["--channels", "3", "--unet-channels", "8,16", "--attention", "0,0", "--head-channels", "8"]


def _error(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_a_file_of_stems_reads_select_lines_plain_lines_and_comments(tmp_path):
    picks = tmp_path / "picks.txt"
    picks.write_text("# picked by labeldiff select\nimg_03\t/data/images/img_03.png\n\nimg_01\nimg_03\n")
    assert labeled_stems((str(picks),)) == ("img_03", "img_01")
    assert labeled_stems(("img_02", " img_00", "img_02")) == ("img_02", "img_00")


@pytest.mark.slow
def test_select_then_label_then_finetune_on_exactly_those_images(tmp_path, capsys):
    data = write_labeled_dataset(tmp_path / "data", n=8, k=3, n_train=6)
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "pre"), *TINY, *NET]) == 0
    picks = tmp_path / "to_label.txt"
    assert main(["select", "--pretrained", str(tmp_path / "pre"), "--data", str(data), "--labels", "3",
                 "--out", str(picks)]) == 0
    out = capsys.readouterr().out
    assert f"--labeled {picks}" in out.splitlines()[-1]  # select says how to fine-tune on its picks
    chosen = sorted(line.split("\t")[0] for line in picks.read_text().splitlines())
    assert len(chosen) == 3
    ft = tmp_path / "ft"
    assert main(["finetune", "--data", str(data), "--pretrained", str(tmp_path / "pre"), "--labeled", str(picks),
                 "--out", str(ft), "--head-hidden", "8", *TINY]) == 0
    assert f"3 labeled images {chosen}" in capsys.readouterr().out
    cfg = json.loads((ft / "config.json").read_text())
    assert cfg["transfer"]["labeled"] == chosen and cfg["transfer"]["labels"] == 3  # the stems, not the file
    assert json.loads((ft / "labeled.json").read_text())["stems"] == chosen
    # the same images named on the command line: the same run
    again = tmp_path / "ft2"
    assert main(["finetune", "--data", str(data), "--pretrained", str(tmp_path / "pre"), "--labeled",
                 ",".join(reversed(chosen)), "--labels", "3", "--out", str(again), "--head-hidden", "8", *TINY]) == 0
    assert json.loads((again / "labeled.json").read_text())["stems"] == chosen


def test_images_outside_the_train_split_are_refused_by_name(tmp_path, capsys):
    data = write_labeled_dataset(tmp_path / "data", n=6, k=3)  # train img_00..03, test img_04, img_05
    args = ["finetune", "--data", str(data), "--strategy", "scratch", "--out", str(tmp_path / "ft"), *TINY, *NET]
    assert main([*args, "--labeled", "img_00,img_05,nope"]) == 2
    line = _error(capsys)
    assert "--labeled: img_05, nope are not in the 'train' split" in line and "(img_05 is in 'test')" in line
    assert main([*args, "--labeled", "img_00,img_01", "--labels", "3"]) == 2
    assert "--labels 3 (command line) but --labeled names 2 images (img_00, img_01)" in _error(capsys)
    assert main([*args, "--labeled", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: no such file" in _error(capsys)
    assert not (tmp_path / "ft").exists()


def test_a_study_refuses_named_images_in_its_fine_tuning(tmp_path):
    write_labeled_dataset(tmp_path / "data", n=6, k=3)
    raw = {"data": {"path": str(tmp_path / "data")}, "methods": ["none"], "strategies": ["scratch"], "labels": [1],
           "finetune": {"overrides": {"transfer.labeled": ["img_00"]}}}
    with pytest.raises(StudyError, match="finetune: transfer.labeled names the images of one run"):
        parse_study(yaml.safe_load(yaml.safe_dump(raw)), tmp_path / "s.yaml")
