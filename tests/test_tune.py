"""A study's ``tune:``: each arm's fine-tuning settings chosen on validation images with tuning seeds, the
confirmation cells run with each arm's own choice, and studies without it planned exactly as before."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import labeldiff.study.runner as runner
from labeldiff.data.io import DataError
from labeldiff.runs import RunFolder
from labeldiff.study import execute, report
from labeldiff.study.configs import finetune_config
from labeldiff.study.plan import Target, plan_cells, plan_pretraining
from labeldiff.study.spec import StudyError, load_study, parse_study
from labeldiff.study.tuning import choose, point_label, validation_images

from conftest import write_tiny_study

TUNE = {"grid": {"train.lr": [0.001, 0.01]}, "seeds": [900, 901], "validation": 0.25}


def _study(tmp_path: Path, **tune) -> dict:
    path = write_tiny_study(tmp_path)
    return yaml.safe_load(path.read_text()) | {"tune": {**TUNE, **tune}}


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


# --- parsing and refusals -------------------------------------------------------------------------------------

def test_tune_parses_a_product_grid_in_order(tmp_path):
    raw = _study(tmp_path, grid={"train.lr": [0.001, 0.01], "transfer.augment": ["none", "light"]},
                 validation="val", metric="iou")
    t = parse_study(raw, tmp_path / "s.yaml").tune
    assert t.seeds == [900, 901] and t.validation == "val" and t.metric == "iou" and t.validation_seed == 0
    assert [point_label(p) for p in t.points] == [
        "train.lr=0.001, transfer.augment=none", "train.lr=0.001, transfer.augment=light",
        "train.lr=0.01, transfer.augment=none", "train.lr=0.01, transfer.augment=light"]
    assert parse_study({k: v for k, v in raw.items() if k != "tune"}, tmp_path / "s.yaml").tune is None


BAD = [
    (dict(seeds=[900, 0]), r"tune.seeds: 0 is also in seeds \[0\]: the confirmation must run on seeds the tuning"),
    (dict(seeds=[]), r"tune.seeds: \[\]: list the tuning seeds"),
    (dict(grid={"train.lrr": [0.1]}), r"tune.grid: 'train.lrr': train has no field 'lrr' \(did you mean train.lr\?\)"),
    (dict(grid={"lr": [0.1]}), r"tune.grid: 'lr' is not 'section.field'"),
    (dict(grid={"model.channels": [[8, 16]]}), r"tune.grid: model.channels: tune fine-tuning settings"),
    (dict(grid={"train.seed": [1, 2]}), r"tune.grid: train.seed: the study sets it per cell"),
    (dict(grid={"train.log_every": [1, 5]}), r"train.log_every: does not change what a run computes"),
    (dict(grid={"train.lr": "0.1"}), r"tune.grid: train.lr: '0.1': list the values"),
    (dict(grid={"train.lr": [0.1, 0.1]}), r"0.1 is listed twice"),
    (dict(grid={"train.lr": ["1e-3"]}), r"train.lr: '1e-3': .*YAML reads 1e-3 as text"),
    (dict(grid={"train.lr": [-0.1]}), r"tune.grid: train.lr: -0.1"),
    (dict(grid={}), r"tune.grid: expected a mapping"),
    (dict(validation=1.5), r"tune.validation: 1.5: give a fraction of the train split between 0 and 1"),
    (dict(validation=0), r"tune.validation: 0: give a fraction"),
    (dict(validation=True), r"tune.validation: True: give a fraction"),
    (dict(metric="hd95"), r"tune.metric: 'hd95' is not one of dice, iou, aji"),
    (dict(valdation=0.2), r"tune: unknown key 'valdation'"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m[:40] for _, m in BAD])
def test_tune_refusals_say_what_to_fix(tmp_path, change, message):
    with pytest.raises(StudyError, match=message):
        parse_study(_study(tmp_path, **change), tmp_path / "s.yaml")


# --- validation images ----------------------------------------------------------------------------------------

def test_validation_images_are_whole_groups_or_a_seeded_random_draw():
    train = [f"v{v}_f{f}" for v in range(4) for f in range(3)]  # 4 videos of 3 frames
    groups = {s: s.split("_")[0] for s in train}
    val = validation_images(train, 0.25, 0, groups)
    assert len(val) == 3 and len({groups[s] for s in val}) == 1  # one whole video, no frame of it left to train
    assert val == validation_images(train, 0.25, 0, groups)  # seeded: the same draw
    draws = {tuple(validation_images(train, 0.3, seed)) for seed in range(6)}
    assert all(len(d) == 4 for d in draws) and len(draws) > 1  # random images, ≥ 30 %, varying with the seed
    with pytest.raises(DataError, match="tune.validation: all images are in one group"):
        validation_images(train, 0.25, 0, {s: "one" for s in train})


def test_a_named_validation_split_must_not_share_images_with_the_test_split(tmp_path):
    from labeldiff.study.tuning_cells import hold_out

    path = write_tiny_study(tmp_path, tune={**TUNE, "validation": "val"})
    split = json.loads((tmp_path / "data" / "split.json").read_text())
    (tmp_path / "data" / "split.json").write_text(json.dumps({**split, "val": split["train"][:1]}))
    study = load_study(path)
    target = Target.load(study, finetune_config(study))
    assert hold_out(study, target) == (split["train"][:1], "the split 'val' of split.json")
    (tmp_path / "data" / "split.json").write_text(json.dumps({**split, "val": split["test"][:1]}))
    with pytest.raises(StudyError, match=r"split 'val' shares 1 images with the test split \(img_04\)"):
        hold_out(study, Target.load(study, finetune_config(study)))
    study.tune.validation = "dev"
    with pytest.raises(StudyError, match=r"has no split 'dev' \(it has test, train, val\)"):
        hold_out(study, target)


# --- the choice -----------------------------------------------------------------------------------------------

def _rows(arm: tuple, table: dict[str, list[float]], seeds=(900, 901, 902)) -> list[dict]:
    method, strategy = arm
    return [{"method": method, "strategy": strategy, "protocol": "default", "select": "random", "k": 2, "seed": s,
             "tuned": label, "dice": v} for label, values in table.items() for s, v in zip(seeds, values)]


LABELS = ["train.lr=0.0001", "train.lr=0.001", "train.lr=0.01"]


def test_each_arm_takes_its_own_best_mean_first_in_grid_order_on_a_tie():
    rows = (_rows(("ddpm", "full"), {LABELS[0]: [0.70, 0.72, 0.74], LABELS[1]: [0.60, 0.80, 0.70],  # mean 0.72 and 0.70
                                     LABELS[2]: [0.10, 0.20, 0.30]})
            + _rows(("none", "scratch"), {LABELS[0]: [0.20, 0.30, 0.40], LABELS[1]: [0.50, 0.50, 0.50],
                                          LABELS[2]: [0.60, 0.60, 0.60]})
            + _rows(("tie", "full"), {LABELS[0]: [0.5, 0.5, 0.5], LABELS[1]: [0.4, 0.6, 0.5], LABELS[2]: [0.1] * 3})
            + _rows(("nan", "full"), {LABELS[0]: [math.nan] * 3, LABELS[1]: [0.1, math.nan, 0.3],
                                      LABELS[2]: [0.0] * 3}))
    choices = choose(rows, LABELS, [900, 901, 902])
    arm = lambda m, s: (m, s, "default", "random", 2)  # noqa: E731
    assert choices[arm("ddpm", "full")].chosen == 0 and choices[arm("none", "scratch")].chosen == 2  # different winners
    m, sd, n = choices[arm("ddpm", "full")].stats[1]
    assert (round(m, 6), round(sd, 6), n) == (0.7, 0.1, 3)
    assert choices[arm("tie", "full")].chosen == 0  # 0.5 = 0.5: the first in grid order
    assert choices[arm("nan", "full")].chosen == 1  # NaN seeds left out of a mean; an all-NaN point cannot win
    partial = choose(rows[:-1], LABELS, [900, 901, 902])  # one tuning cell of the "nan" arm not finished
    assert partial[arm("nan", "full")].chosen is None and partial[arm("nan", "full")].missing == 1
    assert partial[arm("ddpm", "full")].chosen == 0
    assert choose(rows, LABELS, [900, 901, 902, 903])[arm("ddpm", "full")].chosen is None  # a seed not run yet


# --- end to end -----------------------------------------------------------------------------------------------

PLANTED = {("full", 0.001): 0.9, ("full", 0.01): 0.2, ("scratch", 0.001): 0.1, ("scratch", 0.01): 0.8}


def _plant(monkeypatch) -> list[str]:
    """Validation scores planted by the arm and the learning rate (2 training steps tell nothing apart): full
    scores best at 0.001, scratch at 0.01. Returns the names of the cells fine-tuned from now on."""
    real_eval, real_ft, trained = execute.run_evaluate, execute.run_transfer, []

    def evaluate(model_dir, out, *args, **kw):
        result = real_eval(model_dir, out, *args, **kw)
        if Path(model_dir).parents[1].name == "tune":
            cfg = RunFolder.open(model_dir).config
            path = Path(out) / "metrics.json"
            m = json.loads(path.read_text())
            m["dice"]["mean"] = PLANTED[(cfg.transfer.strategy, cfg.train.lr)] + (cfg.train.seed - 900) * 0.01
            path.write_text(json.dumps(m))
        return result

    def finetune(cfg, out, *args, **kw):
        trained.append(Path(out).parent.name)
        return real_ft(cfg, out, *args, **kw)

    monkeypatch.setattr(execute, "run_evaluate", evaluate)
    monkeypatch.setattr(execute, "run_transfer", finetune)
    return trained


@pytest.mark.slow
def test_a_tuned_study_chooses_per_arm_confirms_with_each_choice_and_resumes(tmp_path, monkeypatch, capsys):
    path = write_tiny_study(tmp_path, labels=[1], seeds=[0], tune=TUNE)
    out = tmp_path / "out"
    runner.run_study(path, out, dry_run=True)
    said = capsys.readouterr().out
    assert "tune: 8 tuning cells (0 finished) = 2 arms × 2 grid points × 2 tuning seeds" in said
    assert "the confirmation cells' fine-tuning settings are chosen after tuning" in said
    assert said.count("  todo  tune/tune-") == 8 and said.count("(settings chosen after tuning)") == 2
    assert not list((out / "tune").glob("tune-*"))  # nothing trained

    trained = _plant(monkeypatch)
    rows = runner.run_study(path, out)
    assert len(trained) == 10 and sum(t.startswith("tune-") for t in trained) == 8
    assert set(trained[-2:]) == {r["cell"] for r in rows}  # the tuning cells first, then the confirmation

    # each arm its own value (planted), in results.csv and in the confirmation run's own config.json
    chosen = {"ddpm": "train.lr=0.001", "none": "train.lr=0.01"}
    csv_rows = report.read_csv(out / "results.csv")
    assert {r["method"]: r["tuned"] for r in csv_rows} == chosen
    for r in csv_rows:
        cfg = RunFolder.open(out / "cells" / r["cell"] / "run").config
        assert f"train.lr={cfg.train.lr}" == chosen[r["method"]]
        assert json.loads((out / "cells" / r["cell"] / "cell.json").read_text())["tuned"] == {"train.lr": cfg.train.lr}
    tuning_md, verdict = (out / "tuning.md").read_text(), (out / "verdict.md").read_text()
    assert "| ddpm / full | **0.905 ± 0.007 (2)** | 0.205 ± 0.007 (2) | train.lr=0.001 |" in tuning_md
    assert "| none / scratch | 0.105 ± 0.007 (2) | **0.805 ± 0.007 (2)** | train.lr=0.01 |" in tuning_md
    assert "## Each arm tuned on its own" in verdict and "none of them a tuning seed" in verdict
    assert "| ddpm / full | **0.905 ± 0.007 (2)**" in verdict

    # the validation images: never labeled by a tuning cell, never a test image, and what tuning cells score
    plan = json.loads((out / "plan.json").read_text())
    val = set(plan["tuning"]["validation"])
    test = set(json.loads((tmp_path / "data" / "split.json").read_text())["test"])
    assert len(val) == 1 and not val & test
    tuned = report.read_csv(out / "tuning.csv")
    assert len(tuned) == 8 and {r["tuned"] for r in tuned} == {"train.lr=0.001", "train.lr=0.01"}
    for r in tuned:
        cell = out / "tune" / r["cell"]
        labeled = set(json.loads((cell / "run" / "labeled.json").read_text())["stems"])
        scored = json.loads((cell / "eval" / "metrics.json").read_text())["test_images"]
        assert labeled and not labeled & val and not labeled & test
        assert set(scored["stems"]) == val and scored["split"] == "validation"
    for r in csv_rows:  # the confirmation cells are scored on the test split
        assert set(json.loads((out / "cells" / r["cell"] / "eval" / "metrics.json").read_text())["test_images"]
                   ["stems"]) == test

    # resumed: nothing to compute; one tuning cell lost is the only cell computed again
    trained.clear()
    runner.run_study(path, out)
    assert trained == []
    victim = out / "tune" / tuned[0]["cell"] / "eval" / "metrics.json"
    victim.unlink()
    runner.run_study(path, out)
    assert trained == [tuned[0]["cell"]]
    assert {r["method"]: r["tuned"] for r in report.read_csv(out / "results.csv")} == chosen


# --- studies without tune -------------------------------------------------------------------------------------

FIXED = Path("/tmp/labeldiff-tune-ids-fixture")  # a cell id hashes its data's absolute path
BEFORE = {  # the cell ids these studies had before tune existed: sha256 of the ids, one a line, in plan order
    "plain": "d26ef3c1a4877c0f",
    "protocols": "7f09bff340fc7753",
    "pseeds": "7140cbefc1771e27",
}
VARIANTS = {
    "plain": {},
    "protocols": {"protocols": [{"name": "none", "overrides": {"transfer.augment": "none"}},
                                {"name": "strong", "overrides": {"transfer.augment": "strong"}}],
                  "labels": [1, 2, "all"], "seeds": [0, 1], "select": ["random", "diverse"]},
    "pseeds": {"pretrain_seeds": [0, 1], "strategies": ["full", "linear", "scratch"], "methods": [
        {"name": "ddpm", "recipe": "pre.yaml", "pretrain_steps": [2, 3]}, "none"]},
}


def test_a_study_without_tune_names_its_cells_as_before():
    shutil.rmtree(FIXED, ignore_errors=True)
    try:
        for name, extra in VARIANTS.items():
            study = load_study(write_tiny_study(FIXED / name, **extra))
            out = FIXED / name / "out"
            fts = {p.name: finetune_config(study, p) for p in study.protocols}
            target = Target.load(study, next(iter(fts.values())))
            ids = [c.id for c in plan_cells(study, plan_pretraining(study, out / "pretrain", out), target, fts, out)]
            assert hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16] == BEFORE[name], (name, ids)
            if name == "plain":
                assert ids == ["ddpm-full-k2-s0-random-9969bf78", "none-scratch-k2-s0-random-1abc7c5a"]
                # an arm that chooses the value the study fine-tunes with anyway is the untuned cell, reused
                same = {"train.lr": fts["default"].train.lr}
                tuned = plan_cells(study, plan_pretraining(study, out / "pretrain", out), target, fts, out,
                                   points=lambda arm: [same])
                assert [c.id for c in tuned] == ids and all(c.tuned == same for c in tuned)
    finally:
        shutil.rmtree(FIXED, ignore_errors=True)


def test_a_volume_with_one_case_holds_out_the_top_of_its_training_slab():
    from labeldiff.study.tuning_cells import top_slab

    train = [f"c_z{i:03d}" for i in range(10)]
    assert top_slab(train, {s: "c" for s in train}, 0.25) == ["c_z007", "c_z008", "c_z009"]
    assert top_slab(train[:2], {s: "c" for s in train[:2]}, 0.9) == ["c_z001"]  # never the whole slab
