"""RunFolder (the one door into a run), what a transfer inherits, and the protocol it guards:
pretraining never reads the test split unless asked, and evaluation does not depend on the CPU."""
import json

import pytest
import torch

from conftest import tiny_run, write_labeled_dataset
from labeldiff.cli import main
from labeldiff.config import RunConfig
from labeldiff.data.folders import dataset_root
from labeldiff.data.splits import pretraining_exclusions
from labeldiff.models.probe import ProbeSegmenter
from labeldiff.models.unet import DirectSegmenter, SegmentationNet
from labeldiff.pretrain.run import run_pretrain
from labeldiff.resolve import Layer, nondefault, resolve
from labeldiff.runs import RunFolder
from labeldiff.transfer.run import run_transfer


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny DDPM run on a generated labeled dataset (train 4 / test 2), crop mode at scale 0.5."""
    tmp = tmp_path_factory.mktemp("runs")
    data = write_labeled_dataset(tmp / "data", n=6, k=3, hw=(40, 48), n_train=4)
    cfg = tiny_run(data, steps=2)
    cfg.data.scale = 0.5
    run_pretrain(cfg, tmp / "pre")
    return data, tmp / "pre"


def _transfer(data, pre, out, strategy="full", **given):
    """A transfer from ``pre``; ``given`` (``scale=1.0``): data settings given on purpose, as one layer over the
    pretrained run (see labeldiff.resolve), so a value equal to the default is given too."""
    cfg = tiny_run(data, kind="segmentation", steps=2)
    cfg.transfer.pretrained, cfg.transfer.strategy, cfg.transfer.labels, cfg.transfer.members = str(pre), strategy, 2, 1
    if strategy != "probe":
        cfg.transfer.members = 10
    layers = [Layer("the given config", nondefault(cfg)), Layer("test", {f"data.{k}": v for k, v in given.items()})]
    run_transfer(resolve("segmentation", layers, RunFolder.open(pre).config, str(pre)), out)
    return RunFolder.open(out)


def test_kinds_and_segmenters(pretrained, tmp_path):
    data, pre = pretrained
    run = RunFolder.open(pre)
    assert run.kind == "pretrain" and run.method == "ddpm"
    net = run.pretext_network()
    assert not isinstance(net.out, torch.nn.Identity)
    assert isinstance(run.backbone().out, torch.nn.Identity)
    assert not any(p.requires_grad for p in run.backbone().parameters())
    with pytest.raises(ValueError, match="fine-tune it first"):
        run.segmenter()  # a ddpm run does not predict masks
    ft = _transfer(data, pre, tmp_path / "ft")
    assert ft.kind == "finetune" and isinstance(ft.segmenter(), SegmentationNet)
    probe = _transfer(data, pre, tmp_path / "probe", strategy="probe")
    assert probe.kind == "probe" and isinstance(probe.segmenter(), ProbeSegmenter)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert ft.segmenter()(x).shape == probe.segmenter()(x).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="needs a `labeldiff pretrain` run"):
        ft.require_pretrain()


def test_direct_segmenter_from_a_supervised_run(tmp_path):
    data = write_labeled_dataset(tmp_path / "data", n=4, k=2, hw=(32, 32), n_train=3)
    cfg = tiny_run(data, steps=1)
    cfg.corruption.method = "supervised"
    run_pretrain(cfg, tmp_path / "sup")
    seg = RunFolder.open(tmp_path / "sup").segmenter()
    assert isinstance(seg, DirectSegmenter) and seg(torch.zeros(1, 3, 16, 16)).shape == (1, 2, 16, 16)


def test_no_config_json_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--pretrained .*config.json"):
        RunFolder.open(tmp_path, flag="--pretrained")


def test_transfer_inherits_the_geometry_unless_given(pretrained, tmp_path, capsys):
    data, pre = pretrained
    quiet = _transfer(data, pre, tmp_path / "a")  # data.scale left at its default 1.0: inherited
    assert quiet.config.data.scale == 0.5 and quiet.config.inherited["changed"] == {}
    assert quiet.config.inherited["from"] == str(pre)
    capsys.readouterr()
    loud = _transfer(data, pre, tmp_path / "b", scale=1.0)
    assert loud.config.data.scale == 1.0
    assert loud.config.inherited["changed"] == {"data.scale": {"pretrained": 0.5, "used": 1.0}}
    assert "data.scale: the pretrained run used 0.5, this run uses 1.0, as given" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--channels"):
        _transfer(data, pre, tmp_path / "c", channels=1)


def test_cli_finetune_takes_scale_from_the_pretrained_run(tmp_path, capsys):
    data = write_labeled_dataset(tmp_path / "data", n=5, k=2, hw=(40, 40), n_train=3)
    common = ["--size", "16", "--unet-channels", "8,16", "--attention", "0,0", "--head-channels", "8",
              "--batch-size", "2", "--steps", "1", "--device", "cpu", "--precision", "fp32"]
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "pre"), "--scale", "0.5"] + common) == 0
    ft = ["finetune", "--data", str(data), "--pretrained", str(tmp_path / "pre"), "--labels", "1"] + common[6:]
    assert main(ft + ["--out", str(tmp_path / "ft")]) == 0
    cfg = RunConfig.load(tmp_path / "ft" / "config.json")
    assert cfg.data.scale == 0.5 and cfg.model.channels == (8, 16)
    assert main(ft + ["--out", str(tmp_path / "ft2"), "--scale", "0.25"]) == 0
    assert RunConfig.load(tmp_path / "ft2" / "config.json").inherited["changed"] == {
        "data.scale": {"pretrained": 0.5, "used": 0.25}}


# --- pretraining and the test split ---------------------------------------------------------------------------

def test_pretraining_leaves_the_test_split_out(tmp_path, capsys, monkeypatch):
    import labeldiff.pretrain.run as pr

    data = write_labeled_dataset(tmp_path / "data", n=6, k=2, hw=(32, 32), n_train=4)
    test = json.loads((data / "split.json").read_text())["test"]
    seen = []
    real = pr.StepBatches

    def spy(samples, *a, **kw):
        seen.append(sorted(s.stem for s in samples))
        return real(samples, *a, **kw)

    monkeypatch.setattr(pr, "StepBatches", spy)
    run_pretrain(tiny_run(data, steps=1), tmp_path / "a")
    assert "leaves out the 2 images of split 'test'" in capsys.readouterr().out
    cfg = tiny_run(data, steps=1)
    cfg.data.include_test = True
    run_pretrain(cfg, tmp_path / "b")
    assert "include_test: pretraining also reads the 2 images" in capsys.readouterr().out
    run_pretrain(tiny_run(data / "images", steps=1), tmp_path / "c")  # ROOT/images is still that dataset
    assert not set(test) & set(seen[0]) and len(seen[0]) == 4
    assert set(test) <= set(seen[1]) and len(seen[1]) == 6
    assert seen[2] == seen[0]
    assert RunConfig.load(tmp_path / "b" / "config.json").data.include_test is True
    assert RunConfig.load(tmp_path / "a" / "config.json").data.include_test is False


def test_exclusions_of_folders_without_a_split(tmp_path):
    data = write_labeled_dataset(tmp_path / "data", n=3, k=2, hw=(32, 32), n_train=2)
    (data / "split.json").unlink()
    cfg = tiny_run(data).data
    assert pretraining_exclusions(cfg) == ([], "no split file: pretraining reads every image")
    assert dataset_root(data / "images") == data / "images"  # no split.json beside it: a plain folder
    (data / "split.json").write_text(json.dumps({"all": ["img_00"]}))
    assert pretraining_exclusions(cfg)[0] == []
    assert dataset_root(data / "images") == data


def test_pretrain_cli_include_test_flag(tmp_path):
    data = write_labeled_dataset(tmp_path / "data", n=4, k=2, hw=(32, 32), n_train=3)
    args = ["pretrain", "--data", str(data), "--size", "16", "--unet-channels", "8,16", "--attention", "0,0",
            "--head-channels", "8", "--batch-size", "2", "--steps", "1", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "p"), "--include-test"]) == 0
    assert RunConfig.load(tmp_path / "p" / "config.json").data.include_test is True


# --- inference precision ---------------------------------------------------------------------------------------

def test_evaluation_does_not_depend_on_the_cpu(pretrained, tmp_path, monkeypatch):
    """A run trained with precision 'auto' scores bit for bit the same whether or not the CPU has bf16:
    inference is fp32 unless asked. (It used to reuse train.precision: bf16 on one CPU, fp32 on another.)"""
    import labeldiff.runtime as rt
    from labeldiff.evaluate.run import run_evaluate

    data, pre = pretrained
    ft = _transfer(data, pre, tmp_path / "ft")
    assert ft.config.train.precision == "fp32"
    cfg = ft.config
    cfg.train.precision = "auto"
    cfg.save(ft.path / "config.json")
    autocast_seen = []
    real_segmenter = RunFolder.segmenter

    def recording_segmenter(self, device="cpu"):
        model = real_segmenter(self, device)
        model.register_forward_hook(lambda *_: autocast_seen.append(torch.is_autocast_enabled("cpu")))
        return model

    monkeypatch.setattr(RunFolder, "segmenter", recording_segmenter)
    results = []
    for has_bf16 in (True, False):
        monkeypatch.setattr(rt, "cpu_has_bf16", lambda has=has_bf16: has)
        results.append(run_evaluate(ft.path, tmp_path / f"eval_{has_bf16}", split="test", device="cpu"))
    assert autocast_seen and not any(autocast_seen)  # fp32 on the bf16 CPU too
    assert results[0]["dice"] == results[1]["dice"] and results[0]["iou"] == results[1]["iou"]
    assert results[0]["precision"] == "fp32"
    monkeypatch.setattr(rt, "cpu_has_bf16", lambda: True)
    autocast_seen.clear()
    run_evaluate(ft.path, tmp_path / "eval_bf16", split="test", device="cpu", precision="auto")
    assert all(autocast_seen)  # asked for: bf16 where the CPU has it

