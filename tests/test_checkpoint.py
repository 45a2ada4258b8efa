"""Run folders: safetensors weights, resumable checkpoints, run-folder safety and config files."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from labeldiff.checkpoint import (RUN_MARKER, load_checkpoint, load_weights, prepare_run_dir, release_run_dir,
                                  save_checkpoint, save_weights)
from labeldiff.config import ModelConfig, RunConfig, TrainConfig, apply_overrides, merge_recipe
from labeldiff.models.unet import build_unet
from labeldiff.errors import RunFolderError


def _is_safetensors(path) -> bool:
    """safetensors = 8-byte little-endian header length, then a JSON header (no pickle opcodes)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    return isinstance(header, dict) and not raw.startswith(b"\x80") and not raw.startswith(b"PK")


def _small_model(tiny_model_config):
    torch.manual_seed(0)
    return build_unet(tiny_model_config(1), out_channels=1)


def _train_steps(model, opt, n=2):
    for _ in range(n):
        x = torch.randn(2, 1, 8, 8)
        loss = model(x, torch.tensor([1, 2])).pow(2).mean() + sum(p.sum() * 1e-3 for p in model.parameters())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_weights_round_trip_and_prefixes(tmp_path):
    """save_weights/load_weights are bit-identical and strip 'module.' and '_orig_mod.' prefixes."""
    state = {
        "module.a.weight": torch.randn(3, 4),
        "_orig_mod.module.b": torch.arange(6, dtype=torch.int64),
        "c": torch.randn(5, dtype=torch.float64),
        "d": torch.randn(4, 4).t(),  # non-contiguous
    }
    path = tmp_path / "w" / "model.safetensors"
    save_weights(state, path, metadata={"step": "3"})
    assert _is_safetensors(path)
    loaded = load_weights(path)
    assert set(loaded) == {"a.weight", "b", "c", "d"}
    assert torch.equal(loaded["a.weight"], state["module.a.weight"])
    assert torch.equal(loaded["b"], state["_orig_mod.module.b"]) and loaded["b"].dtype == torch.int64
    assert torch.equal(loaded["c"], state["c"]) and loaded["c"].dtype == torch.float64
    assert torch.equal(loaded["d"], state["d"])
    assert set(load_file(str(path))) == set(loaded)
    assert list(tmp_path.rglob("*.tmp")) == []
    with pytest.raises(RunFolderError):
        load_weights(tmp_path / "nothing.safetensors")


def test_checkpoint_round_trip(tmp_path, tiny_model_config):
    """Model, EMA and Adam state survive save/load exactly; the step is restored; no *.tmp remains."""
    model = _small_model(tiny_model_config)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train_steps(model, opt)
    ema = {k: v.float() * 0.5 for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    ck_dir = save_checkpoint(tmp_path, 2, model, opt, ema, {"loss": 0.25})
    for f in ("model.safetensors", "ema.safetensors", "state.safetensors"):
        assert _is_safetensors(ck_dir / f)
        load_file(str(ck_dir / f))

    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest["step"] == 2 and (tmp_path / latest["dir"]).is_dir()
    assert (tmp_path / latest["dir"]).resolve() == ck_dir.resolve()
    assert list(tmp_path.rglob("*.tmp")) == []

    ck = load_checkpoint(tmp_path)
    assert ck["step"] == 2 and ck["extra"] == {"loss": 0.25}
    for k, v in model.state_dict().items():
        assert torch.equal(ck["model"][k], v)
        assert torch.equal(ck["ema"][k], ema[k])

    fresh = _small_model(tiny_model_config)
    fresh.load_state_dict(ck["model"])
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(ck["optimizer"])
    a, b = opt.state_dict(), opt2.state_dict()
    assert set(a["state"]) == set(b["state"]) and len(a["state"]) == len(list(model.parameters()))
    for idx in a["state"]:
        assert set(a["state"][idx]) == {"step", "exp_avg", "exp_avg_sq"}
        for name, value in a["state"][idx].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][idx][name])), (idx, name)
        assert float(b["state"][idx]["step"]) == 2.0
    assert b["param_groups"][0]["lr"] == 1e-3
    assert torch.equal(ck["rng"]["torch_cpu"], rng)

    # the restored optimizer continues exactly like the original one
    torch.manual_seed(5)
    _train_steps(model, opt, 1)
    torch.manual_seed(5)
    _train_steps(fresh, opt2, 1)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_without_ema_and_keep(tmp_path, tiny_model_config):
    """Without EMA no ema file is written; later checkpoints replace older ones (the last two stay)."""
    model = _small_model(tiny_model_config)
    opt = torch.optim.Adam(model.parameters())
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, None, {})
    dirs = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert dirs == ["step_0000002", "step_0000003"]
    save_checkpoint(tmp_path, 2, model, opt, None, {})  # a resumed run rewriting step 2
    ck = load_checkpoint(tmp_path)
    assert ck["step"] == 2 and ck["ema"] is None
    assert json.loads((tmp_path / "latest.json").read_text())["dir"] == "checkpoints/step_0000002"


