"""The training loop: exact resume, the non-finite-loss guard, the lr schedule, EMA, learning."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import labeldiff.pretrain.run as pretrain_run
from labeldiff.checkpoint import load_checkpoint, load_weights
from labeldiff.config import CorruptionConfig, TrainConfig
from labeldiff.corruption import build_corruption
from labeldiff.data.datasets import StepBatches
from labeldiff.data.folders import unlabeled_samples
from labeldiff.models.unet import build_unet
from labeldiff.pretrain.loop import EMA, NonFiniteLossError, lr_factor, train
from labeldiff.runtime import resolve_precision
from labeldiff.transfer.finetune import run_finetune

from conftest import interrupt_on_call


def test_resume_reproduces_uninterrupted_run(tmp_path, labeled_dataset, tiny_run_config, log_reader, monkeypatch):
    """Interrupted at step 4 and resumed, a run logs the same losses and ends with the same weights."""
    cfg = dict(steps=6, checkpoint_every=3, log_every=1, ema_decay=0.9, warmup_steps=2)
    a, b = tmp_path / "A", tmp_path / "B"
    pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, **cfg), a)

    monkeypatch.setattr(pretrain_run, "pretext_loss", interrupt_on_call(5))
    with pytest.raises(KeyboardInterrupt):
        pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, **cfg), b)
    monkeypatch.undo()
    latest = json.loads((b / "latest.json").read_text())
    assert latest["step"] == 4 and (b / latest["dir"]).is_dir()
    assert sorted(log_reader(b)) == [1, 2, 3, 4]
    assert not (b / "model.safetensors").exists()

    pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, **cfg), b, resume=True)
    log_a, log_b = log_reader(a), log_reader(b)
    assert sorted(log_a) == sorted(log_b) == [1, 2, 3, 4, 5, 6]
    for step in log_a:
        assert log_b[step]["loss"] == pytest.approx(log_a[step]["loss"], abs=1e-6, rel=0)
        assert log_b[step]["lr"] == pytest.approx(log_a[step]["lr"], rel=1e-12)
    wa, wb = load_weights(a / "model.safetensors"), load_weights(b / "model.safetensors")
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    assert load_checkpoint(b)["step"] == 6
    # the logged learning rate follows lr · lr_factor(step index)
    tc = TrainConfig(**{**TrainConfig().__dict__, "lr": 1e-3, **cfg})
    for step, rec in log_a.items():
        assert rec["lr"] == pytest.approx(1e-3 * lr_factor(step - 1, tc))


def test_ctrl_c_right_after_the_optimizer_step_saves_that_step(tmp_path, labeled_dataset, tiny_run_config, log_reader,
                                                               monkeypatch):
    """SIGINT arriving between optimizer.step() and the step counter (the worst moment) is deferred to
    the end of the step: the checkpoint is that of step 4 with step 4's update, and the resumed run
    ends with the uninterrupted run's weights (it once saved step 4's weights as step 3, and the
    resume applied the update twice)."""
    import os
    import signal

    cfg = dict(steps=6, checkpoint_every=10, log_every=1, ema_decay=0.9, warmup_steps=2)
    a, b = tmp_path / "A", tmp_path / "B"
    # the handler before the runs: Python's default, or SIG_IGN when the suite was started in the background
    before = signal.getsignal(signal.SIGINT)
    pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, **cfg), a)
    real_step, calls = torch.optim.AdamW.step, [0]

    def step_then_sigint(self, *args, **kw):
        out = real_step(self, *args, **kw)
        calls[0] += 1
        if calls[0] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # as a user's Ctrl-C, delivered right after the update
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_sigint)
    with pytest.raises(KeyboardInterrupt):
        pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, **cfg), b)
    monkeypatch.undo()
    assert load_checkpoint(b)["step"] == 4 and sorted(log_reader(b)) == [1, 2, 3, 4]
    pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, **cfg), b, resume=True)
    wa, wb = load_weights(a / "model.safetensors"), load_weights(b / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, labeled_dataset, tiny_run_config,
                                                                     log_reader, monkeypatch, capsys):
    """latest.json points at a checkpoint whose weights were truncated: the resume says so, falls back to
    the previous whole checkpoint, and still ends with the uninterrupted run's weights."""
    cfg = dict(steps=6, checkpoint_every=2, log_every=1, ema_decay=0.9, warmup_steps=2)
    a, b = tmp_path / "A", tmp_path / "B"
    pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, **cfg), a)
    monkeypatch.setattr(pretrain_run, "pretext_loss", interrupt_on_call(6))  # stops in step 6: checkpoints 2, 4, 5
    with pytest.raises(KeyboardInterrupt):
        pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, **cfg), b)
    monkeypatch.undo()
    kept = sorted(p.name for p in (b / "checkpoints").iterdir())
    assert kept == ["step_0000004", "step_0000005"]  # the last two stay
    weights = b / "checkpoints" / "step_0000005" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a torn write
    assert load_checkpoint(b)["step"] == 4
    assert "step_0000005 is damaged (model.safetensors has" in capsys.readouterr().out
    pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, **cfg), b, resume=True)
    wa, wb = load_weights(a / "model.safetensors"), load_weights(b / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == [
        "step_0000004", "step_0000005.damaged", "step_0000006"]  # the damaged one is kept aside, never read
    flipped = b / "checkpoints" / "step_0000006" / "state.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed
    flipped.write_bytes(bytes(data))
    assert load_checkpoint(b)["step"] < 6 and "does not match its checksum" in capsys.readouterr().out


def test_extending_a_finished_run_equals_the_longer_run(tmp_path, labeled_dataset, tiny_run_config, log_reader):
    """A finished 4-step run resumed with 7 steps ends with the weights of a 7-step run when the rate is
    constant after warm-up; config.json records the extension and the 4-step weights are kept."""
    cfg = dict(checkpoint_every=2, log_every=1, ema_decay=0.9, warmup_steps=2, lr_final_ratio=1.0)
    a, b = tmp_path / "A", tmp_path / "B"
    pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, steps=7, **cfg), a)
    pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, steps=4, **cfg), b)
    short = load_weights(b / "model.safetensors")
    pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, steps=7, **cfg), b, resume=True)
    wa, wb = load_weights(a / "model.safetensors"), load_weights(b / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    kept = load_weights(b / "model-step4.safetensors")
    assert all(torch.equal(kept[k], short[k]) for k in short)
    saved = json.loads((b / "config.json").read_text())
    assert saved["train"]["steps"] == 7
    assert saved["extended"] == [{"at_step": 4, "from_steps": 4, "to_steps": 7}]
    assert sorted(log_reader(b)) == list(range(1, 8))
    with pytest.raises(ValueError, match="past --steps 5"):
        pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, steps=5, **cfg), b, resume=True)


