"""The errors labeldiff raises for things a user can fix: bad input, a setting out of range, a run folder
that is damaged, busy or not a run. ``labeldiff`` prints each as one ``error:`` line; any other exception
is a bug in labeldiff and keeps its traceback.

This module imports nothing, so every floor of the package may raise these.
"""
from __future__ import annotations


class LabeldiffError(Exception):
    """A problem the user can fix. The message is one line: what, where (the file or flag), and how."""

    exit_code = 2


class DataError(LabeldiffError, ValueError):
    """Bad input data: an image, a mask, a volume, a split or a dataset description."""


class ConfigError(LabeldiffError, ValueError):
    """A setting that cannot work: out of range, not finite, unknown, or not applicable here."""


class RunFolderError(LabeldiffError, ValueError):
    """A run folder that cannot be used as asked: damaged weights, a torn config, another process
    writing it, a resume that would change the run, or a folder that is not a labeldiff run."""


class NonFiniteError(LabeldiffError, RuntimeError):
    """Training produced a non-finite loss or non-finite weights; nothing non-finite is saved as a result."""

    exit_code = 3


class SetupError(LabeldiffError):
    """Something labeldiff needs is not installed where it looks (a network file shipped in a wheel, a
    template of nilearn): the message says what to install."""