def test_load_checkpoint_missing(tmp_path):
    """A folder without latest.json has nothing to resume: FileNotFoundError."""
    with pytest.raises(RunFolderError, match="latest.json"):
        load_checkpoint(tmp_path)


def test_prepare_run_dir(tmp_path):
    """An existing non-empty run folder is refused without --overwrite, replaced with it (all but its marker),
    kept with --resume."""
    run = tmp_path / "run"
    assert prepare_run_dir(run, overwrite=False, resume=False).is_dir()
    release_run_dir(run)
    (run / "old.txt").write_text("x")
    with pytest.raises(RunFolderError, match="--overwrite"):
        prepare_run_dir(run, overwrite=False, resume=False)
    assert (run / "old.txt").exists()
    assert prepare_run_dir(run, overwrite=False, resume=True) == run and (run / "old.txt").exists()
    release_run_dir(run)
    prepare_run_dir(run, overwrite=True, resume=False)
    release_run_dir(run)
    assert run.is_dir() and [p.name for p in run.iterdir()] == [RUN_MARKER]
    with pytest.raises(RunFolderError, match="--resume"):
        prepare_run_dir(tmp_path / "nothing", overwrite=False, resume=True)
    (tmp_path / "empty").mkdir()
    assert prepare_run_dir(tmp_path / "empty", overwrite=False, resume=False).is_dir()


def test_run_config_round_trip(tmp_path):
    """RunConfig → config.json → RunConfig is equal (tuples restored from JSON lists)."""
    cfg = RunConfig(kind="segmentation", model=ModelConfig(channels=(8, 16), attention_levels=(False, True)),
                    train=TrainConfig(steps=7, lr=3e-4), num_classes=3)
    cfg.data.path = "/some/where"
    cfg.transfer.pretrained = "/pre"
    cfg.save(tmp_path / "config.json")
    back = RunConfig.load(tmp_path / "config.json")
    assert back == cfg
    assert isinstance(back.model.channels, tuple)
    assert list(tmp_path.glob("*.tmp")) == [] and list(tmp_path.glob(".*")) == []


def test_unknown_config_keys(tmp_path):
    """Unknown top-level keys, section fields, overrides or recipe sections raise ValueError."""
    d = RunConfig().to_dict()
    with pytest.raises(ValueError, match="bogus"):
        RunConfig.from_dict({**d, "bogus": 1})
    d2 = RunConfig().to_dict()
    d2["train"]["learning_rate"] = 1.0
    with pytest.raises(ValueError, match="learning_rate"):
        RunConfig.from_dict(d2)
    with pytest.raises(ValueError, match="train.nope"):
        apply_overrides(RunConfig(), {"train.nope": 1})
    with pytest.raises(ValueError, match="optim"):
        merge_recipe(RunConfig(), {"optim": {"lr": 1}})
    out = apply_overrides(RunConfig(), {"train.lr": 0.5, "train.steps": None, "model.channels": (8, 16)})
    assert out.train.lr == 0.5 and out.train.steps == TrainConfig().steps and out.model.channels == (8, 16)
