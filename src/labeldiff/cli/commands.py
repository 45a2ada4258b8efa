"""What each command does, after :mod:`labeldiff.cli.parser` has read its options. Settings are resolved
by :func:`labeldiff.resolve.resolve` from the recipe, ``--set`` and the flags (:func:`settings_layers`)."""
from __future__ import annotations

import argparse
import errno
from pathlib import Path

from labeldiff.errors import ConfigError, DataError


def settings_layers(args: argparse.Namespace) -> list:
    """The layers a training command's options give: the recipe, then what was typed (the flags, ``--set``
    and ``--intensity`` / ``--hu-window``), for :func:`labeldiff.resolve.resolve`."""
    from labeldiff.config import declared, load_recipe, parse_value, recipe_values
    from labeldiff.resolve import Layer

    layers = []
    if getattr(args, "recipe", None):
        layers.append(Layer(f"recipe {args.recipe}", recipe_values(load_recipe(args.recipe), str(args.recipe))))
    if getattr(args, "protocol", None):
        from labeldiff import protocols

        protocol = protocols.load(args.protocol)
        kind = "pretrain" if getattr(args, "command", None) == "pretrain" else "segmentation"
        layers.append(Layer(f"protocol {protocol.name}", protocol.values(kind)))
    typed = {"data.path": str(args.data)}
    typed.update({name: getattr(args, name) for name, _, _ in declared() if getattr(args, name, None) is not None})
    for item in getattr(args, "set_values", None) or []:
        name, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: give SECTION.FIELD=VALUE, e.g. --set train.weight_decay=1e-4")
        typed[name.strip()] = parse_value(name.strip(), text)
    if getattr(args, "intensity", None) is not None or getattr(args, "hu_window", None) is not None:
        from labeldiff.data.nnunet import Intensity

        typed["data.intensity"] = Intensity.named(args.intensity or "percentile", args.hu_window).to_dict()
    if typed.get("transfer.labeled") is not None:  # a file of stems (`labeldiff select --out`) → the stems
        from labeldiff.data.splits import labeled_stems

        typed["transfer.labeled"] = labeled_stems(typed["transfer.labeled"])
    layers.append(Layer("command line", typed, typed=True))
    return layers


def _last(layers: list, name: str):
    """The value the last layer that sets ``name`` gives (None: none sets it)."""
    return next((layer.values[name] for layer in reversed(layers) if name in layer.values), None)


