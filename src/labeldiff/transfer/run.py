"""One entry point for every transfer strategy: :func:`run_transfer`.

``labeldiff finetune`` and the study's cells both come through here, with the labeled images
either drawn (``transfer.labels`` with ``train.seed``) or given explicitly as stems.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from labeldiff.config import STRATEGIES, RunConfig


def run_transfer(cfg: RunConfig, out: Path, stems: Sequence[str] | None = None, resume: bool = False,
                 overwrite: bool = False) -> dict:
    """Train ``cfg.transfer.strategy`` into the run folder ``out``; returns ``{"step", "loss", "seconds"}``.

    ``cfg``: resolved by :func:`labeldiff.resolve.resolve` (the command line and the study runner do), or
    a config built in Python, resolved here with its non-default values as one layer. ``stems``: the
    labeled images (default: ``transfer.labels`` of the train split, drawn with ``train.seed``).
    """
    strategy = cfg.transfer.strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is unknown; available: {', '.join(STRATEGIES)}")
    stems = list(stems) if stems is not None else None
    if strategy == "probe":
        from labeldiff.transfer.probe_run import run_probe

        if cfg.transfer.synthetic:
            raise ValueError("--synthetic adds pairs to the batches of the fine-tuning loop; the probe trains on the "
                             "pixels of the labeled images only: use --strategy full, decoder, lp-ft or scratch")
        if resume:
            raise ValueError("a probe run trains in seconds to minutes and cannot be resumed; rerun with --overwrite")
        return run_probe(cfg, out, stems, overwrite=overwrite)
    from labeldiff.transfer.finetune import run_finetune

    return run_finetune(cfg, out, stems, resume=resume, overwrite=overwrite)