def _pretrain_parts(data, tiny_run_config, **train_cfg):
    cfg = tiny_run_config(data, **train_cfg)
    torch.manual_seed(0)
    model = build_unet(cfg.model, out_channels=3)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    batches = StepBatches(unlabeled_samples(data), cfg.data, cfg.train.batch_size, cfg.train.seed, labeled=False)
    return cfg, model, opt, batches


def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path, labeled_dataset, tiny_run_config):
    """A NaN loss at the 3rd step raises NonFiniteLossError naming checkpoint step 2, which stays on disk."""
    cfg, model, opt, batches = _pretrain_parts(labeled_dataset, tiny_run_config, steps=6, checkpoint_every=2)
    real = pretrain_run.pretext_loss(build_corruption(CorruptionConfig()))
    calls = [0]

    def loss_fn(m, batch, g):
        calls[0] += 1
        loss = real(m, batch, g)
        return loss * float("nan") if calls[0] == 3 else loss

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(NonFiniteLossError, match=r"last good checkpoint \(step 2\)") as e:
        train(run, cfg, model, opt, loss_fn, batches)
    assert "nan" in str(e.value) and str(run) in str(e.value)
    assert calls[0] == 3
    assert (run / "checkpoints" / "step_0000002" / "model.safetensors").is_file()
    ck = load_checkpoint(run)
    assert ck["step"] == 2
    # the NaN step did not touch the weights: they equal those of the step-2 checkpoint
    for k, v in model.state_dict().items():
        assert torch.equal(ck["model"][k], v), k
    assert not (run / "model.safetensors").exists()


