"""The recipes labeldiff ships: one YAML per published method and its CPU-scale variant, installed with
the package. A recipe is addressed by name (``ddpm-cpu``) or by path (``path/to/mine.yaml``).

:func:`lookup` is also how :mod:`labeldiff.examples` finds its example studies. Imports nothing of
labeldiff but its errors, so every floor may use it.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from labeldiff.errors import ConfigError

FOLDER = Path(__file__).resolve().parent
SUFFIXES = (".yaml", ".yml")


def names(folder: Path = FOLDER) -> list[str]:
    """The shipped names in ``folder``: its YAML files without the suffix, sorted."""
    return sorted(p.stem for p in folder.iterdir() if p.suffix in SUFFIXES)


def lookup(folder: Path, what: str, name_or_path: str | Path, bases: Iterable[Path] = ()) -> Path:
    """The file ``name_or_path`` stands for: a shipped file of ``folder`` or a YAML on disk.

    - A bare name (no folder, no ``.yaml``) is a shipped one: ``ddpm-cpu`` → ``FOLDER/ddpm-cpu.yaml``.
    - Anything else is a path: absolute, or relative to each of ``bases`` in turn (a study passes its
      own folder, then the current directory), else to the current directory. The first that exists wins.
    - A path that exists nowhere but names a shipped file by its stem — ``ddpm-cpu.yaml``, or
      ``recipes/ddpm-cpu.yaml`` as studies wrote it when the recipes lived in the checkout — is the
      shipped one.

    Raises :class:`ConfigError` with the shipped names when nothing matches.
    """
    text = str(name_or_path)
    p = Path(text).expanduser()
    shipped = names(folder)
    if p.suffix not in SUFFIXES and len(p.parts) == 1 and not p.is_absolute():
        if text in shipped:
            return folder / f"{text}.yaml"
        raise ConfigError(f"{what} {text!r} is not a shipped name; shipped: {', '.join(shipped)} "
                          f"(or give the path of a YAML file)")
    candidates = [p] if p.is_absolute() else [Path(b) / p for b in (*bases, Path.cwd())]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    if p.stem in shipped and p.suffix in SUFFIXES and (len(p.parts) == 1 or p.parent.name == folder.name):
        return folder / f"{p.stem}.yaml"
    looked = ", ".join(dict.fromkeys(str(c) for c in candidates))
    raise ConfigError(f"{what} {text} does not exist (looked at {looked}); give an existing YAML file or a "
                      f"shipped name: {', '.join(shipped)}")


def find(name_or_path: str | Path, bases: Iterable[Path] = ()) -> Path:
    """The recipe file for a shipped name (``ddpm-cpu``) or a path; see :func:`lookup`."""
    return lookup(FOLDER, "recipe", name_or_path, bases)
