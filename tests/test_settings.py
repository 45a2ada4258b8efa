"""Each setting declared once: the parser, the range checks and the reference come from the declarations;
one resolution in one order; one vocabulary across commands; bugs are not dressed as user errors."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from labeldiff.cli import main
from labeldiff.cli.parser import SYNONYMS, VOCABULARY, build_parser
from labeldiff.config import RunConfig, declaration, declared, default_config, default_value, flatten
from labeldiff.errors import ConfigError
from labeldiff.resolve import Layer, describe, resolve

from conftest import write_labeled_dataset

RUN_OPTIONS = {"-h", "--help", "--data", "--out", "--recipe", "--protocol", "--set", "--resume", "--overwrite", "--intensity",
               "--hu-window"}
TINY = ["--size", "16", "--steps", "1", "--batch-size", "2", "--precision", "fp32", "--device", "cpu",
        "--unet-channels", "8,16", "--attention", "0,0", "--head-channels", "8"]


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, by name (``bench loop`` too)."""
    out = {}

    def walk(p: argparse.ArgumentParser, name: str) -> None:
        out[name] = p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub, q in a.choices.items():
                    walk(q, f"{name} {sub}".strip())

    walk(build_parser(), "")
    return out


def options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in p._actions for o in a.option_strings}


@pytest.mark.parametrize("command,kind", [("pretrain", "pretrain"), ("finetune", "segmentation")])
def test_training_options_are_the_declared_settings(command, kind):
    """Every option of pretrain / finetune is a declared setting's flag (or one of the run options), every
    flag declared for the command is there, parses with the declared parser and shows the command's default."""
    opts = options(parsers()[command])
    flags = {meta.flag: name for name, _, meta in declared() if meta.flag and command in meta.commands}
    assert set(opts) - RUN_OPTIONS == set(flags) - {"--data"}
    for flag, name in flags.items():
        if flag == "--data":
            continue
        action = opts[flag]
        assert action.dest == name
        default = default_value(name, kind)
        if action.help and default not in (None, "") and not declaration(name).store_true:
            shown = ",".join(str(int(v)) if isinstance(v, bool) else str(v) for v in default) if isinstance(
                default, tuple) else (str(int(default)) if isinstance(default, bool) else f"{default:g}"
                                      if isinstance(default, float) else str(default))
            assert action.help.endswith(f"[{shown}]"), (flag, action.help)


def test_each_default_shown_is_the_one_the_command_uses():
    """finetune shows and uses 300 steps, warm-up 20, a checkpoint every 100; pretrain 1000, 50, 200."""
    ft, pre = options(parsers()["finetune"]), options(parsers()["pretrain"])
    for flag, f, p in (("--steps", 300, 1000), ("--warmup-steps", 20, 50), ("--checkpoint-every", 100, 200)):
        assert ft[flag].help.endswith(f"[{f}]") and pre[flag].help.endswith(f"[{p}]")
    assert default_config("segmentation").train.steps == 300 and default_config("pretrain").train.steps == 1000


def test_range_checks_come_from_the_declarations():
    """For every bounded number, one step past its bound is refused naming its flag (or its name)."""
    for name, _, meta in declared():
        if meta.lo is None or meta.choices is not None:
            continue
        value = meta.lo if meta.lo_open else meta.lo - 1
        typed = [value] * 2 if name in ("model.channels", "model.decoder_channels") else value
        if name == "data.spacing":
            typed = [value, 1, 1]
        with pytest.raises(ConfigError, match=(meta.flag or name).replace(".", r"\.")):
            resolve("pretrain", [Layer("test", {name: typed})])


def test_resolution_order_and_sources(tmp_path):
    """defaults < pretrained run < recipe < study < command line, each value's source recorded."""
    pre = default_config("pretrain")
    pre.data.scale, pre.data.size, pre.model.channels = 0.5, 32, (8, 16)
    layers = [Layer("recipe r", {"train.lr": 1e-3, "data.size": 48, "train.steps": 50}),
              Layer("study s", {"train.lr": 3e-3, "transfer.labels": 4}),
              Layer("command line", {"train.lr": 5e-3}, typed=True)]
    cfg = resolve("segmentation", layers, pre, "PRE")
    assert cfg.train.lr == 5e-3 and cfg.train.steps == 50 and cfg.transfer.labels == 4
    assert cfg.data.scale == 0.5 and cfg.data.size == 48 and cfg.model.channels == (8, 16)
    assert cfg.train.warmup_steps == 20  # the fine-tuning default
    assert cfg.sources["train.lr"] == "command line" and cfg.sources["train.steps"] == "recipe r"
    assert cfg.sources["data.scale"] == "the pretrained run PRE" and cfg.sources["transfer.labels"] == "study s"
    assert cfg.inherited == {"from": "PRE", "changed": {"data.size": {"pretrained": 32, "used": 48}}}
    text = "\n".join(describe(cfg))
    assert "command line: train.lr=0.005" in text and "data.size: the pretrained run used 32" in text
    assert "train.warmup_steps" not in (cfg.sources or {})  # at its default: no source


def test_the_network_of_a_pretrained_run_cannot_be_changed_and_inapplicable_flags_are_refused():
    pre = default_config("pretrain")
    with pytest.raises(ConfigError, match=r"--unet-channels \(model.channels\).*the network comes from the pretrained"):
        resolve("segmentation", [Layer("command line", {"model.channels": (8, 8)}, typed=True)], pre, "PRE")
    with pytest.raises(ConfigError, match="--members .* does not apply to this run: only --strategy probe"):
        resolve("segmentation", [Layer("command line", {"transfer.members": 3}, typed=True)], pre, "PRE")
    with pytest.raises(ConfigError, match="--mask-ratio .* only mae"):
        resolve("pretrain", [Layer("command line", {"corruption.mask_ratio": 0.5}, typed=True)])
    with pytest.raises(ConfigError, match="--unet-channels .* not --arch efficientnet-unet"):
        resolve("pretrain", [Layer("command line", {"corruption.method": "ddep", "model.channels": (8, 8)},
                                   typed=True)])
    # in a recipe the same values are settings of another method, not a mistake: they stay unused
    cfg = resolve("pretrain", [Layer("recipe r", {"corruption.mask_ratio": 0.5})])
    assert cfg.corruption.mask_ratio == 0.5


