"""Run folders: safetensors weights + ``config.json``; atomic writes; strict loading.

Layout of a run folder::

    config.json                 the full resolved RunConfig (load needs no flags)
    model.safetensors           weights for downstream use (EMA weights when EMA is on)
    log.jsonl                   one JSON line per logged step
    checkpoints/step_XXXXXXX/   resumable state: model, ema, optimizer tensors + state.json (the last two kept)
    latest.json                 {"step": N, "dir": "checkpoints/step_XXXXXXX", "files": {name: [bytes, sha256]}}

Nothing here unpickles: tensors come from safetensors, everything else from JSON.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STRIP_PREFIXES = ("module.", "_orig_mod.")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP / torch.compile prefixes and make every tensor contiguous and detached."""
    out = {}
    for key, value in state.items():
        while key.startswith(STRIP_PREFIXES):  # any order, e.g. torch.compile(DDP(m)): "_orig_mod.module."
            key = key[len(next(p for p in STRIP_PREFIXES if key.startswith(p))):]
        out[key] = value.detach().contiguous().clone()
    return out


def _write(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file``, whose failed writes (a full disk, a read-only folder) come back as the
    OSError they are, naming the file: safetensors reports them as its own error with the number in the text."""
    from safetensors import SafetensorError

    try:
        save_file(state, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save a state dict as safetensors atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    _write(clean_state_dict(state), tmp, metadata=metadata)
    os.replace(tmp, path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is this a labeldiff run folder?")
    return load_file(str(path))


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into flat tensors (safetensors) and JSON-able metadata."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.contiguous()  # channels-last moments: packed for safetensors
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def file_digests(folder: Path) -> dict[str, list]:
    """``{name: [bytes, sha256]}`` of every file in a checkpoint folder."""
    import hashlib

    out = {}
    for f in sorted(Path(folder).iterdir()):
        if f.is_file() and f.name != "digests.json":
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            out[f.name] = [f.stat().st_size, h.hexdigest()]
    return out


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder (a missing, truncated or altered file against the digests
    written with it), or None when it is whole."""
    folder = Path(folder)
    try:
        want = json.loads((folder / "digests.json").read_text())
    except (OSError, ValueError):
        return "no readable digests.json"
    have = file_digests(folder) if folder.is_dir() else {}
    for name, (size, sha) in want.items():
        if name not in have:
            return f"{name} is missing"
        if have[name][0] != size:
            return f"{name} has {have[name][0]} bytes, {size} were written"
        if have[name][1] != sha:
            return f"{name} does not match its checksum"
    return None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders ``checkpoints/step_XXXXXXX``, oldest first (not ``.tmp`` or
    ``.damaged`` ones)."""
    import re

    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"step_\d{7}", p.name))


def _fsync_folder(folder: Path) -> None:
    for f in Path(folder).iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    ema: dict[str, torch.Tensor] | None, extra: dict[str, Any], keep: int = 2) -> Path:
    """Write a resumable checkpoint for ``step`` atomically (a temporary folder, its files' sizes and
    checksums in ``digests.json``, flushed to disk, then renamed) and point ``latest.json`` at it. The
    last ``keep`` checkpoints stay, so a damaged one has a predecessor to fall back to."""
    run_dir = Path(run_dir)
    final = run_dir / "checkpoints" / f"step_{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _write(clean_state_dict(model.state_dict()), tmp / "model.safetensors")
    if ema is not None:
        _write(clean_state_dict(ema), tmp / "ema.safetensors")
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    rng = {"torch_cpu": torch.get_rng_state()}
    _write({**{f"optim.{k}": v for k, v in opt_tensors.items()}, **{f"rng.{k}": v for k, v in rng.items()}},
           tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_meta, **extra}))
    digests = file_digests(tmp)
    (tmp / "digests.json").write_text(json.dumps(digests))
    _fsync_folder(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(run_dir / "latest.json", json.dumps({"step": step, "dir": str(final.relative_to(run_dir)),
                                                           "files": digests}))
    for p in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(p)
    return final


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Read the latest whole resumable checkpoint of a run folder (no unpickling). The one ``latest.json``
    names is checked against the sizes and checksums written with it; if it is damaged (a kill during a
    write that bypassed the rename, a disk fault), the newest earlier whole checkpoint is used instead,
    and the run says so."""
    run_dir = Path(run_dir)
    latest = run_dir / "latest.json"
    if not latest.is_file():
        raise FileNotFoundError(f"{run_dir} has no checkpoint to resume from (no latest.json)")
    info = json.loads(latest.read_text())
    ck = run_dir / info["dir"]
    problem = damage(ck) if "files" in info else None  # checkpoints written before digests: trusted as before
    if problem is not None:
        older = [p for p in reversed(checkpoint_dirs(run_dir)) if p.name < ck.name]
        whole = next((p for p in older if damage(p) is None), None)
        if whole is None:
            raise ValueError(f"{ck} is damaged ({problem}) and {run_dir} has no earlier whole checkpoint; "
                             f"start again with --overwrite")
        print(f"warning: {ck.name} is damaged ({problem}); resuming from {whole.name} instead (the damaged "
              f"one is kept as {ck.name}.damaged)")
        ck.rename(ck.with_name(ck.name + ".damaged"))  # out of the rotation: never read or counted again
        atomic_write_text(latest, json.dumps({"step": int(whole.name[5:]), "dir": str(whole.relative_to(run_dir)),
                                              "files": json.loads((whole / "digests.json").read_text())}))
        ck = whole
    meta = json.loads((ck / "state.json").read_text())
    state = load_file(str(ck / "state.safetensors"))
    opt_tensors = {k[len("optim."):]: v for k, v in state.items() if k.startswith("optim.")}
    return {
        "step": meta["step"],
        "model": load_file(str(ck / "model.safetensors")),
        "ema": load_file(str(ck / "ema.safetensors")) if (ck / "ema.safetensors").exists() else None,
        "optimizer": optimizer_from_tensors(opt_tensors, meta["optimizer"]),
        "rng": {k[len("rng."):]: v for k, v in state.items() if k.startswith("rng.")},
        "extra": {k: v for k, v in meta.items() if k not in ("step", "optimizer")},
    }


def prepare_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> Path:
    """Create ``run_dir``; refuse to touch an existing non-empty one unless told how. Under torchrun
    every rank makes the same decision and only rank 0 changes the folder."""
    from labeldiff import distributed

    run_dir = Path(run_dir)
    held = run_dir.exists() and any(run_dir.iterdir())
    distributed.barrier()  # every rank has looked before rank 0 changes anything
    if held:
        if resume:
            return run_dir
        if not overwrite:
            raise FileExistsError(
                f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                f"or choose another --out")
        if distributed.is_main():
            shutil.rmtree(run_dir)
    elif resume:
        raise FileNotFoundError(f"--resume: {run_dir} does not exist or is empty")
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    return run_dir