def test_lr_factor_warmup_and_decay():
    """Linear warm-up to 1 over warmup_steps, then linear decay reaching lr_final_ratio at the last step."""
    cfg = TrainConfig(steps=110, warmup_steps=10, lr_final_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(cfg.steps + 1)]
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5) and f[9] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(f[:9], f[1:10]))
    assert f[10] == pytest.approx(1.0)
    assert all(b < a for a, b in zip(f[10:-1], f[11:]))
    assert f[60] == pytest.approx(0.55)  # halfway through the decay
    assert f[110] == pytest.approx(0.1) and lr_factor(500, cfg) == pytest.approx(0.1)
    assert lr_factor(0, TrainConfig(steps=5, warmup_steps=0, lr_final_ratio=0.2)) == 1.0


def test_ema_by_hand():
    """EMA follows e ← d·e + (1−d)·w with d = min(decay, (1+step)/(10+step)); integer buffers are copied."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema = EMA(model, decay=0.5)
    # d = min(0.5, (1+step)/(10+step)) for steps 0..4: the warm start lowers the decay early on
    decays = [0.1, 2 / 11, 0.25, 4 / 13, 5 / 14]
    expected = 1.0
    for step, (w, d) in enumerate(zip([3.0, -2.0, 5.0, 0.5, 7.0], decays)):
        with torch.no_grad():
            model[0].weight.fill_(w)
            model[1].num_batches_tracked.fill_(step + 10)
        ema.update(model, step)
        expected = d * expected + (1 - d) * w
        assert ema.state["0.weight"].item() == pytest.approx(expected, rel=1e-6)
        assert ema.state["1.num_batches_tracked"].item() == step + 10
    assert model[0].weight.item() == 7.0 and ema.state["0.weight"].item() != 7.0
    capped = EMA(model, decay=0.2)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    capped.update(model, 1000)  # late steps use the configured decay
    assert capped.state["0.weight"].item() == pytest.approx(0.2 * 7.0 + 0.8 * 1.0, rel=1e-6)


def test_ema_weights_are_saved(tmp_path, labeled_dataset, tiny_run_config):
    """With EMA on, model.safetensors holds EMA weights (not the raw ones); with EMA off, the raw ones."""
    on = tmp_path / "on"
    pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, steps=4, ema_decay=0.9), on)
    ema_w, raw = load_weights(on / "model.safetensors"), load_checkpoint(on)["model"]
    assert torch.equal(ema_w["conv_in.conv.weight"], load_checkpoint(on)["ema"]["conv_in.conv.weight"])
    assert not torch.allclose(ema_w["conv_in.conv.weight"], raw["conv_in.conv.weight"])
    off = tmp_path / "off"
    pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, steps=4, ema_decay=0.0), off)
    w, raw = load_weights(off / "model.safetensors"), load_checkpoint(off)["model"]
    assert load_checkpoint(off)["ema"] is None
    for k in raw:
        assert torch.equal(w[k], raw[k])


def test_finetuning_lowers_loss(tmp_path, binary_dataset, tiny_run_config, log_reader):
    """Training from scratch on a trivially learnable task (foreground = bright pixels) lowers the loss."""
    cfg = tiny_run_config(binary_dataset, kind="segmentation", steps=40, batch_size=4, lr=3e-3, warmup_steps=5,
                          ema_decay=0.0)
    cfg.transfer.strategy = "scratch"
    cfg.transfer.labels = 4
    result = run_finetune(cfg, tmp_path / "ft")
    losses = [rec["loss"] for _, rec in sorted(log_reader(tmp_path / "ft").items())]
    assert len(losses) == 40 and result["step"] == 40
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.5 * first, (first, last)


def test_resolve_precision(monkeypatch):
    """fp32 → no autocast, bf16 → bfloat16, auto → bf16 exactly on CPUs with AMX/AVX512-BF16,
    unknown names are ValueErrors."""
    import labeldiff.runtime as rt

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(rt, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(rt, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("auto", torch.device("meta")) is None
    assert resolve_precision("fp16", cpu) is torch.float16
    with pytest.raises(ValueError, match="fp16"):  # the message lists the known names
        resolve_precision("fp8", cpu)


def test_cpu_bf16_is_read_from_the_cpu_flags():
    from labeldiff.runtime import cpu_has_bf16

    assert cpu_has_bf16("flags : fpu sse avx2 avx512f avx512_bf16 amx_tile")
    assert cpu_has_bf16("flags : fpu amx_bf16 amx_tile")
    assert not cpu_has_bf16("flags : fpu sse sse2 avx avx2 fma avx512f avx512bw")


def test_fp16_scales_the_loss_and_resumes_with_its_scale(tmp_path, labeled_dataset, tiny_run_config, log_reader,
                                                        monkeypatch):
    """fp16 autocast (here on the CPU, as on a GPU without bf16) trains through a gradient scaler: the
    checkpoint keeps its state, an interrupted run resumes with it to the uninterrupted losses and
    weights, and a step whose scaled gradients overflow is skipped with the scale halved."""
    cfg = dict(steps=6, checkpoint_every=3, log_every=1, ema_decay=0.0, warmup_steps=2, precision="fp16")
    a, b = tmp_path / "A", tmp_path / "B"
    pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, **cfg), a)
    scaler = load_checkpoint(a)["extra"]["scaler"]
    assert scaler["scale"] == 65536.0 and scaler["_growth_tracker"] == 6  # no overflow in 6 steps: grown 6 times
    monkeypatch.setattr(pretrain_run, "pretext_loss", interrupt_on_call(5))
    with pytest.raises(KeyboardInterrupt):
        pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, **cfg), b)
    monkeypatch.undo()
    assert load_checkpoint(b)["extra"]["scaler"]["_growth_tracker"] == 4
    pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, **cfg), b, resume=True)
    assert [r["loss"] for r in log_reader(a).values()] == [r["loss"] for r in log_reader(b).values()]
    assert load_checkpoint(b)["extra"]["scaler"] == scaler
    wa, wb = load_weights(a / "model.safetensors"), load_weights(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    c = tmp_path / "C"  # a scale so large that fp16 gradients overflow: the step is skipped, the scale halved
    monkeypatch.setattr(torch.amp.GradScaler, "__init__", _huge_initial_scale(torch.amp.GradScaler.__init__))
    pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, **{**cfg, "steps": 1}), c)
    state = load_checkpoint(c)
    assert state["extra"]["scaler"]["scale"] == 2.0**100 / 2
    assert not state["optimizer"]["state"]  # the one step was skipped: Adam has no moments yet


def _huge_initial_scale(init):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "init_scale": 2.0**100})
    return wrapped


def test_channels_last_trains_the_same_run(tmp_path, labeled_dataset, tiny_run_config, log_reader):
    """NHWC weights and inputs change the memory layout, not the numbers (to float rounding)."""
    cfg = dict(steps=3, log_every=1, ema_decay=0.9)
    pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, **cfg), tmp_path / "nchw")
    pretrain_run.run_pretrain(tiny_run_config(labeled_dataset, channels_last=True, **cfg), tmp_path / "nhwc")
    a, b = log_reader(tmp_path / "nchw"), log_reader(tmp_path / "nhwc")
    assert [r["loss"] for r in b.values()] == pytest.approx([r["loss"] for r in a.values()], rel=1e-4)
    wa, wb = load_weights(tmp_path / "nchw" / "model.safetensors"), load_weights(tmp_path / "nhwc" / "model.safetensors")
    for k in wa:  # Adam turns rounding in near-zero gradients into steps of up to ~lr (1e-3) each
        torch.testing.assert_close(wb[k], wa[k], atol=3e-3, rtol=0)
