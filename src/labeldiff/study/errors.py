"""A study file's error type, and the check of a setting's name that :mod:`labeldiff.study.spec` and
:mod:`labeldiff.study.tuning` share (here, below both, so neither imports the other's parser)."""
from __future__ import annotations

import difflib
from dataclasses import fields
from pathlib import Path
from typing import Any

from labeldiff.config import SECTIONS
from labeldiff.errors import LabeldiffError


class StudyError(LabeldiffError, ValueError):
    """A study file that cannot run; the message names the key and how to fix it."""


def check_setting_name(key: Any, file: Path, where: str) -> None:
    """Refuse a ``section.field`` name that is no setting, with the closest one."""
    section, _, name = str(key).partition(".")
    if section not in SECTIONS or not name:
        raise StudyError(f"{file}: {where}: {key!r} is not 'section.field' with section one of "
                         f"{', '.join(SECTIONS)} (e.g. train.steps)")
    known = [f.name for f in fields(SECTIONS[section])]
    if name not in known:
        hint = difflib.get_close_matches(name, known, n=1)
        raise StudyError(f"{file}: {where}: {key!r}: {section} has no field {name!r}"
                         + (f" (did you mean {section}.{hint[0]}?)" if hint else f"; known: {', '.join(known)}"))
