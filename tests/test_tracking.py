"""TensorBoard and MLflow get the records log.jsonl gets, read back with the libraries' own readers; a resumed
run continues the same TensorBoard folder and MLflow run; an evaluation of a tracked run is logged into it;
progress.png is written as the run trains."""
from __future__ import annotations

import json

import pytest

from labeldiff.cli import main
from labeldiff.errors import ConfigError
from labeldiff.tracking import kinds

from conftest import write_labeled_dataset

TINY = ["--size", "16", "--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--channels", "3",
        "--unet-channels", "8,16", "--attention", "0,0", "--head-channels", "8", "--set", "train.log_every=2"]


def _log(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "lr" in r]


def _tensorboard(run) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_track_names_its_choices():
    assert kinds("tensorboard,mlflow") == ["tensorboard", "mlflow"] and kinds("none") == [] and kinds(None) == []
    with pytest.raises(ConfigError, match="wandb is not one of none, tensorboard, mlflow"):
        kinds("wandb")


@pytest.mark.slow
def test_tensorboard_and_mlflow_hold_what_log_jsonl_holds_and_a_resume_continues_them(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the default store: ./mlruns
    data = write_labeled_dataset(tmp_path / "data", n=6, k=3)
    run = tmp_path / "pre"
    common = ["pretrain", "--data", str(data), "--out", str(run), "--track", "tensorboard,mlflow", *TINY,
              "--checkpoint-every", "4"]
    assert main([*common, "--steps", "6"]) == 0
    state = json.loads((run / "tracking.json").read_text())
    assert state["uri"] == (tmp_path / "mlruns").as_uri()
    assert (run / "progress.png").is_file()
    assert main([*common, "--steps", "10", "--resume"]) == 0  # extends the run: the same MLflow run continues
    assert json.loads((run / "tracking.json").read_text())["run_id"] == state["run_id"]

    records = _log(run)
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10]
    scalars = _tensorboard(run)
    for key in ("loss", "lr", "images_per_s"):
        steps, values = zip(*sorted(scalars[key]))
        assert list(steps) == [r["step"] for r in records]
        assert list(values) == pytest.approx([r[key] for r in records], rel=1e-6)  # TensorBoard stores float32

    client = MlflowClient(tracking_uri=state["uri"])
    runs = client.search_runs([client.get_experiment_by_name("labeldiff").experiment_id])
    assert [r.info.run_id for r in runs] == [state["run_id"]]  # one run, not one per start
    for key in ("loss", "lr"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(state["run_id"], key))
        assert history == [(r["step"], r[key]) for r in records]
    mlrun = client.get_run(state["run_id"])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["corruption.method"] == "ddpm" and mlrun.data.params["train.steps"] == "6"
    assert mlrun.data.tags["resumed.train.steps"] == "10"  # MLflow fixes a parameter once logged
    artifacts = {a.path for a in client.list_artifacts(state["run_id"])}
    assert {"progress.png", "config.json"} <= artifacts

    ft = tmp_path / "ft"
    assert main(["finetune", "--data", str(data), "--out", str(ft), "--pretrained", str(run), "--labels", "2",
                 "--steps", "4", "--head-hidden", "8", "--size", "16", "--batch-size", "2", "--precision", "fp32",
                 "--device", "cpu", "--track", "mlflow", "--tracking-uri", state["uri"]]) == 0
    assert main(["evaluate", "--model", str(ft), "--device", "cpu"]) == 0
    ft_id = json.loads((ft / "tracking.json").read_text())["run_id"]
    metrics = json.loads(next(ft.glob("eval_*/metrics.json")).read_text())
    logged = client.get_run(ft_id).data.metrics
    assert logged["eval/dice"] == pytest.approx(metrics["dice"]["mean"])
    assert not (ft / "tensorboard").exists()


@pytest.mark.slow
def test_an_untracked_run_writes_progress_but_no_tracker_files(tmp_path):
    data = write_labeled_dataset(tmp_path / "data", n=6, k=3)
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "pre"), "--steps", "6", *TINY,
                 "--checkpoint-every", "4"]) == 0
    assert (tmp_path / "pre" / "progress.png").is_file()
    assert not (tmp_path / "pre" / "tracking.json").exists() and not (tmp_path / "pre" / "tensorboard").exists()


@pytest.mark.slow
def test_generative_pretraining_previews_samples_at_each_checkpoint(tmp_path):
    from PIL import Image

    data = write_labeled_dataset(tmp_path / "data", n=6, k=3)
    for method in ("ddpm", "hybrid"):
        run = tmp_path / method
        assert main(["pretrain", "--data", str(data), "--out", str(run), "--method", method, "--steps", "4",
                     "--checkpoint-every", "2", "--preview-samples", "4", "--timesteps", "50", *TINY]) == 0
        assert sorted(p.name for p in (run / "previews").iterdir()) == ["step-2.png", "step-4.png"]
        w, h = Image.open(run / "previews" / "step-4.png").size
        assert w > 2 * 16 and h > 2 * 16  # a 2 × 2 grid of 16² samples (hybrid: each beside its mask)
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "mdm"), "--method", "mdm", "--steps",
                 "2", "--preview-samples", "2", "--patch-size", "4", *TINY]) != 0  # mdm does not generate images
