"""A study's ``tune:``: each arm's fine-tuning settings chosen on validation images with tuning seeds, the
confirmation cells run with each arm's own choice, and studies without it planned exactly as before."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from labeldiff.data.io import DataError
from labeldiff.runs import RunFolder


# --- scoring validation images --------------------------------------------------------------------------------

def test_evaluation_scores_images_the_pretraining_read_without_masks_only_when_asked(monkeypatch, tmp_path):
    """A study's validation images are train images, which pretraining on the target read (without masks):
    scoring them is refused unless asked; images a run trained on with their masks are refused all the same."""
    from labeldiff.data.provenance import dataset_key
    from labeldiff.evaluate.run import refuse_trained_on

    ds = SimpleNamespace(root=tmp_path)
    read = {"data": dataset_key(tmp_path), "stems": ["a", "b"]}

    def runs(*records):
        monkeypatch.setattr(RunFolder, "open", lambda path, **kw: SimpleNamespace(trained_on=lambda: list(records)))

    runs(("was pretrained on", read))
    with pytest.raises(DataError, match=r"split 'validation' .* holds 1 image\(s\) that run was pretrained on \(a\)"):
        refuse_trained_on(Path("run"), "validation", ds, ["a", "c"], "train")
    refuse_trained_on(Path("run"), "validation", ds, ["a", "c"], "train", unlabeled_seen=True)
    for records in ([("was pretrained on", {**read, "labeled": True})], [("was trained on", read)]):
        runs(*records)
        with pytest.raises(DataError, match="holds 1 image"):
            refuse_trained_on(Path("run"), "validation", ds, ["a", "c"], "train", unlabeled_seen=True)
