"""A run's records, where its user already looks: TensorBoard and MLflow, beside ``log.jsonl``, and a
``progress.png`` rewritten as the run trains.

``log.jsonl`` stays the source of truth. With ``train.track`` set (``--track tensorboard``, ``mlflow`` or
``tensorboard,mlflow``), every record the loop writes there also goes, with the same step and values, to:

- **TensorBoard**: event files in ``RUN/tensorboard/`` (``tensorboard --logdir RUN``), one scalar per key;
- **MLflow**: a run in the tracking store ``train.tracking_uri`` (default: ``file:`` + ``./mlruns`` of the
  directory the run started in, MLflow's own default); the resolved config as parameters, the records as
  metrics, and the final ``progress.png`` and ``config.json`` as artifacts.

``--resume`` continues the same TensorBoard folder and the same MLflow run: its id and store are kept in
``RUN/tracking.json``. An evaluation of a tracked run (``labeldiff evaluate``, a study's cell) logs its
metrics into that run too. The libraries are optional extras (``pip install "labeldiff[track]"``), imported only
when a run asks for them.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from labeldiff.errors import ConfigError

KINDS = ("tensorboard", "mlflow")
STATE = "tracking.json"  # the MLflow run id and store of a tracked run, so a resume continues it
PROGRESS = "progress.png"


def kinds(track: str | None) -> list[str]:
    """``"tensorboard,mlflow"`` → ``["tensorboard", "mlflow"]``; ``none`` or empty → []."""
    out = [k.strip() for k in (track or "").split(",") if k.strip() and k.strip() != "none"]
    bad = [k for k in out if k not in KINDS]
    if bad:
        raise ConfigError(f"--track {track!r}: {', '.join(bad)} is not one of none, {', '.join(KINDS)} "
                          f"(comma-separated for both)")
    return out


def _import(kind: str):
    try:
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            return SummaryWriter
        import mlflow
        return mlflow
    except ImportError:
        package = "tensorboard" if kind == "tensorboard" else "mlflow-skinny"
        raise ConfigError(f"--track {kind} needs the {package} package: pip install \"labeldiff[track]\" "
                          f"(or pip install {package})") from None


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Tracker:
    """The trackers a run asked for; a no-op when it asked for none (and on ranks other than 0)."""

    def __init__(self, run_dir: Path, track: str | None, uri: str | None = None, resume: bool = False,
                 name: str | None = None):
        self.run_dir = Path(run_dir)
        self.kinds = kinds(track)
        self.writer = None
        self.mlflow = None
        self.client = None
        self.run_id: str | None = None
        if not self.kinds:
            return
        state_path = self.run_dir / STATE
        state = json.loads(state_path.read_text()) if resume and state_path.is_file() else {}
        if "tensorboard" in self.kinds:
            self.writer = _import("tensorboard")(log_dir=str(self.run_dir / "tensorboard"))
        if "mlflow" in self.kinds:
            mlflow = _import("mlflow")
            from mlflow.tracking import MlflowClient

            uri = state.get("uri") or uri or (Path.cwd() / "mlruns").resolve().as_uri()
            if uri.startswith("file:"):  # MLflow 3 keeps the file store in maintenance mode, behind this switch
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self.client = MlflowClient(tracking_uri=uri)
            self.run_id = state.get("run_id")
            if self.run_id is None:
                experiment = self.client.get_experiment_by_name("labeldiff")
                eid = experiment.experiment_id if experiment else self.client.create_experiment("labeldiff")
                self.run_id = self.client.create_run(eid, run_name=name or self.run_dir.name).info.run_id
            else:
                self.client.update_run(self.run_id, status="RUNNING")
            self.mlflow = mlflow
            state = {"uri": uri, "run_id": self.run_id}
        state_path.write_text(json.dumps({**state, "kinds": self.kinds}, indent=2))

    @classmethod
    def reopen(cls, run_dir: Path) -> "Tracker | None":
        """The tracker of a finished tracked run (its ``tracking.json``), or None for an untracked run."""
        path = Path(run_dir) / STATE
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        return cls(run_dir, ",".join(state.get("kinds", [])), state.get("uri"), resume=True)

    def params(self, config: dict) -> None:
        """The resolved config as parameters (MLflow) and as text (TensorBoard), once per run."""
        if self.client is not None:
            from mlflow.entities import Param

            flat = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in _flat(config).items()]
            have = self.client.get_run(self.run_id).data.params
            new = [p for p in flat if p.key not in have]
            for i in range(0, len(new), 100):  # MLflow takes at most 100 parameters a call
                self.client.log_batch(self.run_id, params=new[i:i + 100])
            for p in flat:  # a parameter is fixed once logged: what a resume changed (train.steps) is a tag
                if p.key in have and have[p.key] != p.value:
                    self.client.set_tag(self.run_id, f"resumed.{p.key}", p.value)
        if self.writer is not None:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, step: int, record: dict) -> None:
        """Every finite number of ``record`` but ``step``, at ``step``."""
        values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                  and not isinstance(v, bool) and math.isfinite(float(v))}
        if not values:
            return
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if self.client is not None:
            from mlflow.entities import Metric
            import time

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def artifact(self, path: Path) -> None:
        if self.client is not None and Path(path).is_file():
            self.client.log_artifact(self.run_id, str(path))
        if self.writer is not None and Path(path).suffix == ".png" and Path(path).is_file():
            import numpy as np
            from PIL import Image

            self.writer.add_image(Path(path).stem, np.asarray(Image.open(path).convert("RGB")), dataformats="HWC")

    def close(self, finished: bool = True) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.client is not None:
            self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


def log_evaluation(run_dir: Path, metrics: dict, step: int) -> None:
    """An evaluation's summary numbers into the run's trackers (a tracked run only): ``dice``, ``iou`` and
    each other metric's ``mean``, named ``eval/NAME``."""
    tracker = Tracker.reopen(run_dir)
    if tracker is None:
        return
    flat = {}
    for name, value in metrics.items():
        if isinstance(value, dict) and isinstance(value.get("mean"), (int, float)):
            flat[f"eval/{name}"] = value["mean"]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"eval/{name}"] = value
    tracker.log(step, flat)
    tracker.close()


def write_progress(run_dir: Path) -> Path | None:
    """``RUN/progress.png``: the training loss (and learning rate) against the step, from ``log.jsonl``;
    rewritten at every checkpoint and at the end, as nnU-Net's progress plot is. None when there is nothing
    to draw yet."""
    log = Path(run_dir) / "log.jsonl"
    if not log.is_file():
        return None
    rows = []
    for line in log.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "step" in r and "loss" in r and "lr" in r:
            rows.append(r)
    if len(rows) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(steps, [r["loss"] for r in rows], lw=1, color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax.set_yscale("log" if min(r["loss"] for r in rows) > 0 else "linear")
    lr = ax.twinx()
    lr.plot(steps, [r["lr"] for r in rows], lw=1, color="tab:orange")
    lr.set_ylabel("learning rate", color="tab:orange")
    ax.set_title(f"{Path(run_dir).name}: step {steps[-1]}")
    fig.tight_layout()
    out = Path(run_dir) / PROGRESS
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out
