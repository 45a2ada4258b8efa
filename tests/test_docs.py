"""The user-facing text (README.md and docs/): every command it shows exists with the options it uses, and it
speaks to users: no issue numbers, dates or commit hashes (those belong to the research notebook)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from labeldiff.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
COMMAND = re.compile(r"(?:^|[\s/])(?:labeldiff|\$L)\s+([a-z][a-z-]*)(?:\s+([a-z][a-z-]*))?(.*)")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def shell_lines(text: str):
    """(line number, command line) of every line in a fenced bash block, continuation lines joined."""
    fenced, joined, start = False, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fenced = line.strip() in ("```bash", "```sh", "```console")
            continue
        if not fenced:
            continue
        if not joined:
            start = n
        joined += line.rstrip("\\").rstrip() + " "
        if not line.rstrip().endswith("\\"):
            yield start, joined.split(" #")[0]
            joined = ""


def test_every_documented_command_and_option_exists():
    commands = subcommands(build_parser())
    bad = []
    for page in PAGES:
        for n, line in shell_lines(page.read_text()):
            for part in re.split(r"&&|\|", line):
                m = COMMAND.search(part)
                if not m:
                    continue
                where = f"{page.relative_to(REPO)}:{n}"
                name, sub, rest = m.groups()
                if name not in commands:
                    bad.append(f"{where}: no command `labeldiff {name}`")
                    continue
                parser = commands[name]
                nested = subcommands(parser)
                if nested:
                    if sub not in nested:
                        bad.append(f"{where}: no command `labeldiff {name} {sub}`")
                        continue
                    parser = nested[sub]
                else:
                    rest = f"{sub or ''} {rest}"
                known = {o for a in parser._actions for o in a.option_strings}
                bad += [f"{where}: `labeldiff {name}` has no option {flag}"
                        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest) if flag not in known]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_user_facing_text_has_no_issue_numbers_dates_or_commit_hashes(page):
    text = page.read_text()
    found = (re.findall(r"\b[Ii]ssues? #?\d+", text) + re.findall(r"\b20\d\d-\d\d-\d\d\b", text)
             + [h for h in re.findall(r"(?<![\w/.-])[0-9a-f]{7,40}(?![\w/.-])", text) if re.search(r"[a-f]", h)
                and re.search(r"\d", h)])
    assert not found, found