def test_set_reaches_a_setting_without_a_flag(tmp_path):
    data = write_labeled_dataset(tmp_path / "d", n=4, k=2, n_train=3)
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(out), *TINY, "--set", "train.weight_decay=0.01",
                 "--set", "train.log_every=1"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["weight_decay"] == 0.01 and cfg["sources"]["train.weight_decay"] == "command line"
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "b"), *TINY, "--set", "train.nope=1"]) == 2


def test_spacing_is_inherited_by_a_transfer(tmp_path):
    """--spacing is part of how images become network inputs: a fine-tuning from a run pretrained at a
    spacing resamples the same way (it once used each volume's own grid)."""
    from test_volume_data import make_volume_dataset

    root = make_volume_dataset(tmp_path / "vol")
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    common = [*TINY, "--channels", "1"]
    assert main(["pretrain", "--data", str(root), "--out", str(pre), *common, "--spacing", "1,1,2"]) == 0
    assert main(["finetune", "--data", str(root), "--out", str(ft), "--pretrained", str(pre), "--labels", "2",
                 "--size", "16", "--steps", "1", "--batch-size", "2", "--device", "cpu", "--head-hidden", "8"]) == 0
    assert RunConfig.load(ft / "config.json").data.spacing == (1.0, 1.0, 2.0)


def test_a_studys_spacing_reaches_its_pretraining(tmp_path):
    from labeldiff.study.configs import pretrain_config
    from labeldiff.study.spec import parse_study
    from test_volume_data import make_volume_dataset

    root = make_volume_dataset(tmp_path / "vol")
    study = parse_study({"data": {"path": str(root), "spacing": [1, 1, 2], "channels": 1},
                         "methods": [{"name": "ddpm", "recipe": str(_recipe(tmp_path))}],
                         "strategies": ["full"], "labels": [1]}, tmp_path / "s.yaml")
    assert list(pretrain_config(study, study.methods[0], None).data.spacing) == [1, 1, 2]


def _recipe(tmp_path: Path) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  steps: 1\n")
    return p


def test_one_vocabulary_across_every_command():
    """No command names a concept of the vocabulary a second way, and the everyday flags mean one thing."""
    seen: dict[str, set[str]] = {}
    for name, p in parsers().items():
        for option in options(p):
            assert option not in SYNONYMS, f"labeldiff {name}: {option} names a concept the vocabulary calls otherwise"
            seen.setdefault(option, set()).add(name)
    for flag in VOCABULARY:
        assert flag in seen, flag
    assert "--labels" in options(parsers()["select"]) and "--data" in options(parsers()["select"])


def test_benchmarks_are_not_in_the_everyday_list(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "bench" not in out and "finetune" in out
    with pytest.raises(SystemExit) as e:
        main(["bench", "loop", "--help"])
    assert e.value.code == 0


def test_help_holds_no_measured_results():
    """Help says what an option does; what was measured lives in the docs (no Dice, no 'measured')."""
    for name, p in parsers().items():
        text = (p.description or "") + " ".join(a.help or "" for a in p._actions)
        for word in ("Dice +", "points on", "+0.0", "−0.0", "-0.0", "CI [", "95 % CI"):
            assert word not in text, (name, word)


def test_a_bug_is_not_dressed_as_a_user_error(monkeypatch, capsys):
    import labeldiff.cli.commands as commands

    def broken(args):
        return {}["a key that is not there"]

    monkeypatch.setattr(commands, "cmd_split", broken)
    assert main(["split", "--data", "x", "--out", "y"]) == 1
    err = capsys.readouterr().err
    assert "this is a bug in labeldiff" in err and "Traceback" in err and "KeyError" in err
    assert not err.startswith("error:")


def test_the_reference_pages_are_what_the_code_generates():
    """docs/reference/cli.md and settings.md are generated (`python -m labeldiff.cli.reference docs/reference`)."""
    from labeldiff.cli.reference import cli_markdown, settings_markdown

    docs = Path(__file__).resolve().parents[1] / "docs" / "reference"
    assert (docs / "cli.md").read_text() == cli_markdown(), "run: python -m labeldiff.cli.reference docs/reference"
    assert (docs / "settings.md").read_text() == settings_markdown(), "run: python -m labeldiff.cli.reference docs/reference"


def test_flatten_names_every_declared_setting():
    assert set(flatten(RunConfig())) == {name for name, _, _ in declared()}


def test_augment_auto_follows_the_number_of_labeled_images():
    """auto: none for up to 2 labeled images (or slices), strong above and for whole volumes; the run
    records the choice and why."""
    def augment(**values):
        cfg = resolve("segmentation", [Layer("test", values)])
        return cfg.transfer.augment, cfg.sources.get("transfer.augment", "")

    assert augment(**{"transfer.labels": 1}) == ("none", "derived: --augment auto for 1 labeled slices")
    assert augment(**{"transfer.labels": 2})[0] == "none"
    assert augment(**{"transfer.labels": 3})[0] == "strong"
    assert augment(**{"transfer.labels": 2, "transfer.label_unit": "volumes"})[0] == "strong"
    assert augment(**{"transfer.labels": 1, "transfer.augment": "strong"}) == ("strong", "test")
