"""``labeldiff pretrain``: a pretext task on unlabeled images (or a labeled source), through the one loop."""
from __future__ import annotations

from pathlib import Path

import torch

from labeldiff import distributed
from labeldiff.checkpoint import prepare_run_dir, release_run_dir
from labeldiff.config import RunConfig, replace
from labeldiff.corruption import FROZEN_ENCODER, Corruption, build_corruption
from labeldiff.data import provenance
from labeldiff.data.datasets import StepBatches
from labeldiff.data.folders import Sample, dataset_root, open_labeled
from labeldiff.data.nnunet import dataset_num_classes
from labeldiff.data.splits import pretraining_samples
from labeldiff.data.validation import check_scaled_images, validate_samples
from labeldiff.models.effunet import imagenet_encoder_state, init_encoder
from labeldiff.models.unet import build_network, check_input_size, check_step_memory
from labeldiff.pretrain.loop import train
from labeldiff.resolve import describe, resolved
from labeldiff.runs import RunFolder
from labeldiff.pretrain.cost import calibrate
from labeldiff.runtime import compute_summary, generator, resolve_device, resolve_precision
from labeldiff.errors import ConfigError


def pretext_loss(corruption: Corruption):
    """loss = f(model, corruption, batch): the network never knows which pretext task it serves."""

    def loss_fn(model: torch.nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
        c = corruption(batch["image"], g, batch.get("mask"))  # on the batch's device, noise from g
        return corruption.loss(model(c.input, c.t), c)

    return loss_fn


def micro_batch(cfg: RunConfig) -> int:
    """Images one process computes at once: the batch over the processes and the accumulation steps."""
    return max(1, cfg.train.batch_size // (distributed.world_size() * cfg.train.grad_accum))


def training_samples(cfg: RunConfig, corruption: Corruption, quiet: bool = False) -> tuple[list[Sample], int | None]:
    """Unlabeled images, or the labeled ``train_split`` for hybrid / supervised (with K); ``quiet``: without
    the line saying which images pretraining leaves out."""
    if not corruption.needs_labels:
        samples, _, why = pretraining_samples(cfg.data)
        if not quiet:
            print(why)
        return samples, None
    if cfg.data.ignore_index is not None:
        raise ConfigError(f"--ignore-index is for fine-tuning, the probe and evaluation; {cfg.corruption.method} "
                         f"pretraining learns every mask pixel (a hybrid model generates the mask), so give it "
                         f"fully labeled masks")
    ds = open_labeled(cfg.data, split_file=cfg.data.split_file)
    samples = ds.samples(ds.stems(cfg.data.train_split))
    return samples, validate_samples(samples, cfg.data.num_classes or dataset_num_classes(ds.root))


def split_file_of(cfg: RunConfig) -> Path:
    """The split file a run on ``cfg.data`` reads: ``data.split_file`` or the dataset's ``split.json``."""
    return Path(cfg.data.split_file) if cfg.data.split_file else dataset_root(Path(cfg.data.path)) / "split.json"


def encoder_weights(source: str) -> dict[str, torch.Tensor] | None:
    """``model.encoder`` of efficientnet-unet: ``none`` (random), ``imagenet`` or a run folder's encoder."""
    if source == "none":
        return None
    if source == "imagenet":
        return imagenet_encoder_state()
    return RunFolder.open(source, flag="--encoder").encoder_state()


def build_pretrain_network(cfg: RunConfig, corruption: Corruption) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """The network to pretrain and the modules that stay frozen (DDeP's encoder)."""
    model = build_network(cfg.model, out_channels=corruption.out_channels(cfg.model.in_channels, cfg.num_classes))
    frozen: list[torch.nn.Module] = []
    if cfg.model.arch == "efficientnet-unet":
        state = encoder_weights(cfg.model.encoder)
        loaded = init_encoder(model, state) if state is not None else []
        if loaded:
            print(f"encoder: {len(loaded)} tensors from {cfg.model.encoder}")
        if cfg.corruption.method in FROZEN_ENCODER:
            if cfg.model.encoder == "none":
                raise ConfigError("ddep freezes the encoder, so it needs trained encoder weights: --encoder imagenet "
                                 "or --encoder RUN_DIR (use --method dep to train a random encoder too)")
            model.encoder.requires_grad_(False)
            frozen.append(model.encoder)
    return model, frozen


def calibrate_pretrain(cfg: RunConfig) -> float:
    """Seconds of one training step of the resolved ``cfg`` on this machine, measured on real batches of its
    data with a network built for the measurement and thrown away (:func:`labeldiff.pretrain.cost.calibrate`);
    a study's ``--dry-run`` prints it. Writes nothing."""
    corruption = build_corruption(cfg.corruption)
    check_input_size(cfg.model, cfg.data.size)
    samples, num_classes = training_samples(cfg, corruption, quiet=True)
    device = resolve_device(cfg.train.device)
    check_step_memory(cfg.model, cfg.data.size, micro_batch(cfg), cfg.data.channels, device)
    model, _ = build_pretrain_network(replace(cfg, num_classes=num_classes), corruption)
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    batches = StepBatches(samples, cfg.data, cfg.train.batch_size, cfg.train.seed, labeled=corruption.needs_labels,
                          num_classes=num_classes)
    loss_fn, drawn = pretext_loss(corruption), iter(range(2))

    def draw() -> dict:
        i = next(drawn)
        return {"i": i, **{k: v.to(device) for k, v in batches[i].items()}}

    def step(net: torch.nn.Module, batch: dict) -> torch.Tensor:
        return loss_fn(net, batch, generator(batch.pop("i"), device))

    return calibrate(model, optimizer, step, draw, resolve_precision(cfg.train.precision, device))


def run_pretrain(cfg: RunConfig, out: Path, resume: bool = False, overwrite: bool = False,
                 at_checkpoint=None) -> dict:
    """Pretrain into the run folder ``out``. ``cfg``: resolved by :func:`labeldiff.resolve.resolve` (the
    command line and the study runner do), or a config built in Python, resolved here with its non-default
    values as one layer. ``at_checkpoint(step, weights)``: see :func:`labeldiff.pretrain.loop.train`
    (``labeldiff pretrain --preview-samples`` passes :func:`labeldiff.sample.diffusion.preview_hook`)."""
    cfg = resolved(cfg if cfg.kind == "pretrain" else replace(cfg, kind="pretrain"))
    for line in describe(cfg):
        print(line)
    corruption = build_corruption(cfg.corruption)
    check_input_size(cfg.model, cfg.data.size)
    samples, cfg.num_classes = training_samples(cfg, corruption)  # validates before anything is written
    check_scaled_images(samples, cfg.data)
    if cfg.model.arch == "efficientnet-unet" and cfg.model.encoder not in ("imagenet", "none"):
        RunFolder.open(cfg.model.encoder, flag="--encoder").verify()
    corruption.check_input_size(cfg.data.size)
    device = distributed.setup(resolve_device(cfg.train.device))  # torchrun: join the process group
    distributed.check_batch(cfg.train.batch_size, cfg.train.grad_accum)  # before the run folder exists
    check_step_memory(cfg.model, cfg.data.size, micro_batch(cfg), cfg.data.channels, device)
    reads = (cfg.data.path, cfg.data.split_file, cfg.model.encoder)
    out = prepare_run_dir(Path(out), overwrite=overwrite, resume=resume, reads=reads, config=cfg)
    try:
        return _pretrain(cfg, out, corruption, samples, device, resume, at_checkpoint)
    finally:
        release_run_dir(out)


def _pretrain(cfg: RunConfig, out: Path, corruption: Corruption, samples: list[Sample], device: torch.device,
              resume: bool, at_checkpoint=None) -> dict:
    if distributed.is_main():  # what it read, so that it is never scored on it (labeldiff.data.provenance)
        provenance.write(out, provenance.record(cfg.data.path, split_file_of(cfg), [s.stem for s in samples],
                                                labeled=corruption.needs_labels, include_test=cfg.data.include_test))
    torch.manual_seed(cfg.train.seed)
    model, frozen = build_pretrain_network(cfg, corruption)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in trainable)
    labels = f", {len(samples)} labeled (K={cfg.num_classes})" if corruption.needs_labels else f", {len(samples)} images"
    print(f"pretrain {cfg.corruption.method}{labels}: {cfg.model.arch} {n_params / 1e6:.2f}M parameters "
          f"({n_train / 1e6:.2f}M trained), {cfg.train.steps} steps of batch {cfg.train.batch_size} at "
          f"{cfg.data.size}² on {compute_summary(device, cfg.train.precision)}")
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    batches = StepBatches(samples, cfg.data, cfg.train.batch_size, cfg.train.seed,
                          labeled=corruption.needs_labels, num_classes=cfg.num_classes)
    return train(out, cfg, model, optimizer, pretext_loss(corruption), batches, resume=resume,
                 desc=f"pretrain {cfg.corruption.method}", frozen=frozen, at_checkpoint=at_checkpoint)

