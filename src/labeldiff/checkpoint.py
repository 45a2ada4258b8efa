"""Run folders: safetensors weights + ``config.json``; atomic writes; strict loading.

Layout of a run folder::

    .labeldiff-run              made first: marks the folder as a run (only such a folder is ever
                                replaced) and is locked while a process writes the run
    config.json                 the full resolved RunConfig (load needs no flags)
    model.safetensors           weights for downstream use (EMA weights when EMA is on)
    digests.json                {name: [bytes, sha256]} of every weights file in the folder, checked on load
    log.jsonl                   one JSON line per logged step
    checkpoints/step_XXXXXXX/   resumable state: model, ema, optimizer tensors + state.json (the last two
                                kept), with their own digests.json
    latest.json                 {"step": N, "dir": "checkpoints/step_XXXXXXX", "files": {name: [bytes, sha256]}}

Nothing here unpickles: tensors come from safetensors, everything else from JSON. The guarantees are
listed in ``docs/reliability.md``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from labeldiff.errors import NonFiniteError, RunFolderError
from labeldiff.fs import atomic_folder, atomic_write_text  # noqa: F401  (atomic_write_text re-exported)

STRIP_PREFIXES = ("module.", "_orig_mod.")
RUN_MARKER = ".labeldiff-run"  # the first file of every run folder; locked (flock) while a process writes it
DIGESTS = "digests.json"  # {name: [bytes, sha256]} of the weights files of a folder


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


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_digests(folder: Path) -> dict[str, list]:
    try:
        found = json.loads((Path(folder) / DIGESTS).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _record_digest(path: Path, digest: list | None) -> None:
    """Set (or with ``None`` drop) ``path``'s entry in its folder's ``digests.json``, atomically."""
    found = _read_digests(path.parent)
    if digest is None:
        found.pop(path.name, None)
    else:
        found[path.name] = digest
    atomic_write_text(path.parent / DIGESTS, json.dumps(found, indent=1, sort_keys=True))


def nonfinite(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(non-finite values, all values) over the floating-point tensors of ``state``."""
    floats = [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
    bad = sum(int((~torch.isfinite(v)).sum()) for v in floats)
    return bad, sum(v.numel() for v in floats)


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save a state dict as safetensors atomically (temporary file + rename) and record its size and
    sha256 in the folder's ``digests.json``, which :func:`load_weights` checks. Non-finite weights are
    never saved: :class:`NonFiniteError` names how many."""
    path = Path(path)
    bad, total = nonfinite(state)
    if bad:
        raise NonFiniteError(f"{bad:,} of {total:,} weights are not finite (NaN or infinite); {path.name} was not "
                             f"written. Lower --lr, keep --grad-clip on, or use --precision fp32, then --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    _write(clean_state_dict(state), tmp, metadata=metadata)
    digest = [tmp.stat().st_size, sha256_file(tmp)]
    os.replace(tmp, path)
    _record_digest(path, digest)


def rename_weights(src: Path, dst: Path) -> None:
    """Rename a weights file within its folder, moving its digest with it."""
    src, dst = Path(src), Path(dst)
    digest = _read_digests(src.parent).get(src.name)
    os.replace(src, dst)
    if digest is not None:
        _record_digest(dst, digest)
        _record_digest(src, None)


def verify_weights(path: Path) -> None:
    """Check a weights file without keeping its tensors: its size and sha256 against the folder's
    ``digests.json`` (files written before digests existed have no entry) and a readable safetensors
    header. A damaged or unreadable file is a :class:`RunFolderError` of one line naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is this a labeldiff run folder?")
    want = _read_digests(path.parent).get(path.name)
    if want is not None:
        size = path.stat().st_size
        if size != want[0]:
            raise RunFolderError(f"{path}: {size:,} bytes, but {want[0]:,} were written (cut short or altered); "
                                 f"{WEIGHTS_FIX}")
        if sha256_file(path) != want[1]:
            raise RunFolderError(f"{path}: does not match the checksum written with it (altered or damaged on "
                                 f"disk); {WEIGHTS_FIX}")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error type (and OSError, ValueError) for a broken file
        raise RunFolderError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]}); "
                             f"{WEIGHTS_FIX}") from None


WEIGHTS_FIX = "copy it again from where it came from, or train the run again (--overwrite)"


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, checked first by :func:`verify_weights`."""
    verify_weights(path)
    try:
        return load_file(str(path))
    except Exception as e:  # a file that changed between the check and the read
        raise RunFolderError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]}); "
                             f"{WEIGHTS_FIX}") from None


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
    return {f.name: [f.stat().st_size, sha256_file(f)] for f in sorted(Path(folder).iterdir())
            if f.is_file() and f.name != DIGESTS}


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
    for name, state in (("model", model.state_dict()), ("EMA", ema or {})):
        bad, total = nonfinite(state)
        if bad:
            raise NonFiniteError(f"{bad:,} of {total:,} {name} weights are not finite after step {step}; no checkpoint "
                                 f"of it was written. Lower --lr, keep --grad-clip on, or use --precision fp32, then "
                                 f"--resume from the last checkpoint or --overwrite")
    final = run_dir / "checkpoints" / f"step_{step:07d}"
    with atomic_folder(final) as tmp:
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
    try:
        info = json.loads(latest.read_text())
        ck = run_dir / info["dir"]
    except (ValueError, KeyError, TypeError):  # torn or edited by hand: the newest whole checkpoint instead
        whole = next((p for p in reversed(checkpoint_dirs(run_dir)) if damage(p) is None), None)
        if whole is None:
            raise RunFolderError(f"{latest}: not a readable checkpoint pointer and {run_dir} has no whole checkpoint; "
                                 f"start again with --overwrite") from None
        print(f"warning: {latest} is unreadable; resuming from the newest whole checkpoint, {whole.name}")
        info = {"dir": str(whole.relative_to(run_dir)), "files": json.loads((whole / DIGESTS).read_text())}
        atomic_write_text(latest, json.dumps({"step": int(whole.name[5:]), **info}))
        ck = whole
    problem = damage(ck) if "files" in info else None  # checkpoints written before digests: trusted as before
    if problem is not None:
        older = [p for p in reversed(checkpoint_dirs(run_dir)) if p.name < ck.name]
        whole = next((p for p in older if damage(p) is None), None)
        if whole is None:
            raise RunFolderError(f"{ck} is damaged ({problem}) and {run_dir} has no earlier whole checkpoint; "
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


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a folder labeldiff wrote as a run: it holds the run marker, or (runs written
    before the marker) a ``config.json`` of a run, or the demo's ``pretrain/`` and ``runs/``. Only such
    a folder is ever replaced by ``--overwrite``."""
    path = Path(path)
    if (path / RUN_MARKER).is_file():
        return True
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        cfg = None
    if isinstance(cfg, dict) and {"kind", "model", "train"} <= set(cfg):
        return True
    return (path / "pretrain" / "config.json").is_file() and (path / "runs").is_dir()