def say_next(*commands: str) -> None:
    """The last lines of a command: what a user usually runs next (``command  # why`` each)."""
    for i, line in enumerate(commands):
        print(f"{'next:' if i == 0 else '     '} {line}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from labeldiff.pretrain.run import run_pretrain
    from labeldiff.resolve import resolve
    from labeldiff.runs import DIRECT_SEGMENTERS

    cfg = resolve("pretrain", settings_layers(args))
    preview = None
    if cfg.train.preview_samples:
        from labeldiff.sample.diffusion import preview_hook

        if cfg.corruption.method not in ("ddpm", "hybrid"):
            raise ConfigError(f"--preview-samples: {cfg.corruption.method} runs do not generate images; only ddpm and "
                              f"hybrid runs do")
        preview = preview_hook(args.out, cfg.train.preview_samples)
    result = run_pretrain(cfg, args.out, resume=args.resume, overwrite=args.overwrite, at_checkpoint=preview)
    print(f"done: {result['step']} steps in {result['seconds']:.0f} s, final loss {result['loss']:.4f}; "
          f"run folder {args.out} (model.safetensors, config.json, log.jsonl)")
    data, ft = cfg.data.path, f"{args.out}-ft"
    # a quick pretraining run is fine-tuned with the quick fine-tuning preset (its 32-wide head and 150 steps)
    quick = " --recipe finetune-quick" if str(args.recipe or "").endswith("-quick") else ""
    if cfg.corruption.method in DIRECT_SEGMENTERS:
        say_next(f"labeldiff evaluate --model {args.out} --data TARGET   # it segments as it is: its zero-label score",
                 f"labeldiff finetune --data TARGET --pretrained {args.out} --labels 4 --out {ft}")
        return
    say_next(f"labeldiff select --pretrained {args.out} --data {data} --labels 4 --out to_label.txt   # which images "
             f"to label first",
             f"labeldiff finetune --data {data} --pretrained {args.out}{quick} --labeled to_label.txt --out {ft}   # "
             f"once they have masks (or --labels 4: drawn at random)")


def cmd_finetune(args: argparse.Namespace) -> None:
    from labeldiff.resolve import resolve
    from labeldiff.runs import RunFolder
    from labeldiff.transfer.run import run_transfer

    layers = settings_layers(args)
    pretrained = _last(layers, "transfer.pretrained")
    pre = RunFolder.open(pretrained, flag="--pretrained").require_pretrain().verify() if pretrained else None
    cfg = resolve("segmentation", layers, pre.config if pre else None, str(pretrained) if pre else None)
    if getattr(args, "protocol", None) and pre is not None:
        from labeldiff import protocols

        protocol = protocols.load(args.protocol)
        for unmet in protocol.unmet(pre.config):
            print(f"note: protocol {protocol.name} pretrains with another setting: in {pretrained}, {unmet}; "
                  f"`labeldiff pretrain --protocol {protocol.name}` follows it (a deviation from {protocol.paper})")
    if cfg.transfer.synthetic and cfg.transfer.strategy != "probe":  # the probe refuses it in run_transfer
        from labeldiff.runtime import resolve_device
        from labeldiff.sample.synthetic import ensure_synthetic

        ensure_synthetic(cfg.transfer.synthetic, resolve_device(cfg.train.device))
    result = run_transfer(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    if cfg.transfer.strategy == "probe":
        print(f"done: probe trained ({result['step']} member-epochs) in {result['seconds']:.0f} s; run folder "
              f"{args.out} (probe.safetensors, backbone.safetensors, config.json, labeled.json)")
    else:
        print(f"done: {result['step']} steps in {result['seconds']:.0f} s, final loss {result['loss']:.4f}; run "
              f"folder {args.out} (model.safetensors, config.json, labeled.json: the images it trained on)")
    lines = [f"labeldiff evaluate --model {args.out}   # Dice / IoU on its test split, into "
             f"{Path(args.out) / ('eval_' + cfg.data.test_split)}",
             f"labeldiff predict --model {args.out} --input NEW_IMAGES --out {args.out}-masks"]
    if cfg.transfer.strategy != "scratch":
        scratch = f"{args.out}-scratch"
        lines += [f"{baseline_command(args.argv, scratch)}   # the baseline: the same network, images and schedule "
                  f"from random weights", f"labeldiff compare {args.out} {scratch}   # did pretraining help, "
                  f"paired per test image"]
    say_next(*lines)


def baseline_command(argv: list[str], out: str) -> str:
    """The fine-tuning command ``argv`` again with ``--strategy scratch`` and ``--out out`` (and without
    ``--resume`` / ``--overwrite``): the scratch run that a pretrained run is compared with."""
    import shlex

    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--strategy", "--out"):
            skip = "=" not in arg
            continue
        if name not in ("--resume", "--overwrite"):
            kept.append(arg)
    return "labeldiff " + shlex.join([*kept, "--strategy", "scratch", "--out", out])


def cmd_evaluate(args: argparse.Namespace) -> None:
    from labeldiff.evaluate.instances import parse_metrics
    from labeldiff.evaluate.run import evaluate

    corruptions = severities = None
    if args.corruptions:
        from labeldiff.evaluate.corruptions import parse_corruptions, parse_severities

        corruptions, severities = parse_corruptions(args.corruptions), parse_severities(args.severities)
    evaluate(args.model, args.out, data=args.data, split=args.split, split_file=args.split_file,
             corruptions=corruptions, severities=severities, corruption_seed=args.corruption_seed,
             slab=_slab(args.slab), axis=args.axis, intensity=args.intensity, hu_window=args.hu_window,
             device=args.device, precision=args.precision, tta=args.tta, overlays=args.overlays,
             overlay_count=args.overlay_count, metrics=parse_metrics(args.metrics))


def _slab(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        first, last = (int(v) for v in text.split(":"))
    except ValueError:
        raise ConfigError(f"--slab takes FIRST:LAST slice indices (e.g. 113:180), not {text!r}") from None
    if first > last or first < 0:
        raise ConfigError(f"--slab {text}: need 0 <= FIRST <= LAST")
    return first, last


def cmd_predict(args: argparse.Namespace) -> None:
    from labeldiff.evaluate.run import run_predict

    run_predict(args.model, args.input, args.out, device=args.device, tta=args.tta, precision=args.precision,
                axis=args.axis, intensity=args.intensity, hu_window=args.hu_window, overwrite=args.overwrite,
                probabilities=args.probabilities)


def cmd_sample(args: argparse.Namespace) -> None:
    from labeldiff.runs import RunFolder
    from labeldiff.runtime import resolve_device
    from labeldiff.sample.diffusion import sample, sample_masks, save_samples

    from labeldiff.data.guard import check_output_folder

    check_output_folder(args.out)  # generated images never land in a dataset's images/
    run = RunFolder.open(args.model).require_pretrain("--model")
    model, cfg = run.pretext_network(resolve_device(args.device)), run.config
    images = sample(model, cfg, n=args.n, sampler=args.sampler, steps=args.steps, seed=args.seed,
                    batch_size=args.batch_size, precision=args.precision)
    masks = (sample_masks(model, cfg, images, args.batch_size, precision=args.precision)
             if cfg.corruption.method == "hybrid" else None)
    grid = save_samples(images, args.out, masks=masks, num_classes=cfg.num_classes)
    pairs = " (image, mask) pairs" if masks is not None else ""
    print(f"wrote {args.n} samples{pairs} to {args.out} (sample_XXX.png) and {grid}")
    say_next(f"labeldiff evaluate-samples --samples {args.out} --data {cfg.data.path}   # FID, KID, precision/recall "
             f"against the real images")


def cmd_evaluate_samples(args: argparse.Namespace) -> None:
    from labeldiff.evaluate.samples import evaluate_samples, summary, write_report
    from labeldiff.runtime import resolve_device

    report = evaluate_samples(args.samples, args.data, split=args.split, size=args.size, n=args.n,
                              inception=args.inception, kid_subsets=args.kid_subsets,
                              kid_subset_size=args.kid_subset_size, k=args.neighbours, crops=args.crops, scale=args.scale,
                              seed=args.seed, device=resolve_device(args.device), batch_size=args.batch_size)
    print(summary(report))
    out = args.out or Path(args.samples) / "report.json"
    from labeldiff.data.guard import check_output_folder

    check_output_folder(Path(out).parent, flag="--out's folder")
    write_report(report, out)
    print(f"wrote {out}")


def cmd_select(args: argparse.Namespace) -> None:
    from labeldiff.checkpoint import atomic_write_text
    from labeldiff.study.select import images_to_label

    picks = images_to_label(args.pretrained, args.data, args.labels, args.seed, args.rule)
    lines = [f"{s.stem}\t{s.image}" for s in picks]
    print(f"label these {len(picks)} ({args.rule} on the decoder features of {args.pretrained}, seed {args.seed}):")
    print("\n".join(f"  {line}" for line in lines))
    if args.out:
        atomic_write_text(args.out, "\n".join(lines) + "\n")
        print(f"wrote {args.out} (stem, tab, file per line)")
    else:
        print("(--out FILE writes these lines, for finetune --labeled FILE)")
    say_next("label them: a mask per image in masks/, under the image's name",
             f"labeldiff finetune --data {args.data} --pretrained {args.pretrained} --labeled {args.out or 'FILE'} "
             f"--out {args.pretrained}-ft   # trains on exactly these images")


def cmd_split(args: argparse.Namespace) -> None:
    from labeldiff.data.splits import write_split

    _, what = write_split(args.data, args.out, groups=args.groups, test_fraction=args.test_fraction, seed=args.seed,
                          slab_train=args.slab_train, gap=args.gap, axis=args.axis, spacing=args.spacing,
                          overwrite=args.overwrite)
    print(f"wrote {args.out}: {what}")
    default = Path(args.out).resolve() == (Path(args.data) / "split.json").resolve()
    split = "" if default else f" --split-file {args.out}"
    say_next(f"labeldiff pretrain --data {args.data}{split} --recipe ddpm-quick --out runs/pre   # leaves the test "
             f"split out")


def cmd_study(args: argparse.Namespace) -> None:
    from labeldiff.study import run_study

    rows = run_study(args.study, args.out, dry_run=args.dry_run, report_only=args.report_only,
                     pretrain_only=args.pretrain_only, pretrain_dir=args.pretrain_dir, workers=args.workers,
                     shard=args.shard)
    if args.shard is not None or args.pretrain_only:
        return
    if args.dry_run:
        say_next(f"labeldiff study {args.study} --out {args.out}   # runs what is todo; resumable, finished cells "
                 f"are kept")
        return
    if rows:
        print(f"results: {args.out}/report.html (all of it in one page: open it in a browser), verdict.md (did "
              f"pretraining help, per k), results.md, paired.md, paired.png, results.csv; each cell's run and scores "
              f"in {args.out}/cells/")
        say_next(f"python -m labeldiff.study.pages {args.out}   # one page: the question, the verdict, the tables",
                 "more seeds for the same comparison: a study file with `extends: "
                 f"{Path(args.study).name}` and a longer `seeds:` list")


def _results_csv(path: Path) -> Path:
    csv = path / "results.csv" if path.is_dir() else path
    if not csv.is_file():
        out = path.parent if path.suffix == ".csv" else path
        raise DataError(f"{path}: no results.csv there; give a study folder (--out of `labeldiff study`) or "
                                f"its results.csv (`labeldiff study STUDY.yaml --out {out} --report-only` writes it "
                                f"from the finished cells)")
    return csv


def _two_names(names: tuple[str, str]) -> tuple[str, str]:
    """Two folders of one name: say which is which."""
    return (f"{names[0]} (A)", f"{names[1]} (B)") if names[0] == names[1] else names


def cmd_export(args: argparse.Namespace) -> None:
    from labeldiff.export import export

    out = export(args.run, args.out, args.format, args.license)
    if args.format == "bundle":
        print(f"wrote the MONAI bundle {out} (configs/, models/model.ts, scripts/, docs/README.md)")
        say_next(f"cd {out} && python -m monai.bundle run --config_file configs/inference.json --dataset_dir "
                 f"IMAGES --output_dir MASKS   # no labeldiff needed")
    else:
        print(f"wrote {out}")


def cmd_compare(args: argparse.Namespace) -> None:
    """Two studies (cell by cell) or two runs (image by image), decided from what the paths are."""
    from labeldiff.study.paired_runs import FORMS, form_of

    forms = []
    for p in (args.a, args.b):
        try:
            forms.append(form_of(p))
        except DataError:
            forms.append(None)
    if "study" in forms and set(forms) <= {"study", None}:
        if args.groups is not None:
            raise ConfigError("--groups pairs test images of two runs by video or patient; two studies are paired "
                              "by cell (seed), each cell already a mean over its test images: leave --groups out")
        return _compare_studies(args)
    if "study" in forms:
        study, other = (args.a, args.b) if forms[0] == "study" else (args.b, args.a)
        raise DataError(f"{study} is a study and {other} a single run; compare takes two of one form: {FORMS}")
    if args.split is not None and "run" not in forms:
        raise ConfigError("--split picks a run folder's eval_<split>/; with evaluation folders leave it out")
    _compare_runs(args)


def _compare_runs(args: argparse.Namespace) -> None:
    from labeldiff.checkpoint import atomic_write_text
    from labeldiff.study.paired_runs import open_evaluation, paired_runs, runs_markdown, summary_line, test_groups
    from labeldiff.evaluate.report import save_figure
    from labeldiff.study.plots import run_differences_figure

    def evaluate_it(run: Path, out: Path, split: str) -> None:
        from labeldiff.evaluate.run import evaluate

        evaluate(run, out, split=split)

    a, b = (open_evaluation(p, args.split, evaluate_it) for p in (args.a, args.b))
    names = _two_names(args.names or (a.name, b.name))
    groups, groups_from = test_groups(a, args.groups)
    result = paired_runs(a, b, args.metric, groups=groups)
    text = runs_markdown(a, b, result, names, groups_from=groups_from)
    print(text if args.out else runs_markdown(a, b, result, names, rows=10, groups_from=groups_from), end="")
    print(summary_line(result, names))
    if args.out:
        from labeldiff.study import html_report

        atomic_write_text(args.out, text)
        plot = Path(args.out).with_suffix(".png")
        save_figure(run_differences_figure(result["stems"], result["diffs"], result, names, args.metric), plot)
        images, note = html_report.extreme_images(a, b, result)
        page = html_report.write_page(Path(args.out).with_suffix(".html"), html_report.runs_page(
            f"{names[0]} − {names[1]}", text, plot, images, note, names, a.num_classes, args.metric))
        print(f"wrote {args.out}, {plot} and {page} ({html_report.size_words(page)}: the table, the plot and the "
              f"images where {names[0]} is most behind and most ahead, in one page that opens offline)")
    else:
        print("(--out FILE.md also writes the table of every image, FILE.png, the plot of the per-image "
              "differences, and FILE.html, all in one page with the images where each run is most ahead)")


def _compare_studies(args: argparse.Namespace) -> None:
    from labeldiff.checkpoint import atomic_write_text
    from labeldiff.study.report import compare_markdown, read_csv

    if args.split is not None:
        raise ConfigError("--split picks a run folder's eval_<split>/; two studies are paired cell by cell: "
                          "leave it out")
    csvs = [_results_csv(p) for p in (args.a, args.b)]
    names = _two_names(args.names or tuple(c.resolve().parent.name for c in csvs))
    rows = [read_csv(c) for c in csvs]
    for c, r in zip(csvs, rows):
        missing = [col for col in ("cell", "method", "strategy", "k", "seed", "stems", args.metric)
                   if r and col not in r[0]]
        if missing:
            hint = (" (--metric: dice, iou, or a dice_<class> column)" if args.metric in missing else
                    " (written by an older labeldiff? `labeldiff study STUDY.yaml --out FOLDER --report-only` "
                    "rewrites it)")
            raise DataError(f"{c} has no column {', '.join(missing)}{hint}")
    text = compare_markdown(rows[0], rows[1], tuple(names), metric=args.metric)
    print(text, end="")
    if args.out:
        from labeldiff.study import html_report

        atomic_write_text(args.out, text)
        page = html_report.write_page(Path(args.out).with_suffix(".html"),
                                      html_report.studies_page(f"{names[0]} − {names[1]}", text))
        print(f"wrote {args.out} and {page} (the same table as a page to open in a browser)")


def cmd_family(args: argparse.Namespace) -> None:
    from labeldiff.checkpoint import atomic_write_text
    from labeldiff.study.family import family_markdown, judge_registry

    families = judge_registry(args.registry, args.metric)
    text = family_markdown(families)
    print(text, end="")
    for fam in families:
        print(f"{fam.name}: {sum(r['survives'] for r in fam.judged)} of {len(fam.judged)} primaries survive Holm at "
              f"α = {fam.alpha:g}")
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")


def cmd_bench(args: argparse.Namespace) -> None:
    if args.what == "probe-memory":
        from labeldiff.bench.probe_memory import bench_probe_memory_cli

        bench_probe_memory_cli(str(args.pretrained), str(args.data), labels=args.labels, seed=args.seed,
                               size=args.size, members=args.members, max_epochs=args.max_epochs,
                               patience=args.patience, threads=args.threads, train_split=args.train_split,
                               test_split=args.test_split)
    elif args.what == "loop":
        from labeldiff.bench.efficiency import bench_loop, format_loop
        from labeldiff.resolve import resolve

        layers = settings_layers(args)
        cfg = resolve("pretrain", layers)
        result = bench_loop(cfg, steps=_last(layers, "train.steps") or 30, workers=args.workers, profile=args.profile)
        print(format_loop(result, f"loop efficiency: {cfg.corruption.method} on {args.data} "
                                  f"({args.recipe or 'default settings'})"))
    elif args.what == "ddp":
        from labeldiff.bench.ddp import bench_ddp, format_ddp, format_estimate, paper_estimate, step_cost
        from labeldiff.config import declaration, load_recipe, recipe_values
        from labeldiff.resolve import Layer, resolve

        layers = settings_layers(args)
        cfg = resolve("pretrain", layers)
        steps = _last(layers, "train.steps") or 30
        given = []  # the command line again, for the torchrun children (their --steps is the benchmark's)
        for name, value in layers[-1].values.items():
            if name in ("data.path", "train.steps", "data.intensity"):
                continue
            flag = declaration(name).flag
            given += [flag, _flag_text(value)] if flag else ["--set", f"{name}={_flag_text(value)}"]
        if args.intensity is not None or args.hu_window is not None:
            given += ["--intensity", args.intensity or "percentile"] + (
                ["--hu-window", *map(str, args.hu_window)] if args.hu_window else [])
        recipe = ["--recipe", str(args.recipe)] if args.recipe else []
        result = bench_ddp(cfg, ["--data", str(args.data), *recipe, *given], steps=steps)
        print(format_ddp(result, f"ddp: labeldiff pretrain on {args.data} ({args.recipe or 'default settings'}) "
                                 f"under torchrun, gloo"))
        if args.estimate_recipe:
            big = resolve("pretrain", [Layer(f"recipe {args.estimate_recipe}",
                                             recipe_values(load_recipe(args.estimate_recipe)))])
            cost = step_cost(big)
            est = paper_estimate(cost, big.train.steps, args.gpus, one_gpu_s=args.gpu_step_seconds)
            print("\n" + format_estimate(cost, est, big.train.steps,
                                         f"paper estimate: {args.estimate_recipe} on {args.gpus} GPUs"))
    elif args.what == "predict":
        from labeldiff.bench.efficiency import bench_predict, format_predict

        result = bench_predict(args.model, args.input, sw_batch_size=args.sw_batch_size, repeats=args.repeats,
                               device=args.device, io_threads=args.io_threads)
        print(format_predict(result, f"predict efficiency: {args.model} on {args.input}"))


def _flag_text(value) -> str:
    """A parsed flag value written back as the command line spells it (tuples as ``a,b``)."""
    if isinstance(value, (tuple, list)):
        return ",".join(_flag_text(v) for v in value)
    return str(int(value)) if isinstance(value, bool) else str(value)


def cmd_demo(args: argparse.Namespace) -> None:
    from labeldiff.demo import run_demo

    run_demo(Path(args.out), pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps,
             seeds=args.n_seeds, labels=args.labels, overwrite=args.overwrite, precision=args.precision)


WRITE_ERRORS = {errno.ENOSPC: "free some space or choose another --out",
                errno.EDQUOT: "free some of your quota or choose another --out",
                errno.EFBIG: "raise the file-size limit (ulimit -f) or choose another --out",
                errno.EROFS: "choose an --out folder on a writable disk",
                errno.EACCES: "choose an --out folder you may write to",
                errno.EPERM: "choose an --out folder you may write to"}


def write_error(e: BaseException) -> str | None:
    """One line for a failed write (full disk, quota, file-size limit, read-only or forbidden folder), else None."""
    if isinstance(e, OSError) and e.errno in WRITE_ERRORS:
        where = f"cannot write {e.filename}" if e.filename else "cannot write"
        return f"{where}: {e.strerror or e}; {WRITE_ERRORS[e.errno]}"
    return None
