"""Writing files and folders so that a reader never sees half of one: write beside the target, then
rename. Imports nothing of labeldiff, so every floor may use it."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Write the folder ``path`` whole or not at all: yields ``PATH.tmp`` (a sibling, not yet created;
    one left by a killed writer is deleted first) and, when the block ends without an exception, renames
    it to ``path``. A folder already at ``path`` is set aside (``PATH.old``) during the rename and then
    deleted, so a reader of ``path`` finds the old folder or the new one, never half of either. On an
    exception the temporary folder is deleted and ``path`` is left as it was.

    ``with atomic_folder(cell / "eval") as tmp: evaluate(..., out=tmp)``
    """
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