def _contents(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.name != RUN_MARKER]


def _inside(child: Path, parent: Path) -> bool:
    child, parent = Path(os.path.realpath(child)), Path(os.path.realpath(parent))
    return child == parent or parent in child.parents


_HELD: dict[str, int] = {}  # run folder (real path) → the open, locked marker of this process


def _lock(run_dir: Path) -> None:
    """Create the run marker and hold an exclusive lock on it until :func:`release_run_dir` or the end of
    the process (the kernel drops the lock of a process that died, so a crashed run never blocks)."""
    import fcntl
    import socket

    key = os.path.realpath(run_dir)
    if key in _HELD:
        return
    fd = os.open(run_dir / RUN_MARKER, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunFolderError(f"{run_dir} is being written by {holder}; wait for it to end, or choose another --out") \
            from None
    os.ftruncate(fd, 0)
    os.write(fd, f"labeldiff process {os.getpid()} on {socket.gethostname()}\n".encode())
    _HELD[key] = fd


def release_run_dir(run_dir: Path) -> None:
    """Release the lock :func:`prepare_run_dir` took (the marker stays: the folder is still a run)."""
    fd = _HELD.pop(os.path.realpath(run_dir), None)
    if fd is not None:
        os.close(fd)


def prepare_run_dir(run_dir: Path, overwrite: bool, resume: bool, reads: tuple[Path | str, ...] = (),
                    config=None) -> Path:
    """Create ``run_dir`` (or open it to resume) and lock it for this process.

    Refused with one line, nothing touched: a path that is a file; an existing non-empty folder without
    ``overwrite`` or ``resume``; with ``overwrite``, a folder that is not a labeldiff run
    (:func:`is_run_folder`) or that holds something the run ``reads`` (its data, a pretrained run); a
    folder another process is writing. With ``resume`` and ``config`` (the resolved config of this
    command), a config that differs from the stored one other than in what a resume may change
    (:data:`labeldiff.config.RESUME_MAY_CHANGE`), and a finished run. Under torchrun every rank makes the
    same decision and only rank 0 changes the folder or holds the lock."""
    from labeldiff import distributed

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"--out {run_dir} is a file; give a folder for the run")
    held = run_dir.is_dir() and bool(_contents(run_dir))
    distributed.barrier()  # every rank has looked before rank 0 changes anything
    if held:
        if resume:
            if config is not None:
                check_resume(run_dir, config)
            if distributed.is_main():
                _lock(run_dir)
            distributed.barrier()
            return run_dir
        if not overwrite:
            raise FileExistsError(
                f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                f"or choose another --out")
        if not is_run_folder(run_dir):
            raise RunFolderError(f"--overwrite: {run_dir} is not a labeldiff run folder, so it is left as it is; "
                                 f"--overwrite only replaces a run (or an empty folder): choose another --out")
        inside = next((r for r in reads if r and Path(r).exists() and _inside(r, run_dir)), None)
        if inside is not None:
            raise RunFolderError(f"--overwrite: {run_dir} holds {inside}, which this run reads; choose another --out")
    elif resume:
        raise FileNotFoundError(f"--resume: {run_dir} does not exist or is empty")
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        _lock(run_dir)
        if held:  # replace the run: everything but the (locked) marker goes
            for p in _contents(run_dir):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
    distributed.barrier()
    return run_dir


def check_resume(run_dir: Path, config) -> None:
    """Refuse a resume that would not continue the same run: a finished run, or settings that differ from
    the stored ``config.json`` other than in :data:`~labeldiff.config.RESUME_MAY_CHANGE` (a longer
    ``train.steps`` extends the run; the loop records that)."""
    from labeldiff.config import RESUME_MAY_CHANGE, RunConfig, config_diff

    saved = RunConfig.load(run_dir / "config.json")
    changed = [d for d in config_diff(saved, config) if d[0] not in RESUME_MAY_CHANGE]
    if changed:
        shown = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, a, b in changed[:6])
        more = f" (+{len(changed) - 6} more)" if len(changed) > 6 else ""
        raise RunFolderError(f"--resume: {run_dir} was started with other settings ({shown}{more}); resume with the "
                             f"settings in its config.json, or start a new run with --overwrite or another --out")
    finished = (run_dir / "model.safetensors").is_file() and config.train.steps == saved.train.steps
    if finished:
        raise RunFolderError(f"--resume: {run_dir} is finished (model.safetensors is its result); to train it longer, "
                             f"resume with a larger --steps than {saved.train.steps}; to start again, --overwrite")
