"""Every command ends by saying where its results are and what a user usually runs next; a study's log
names the folders its files end up in, not the temporary ones they are written in."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from labeldiff.cli import main

from conftest import write_labeled_dataset, write_tiny_study

TINY = ["--size", "16", "--steps", "2", "--batch-size", "2", "--precision", "fp32", "--device", "cpu",
        "--checkpoint-every", "100"]
NET = ["--channels", "3", "--unet-channels", "8,16", "--attention", "0,0", "--head-channels", "8"]


def tail(capsys, n: int = 3) -> str:
    return "\n".join(capsys.readouterr().out.splitlines()[-n:])


@pytest.mark.slow
def test_pretrain_finetune_select_split_and_sample_end_with_where_and_next(tmp_path, capsys):
    data = write_labeled_dataset(tmp_path / "data", n=6, k=3)
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    assert main(["pretrain", "--data", str(data), "--out", str(pre), *TINY, *NET]) == 0
    end = tail(capsys)
    assert f"run folder {pre} (model.safetensors" in end
    assert f"next: labeldiff select --pretrained {pre} --data {data}" in end
    assert f"labeldiff finetune --data {data} --pretrained {pre} --labeled to_label.txt" in end
    quick = tmp_path / "quick"  # a quick pretraining run is fine-tuned with the quick fine-tuning preset
    assert main(["pretrain", "--data", str(data), "--recipe", "ddpm-quick", "--out", str(quick), *TINY, *NET]) == 0
    assert f"--pretrained {quick} --recipe finetune-quick --labeled to_label.txt" in tail(capsys)
    assert main(["finetune", "--data", str(data), "--pretrained", str(pre), "--labels", "2", "--out", str(ft),
                 "--head-hidden", "8", *TINY]) == 0
    end = tail(capsys, 6)
    assert f"run folder {ft} (model.safetensors" in end and f"next: labeldiff evaluate --model {ft}" in end
    assert f"into {ft / 'eval_test'}" in end and f"labeldiff predict --model {ft} --input NEW_IMAGES" in end
    # and the scratch baseline: the same command with --strategy scratch, which runs as printed; then compare
    baseline = (f"labeldiff finetune --data {data} --pretrained {pre} --labels 2 --head-hidden 8 {' '.join(TINY)} "
                f"--strategy scratch --out {ft}-scratch")
    assert baseline in end and f"labeldiff compare {ft} {ft}-scratch" in end
    assert main(shlex.split(baseline)[1:]) == 0
    end = tail(capsys, 3)
    assert f"run folder {ft}-scratch" in end and "--strategy scratch" not in end  # a baseline has no baseline
    assert main(["select", "--pretrained", str(pre), "--data", str(data), "--labels", "2"]) == 0
    end = tail(capsys)
    assert "(--out FILE writes these lines, for finetune --labeled FILE)" in end and "--labeled FILE" in end
    split = tmp_path / "split.json"
    assert main(["split", "--data", str(data), "--out", str(split)]) == 0
    assert f"next: labeldiff pretrain --data {data} --split-file {split}" in tail(capsys, 1)
    assert main(["sample", "--model", str(pre), "--out", str(tmp_path / "samples"), "--n", "2", "--steps", "2"]) == 0
    end = tail(capsys, 2)
    assert f"to {tmp_path / 'samples'} (sample_XXX.png)" in end
    assert f"next: labeldiff evaluate-samples --samples {tmp_path / 'samples'} --data {data}" in end


@pytest.mark.slow
def test_a_study_names_its_final_paths_and_says_what_next(tmp_path, capsys):
    path = write_tiny_study(tmp_path, robustness={"corruptions": "noise", "severities": [1]})
    out = tmp_path / "out"
    assert main(["study", str(path), "--out", str(out), "--dry-run"]) == 0
    assert f"next: labeldiff study {path} --out {out}" in tail(capsys, 1)
    assert main(["study", str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert ".tmp" not in text  # eval.tmp/ and robustness.tmp/ are renamed once written: never named
    cells = sorted(p.name for p in (out / "cells").iterdir())
    for cell in cells:
        assert f"wrote {out / 'cells' / cell / 'eval'}/metrics.json" in text
        assert Path(out / "cells" / cell / "eval" / "metrics.json").is_file()
    assert f"wrote {out / 'cells' / cells[0] / 'eval' / 'robustness'}/robustness.json" in text
    end = "\n".join(text.splitlines()[-3:])
    assert f"results: {out}/report.html" in end and "verdict.md" in text and f"next: python -m labeldiff.study.pages {out}" in end
