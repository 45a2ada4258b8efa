"""A study folder's results as one Markdown page, built only from the files the study runner wrote.

    python -m labeldiff.study.pages OUT                      # writes OUT/README.md
    python -m labeldiff.study.pages OUT --study STUDY.yaml --title "My study" --check

The page puts together, in this order: the question (the study file's first comment lines), a link to
``report.html`` when the folder has one (the same reports and an overlay viewer in one page,
:mod:`labeldiff.study.html_report`), the commands that run it, ``verdict.md``, ``results.md`` with
``dice_vs_labels.png``, ``paired.md`` with ``paired.png``, ``tuning.md`` (a study with ``tune:``),
``per_class.md``, ``overlays.png``, the other files of the folder, where it ran (``environment.json``) and
the study file itself. Nothing in it is typed by hand, so it cannot
disagree with the reports: after ``labeldiff study … --report-only`` rewrites them, build the page
again. A folder that lacks some of the files gets a page without those sections.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from labeldiff.study.html_report import PAGE as HTML

PAGE = "README.md"
REPORTS = (("verdict.md", "Verdict", None), ("results.md", "Results", "dice_vs_labels"),
           ("paired.md", "Paired differences", "paired"), ("tuning.md", "Tuning", None),
           ("per_class.md", "Per class", None))
FIGURES = {"dice_vs_labels": "Dice against the number of labeled images", "paired": "paired differences to scratch",
           "overlays": "test images, truth and prediction"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
COMMAND_WORDS = ("labeldiff ", "mkdir ", "cp ", "bash ", "cd ")


def _body(text: str) -> tuple[str, str]:
    """(first-level heading, the rest with every heading one level lower) of a report's Markdown."""
    lines = text.strip("\n").splitlines()
    title = ""
    if lines and lines[0].startswith("# "):
        title, lines = lines[0][2:].strip(), lines[1:]
    return title, "\n".join(f"#{line}" if line.startswith("#") else line for line in lines).strip("\n")


def _figure(folder: Path, stem: str) -> str | None:
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return f"![{FIGURES.get(stem, stem)}]({stem}{suffix})"
    return None


def study_header(text: str) -> tuple[list[str], list[str]]:
    """(question, commands) from a study file's leading comment block: the comment lines up to the first
    indented one, and the indented lines that are shell commands (``#   labeldiff study …``)."""
    question, commands, indented = [], [], False
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:]
        if body.startswith("  ") and body.strip():
            indented = True
            if body.strip().startswith(COMMAND_WORDS):
                commands.append(body.strip())
        elif not indented and body.strip():
            question.append(body.strip())
    return question, commands


def environment(env: dict) -> list[str]:
    """Lines saying where a study ran and how long it took, from its ``environment.json``."""
    out = []
    cpu = env.get("cpu") or {}
    if cpu:
        where = f"{cpu.get('model', 'unknown CPU')}, {cpu.get('count', '?')} cores"
        if cpu.get("precision_auto"):
            where += f", training in {cpu['precision_auto']} (precision auto)"
        out.append(f"- CPU: {where}")
    if env.get("gpus"):
        out.append(f"- GPUs: {', '.join(str(g) for g in env['gpus'])}")
    packages = env.get("packages") or {}
    versions = [f"{name} {version}" for name, version in packages.items()]
    if env.get("python"):
        versions.append(f"Python {env['python']}")
    if versions:
        out.append(f"- Software: {', '.join(versions)}")
    pre = env.get("seconds_per_pretraining") or {}
    if pre:
        out.append("- Pretraining: " + ", ".join(f"{name} {seconds / 60:.0f} min" for name, seconds in pre.items()))
    cells = [s for s in (env.get("seconds_per_cell") or {}).values() if isinstance(s, (int, float))]
    if cells:
        out.append(f"- Cells: {len(cells)} timed, median {statistics.median(cells):.0f} s each")
    return out


def render(folder: str | Path, study: str | Path | None = None, title: str | None = None,
           commands: list[str] | None = None) -> str:
    """The Markdown page of the study folder ``folder``.

    ``study``: the study file (default ``folder/study.yaml``, which the runner writes); its first comment
    lines are the page's question, its shell-command comment lines the commands shown (or ``commands``),
    and it is shown whole at the end. ``title``: default the folder's name. Links are relative to
    ``folder``, so the page belongs in it (:func:`write`).
    """
    folder = Path(folder)
    study = Path(study) if study is not None else folder / "study.yaml"
    study_text = study.read_text() if study.is_file() else ""
    question, found = study_header(study_text)
    commands = commands if commands is not None else found
    parts = [f"# {title or folder.name}"]
    used = {PAGE}
    if (folder / "results.md").is_file():
        subtitle, _ = _body((folder / "results.md").read_text())
        if subtitle:
            parts.append(f"*{subtitle.split(': ', 1)[-1]}*")
    if question:
        parts.append(" ".join(question))
    if (folder / HTML).is_file():
        parts.append(f"All of it in one page, with a viewer of every cell's predictions on the first test images: "
                     f"[{HTML}]({HTML}) (it opens offline in a browser).")
        used.add(HTML)
    if commands:
        parts.append("## Run it\n\n```bash\n" + "\n".join(commands) + "\n```")
    for name, heading, figure in REPORTS:
        if not (folder / name).is_file():
            continue
        used.add(name)
        _, body = _body((folder / name).read_text())
        section = [f"## {heading}", body]
        image = _figure(folder, figure) if figure else None
        if image:
            section.append(image)
            used |= {f"{figure}{s}" for s in IMAGE_SUFFIXES}
        parts.append("\n\n".join(section))
    overlays = _figure(folder, "overlays")
    if overlays:
        parts.append(f"## Overlays\n\n{overlays}")
        used |= {f"overlays{s}" for s in IMAGE_SUFFIXES}
    others = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in used and not p.name.startswith("."))
    if others:
        lines = []
        for name in others:
            link = f"[{name}]({name})"
            lines.append(f"- {link}" if Path(name).suffix.lower() not in IMAGE_SUFFIXES else f"- {link}\n\n  ![{name}]({name})")
        parts.append("## Other files\n\n" + "\n".join(lines))
    if (folder / "environment.json").is_file():
        env = environment(json.loads((folder / "environment.json").read_text()))
        if env:
            parts.append("## Where it ran\n\n" + "\n".join(env))
    if study_text:
        parts.append(f"## The study file\n\n`{study.name}`:\n\n```yaml\n{study_text.rstrip()}\n```")
    return "\n\n".join(parts) + "\n"


def write(folder: str | Path, study: str | Path | None = None, title: str | None = None,
          commands: list[str] | None = None, check: bool = False) -> bool:
    """Write ``folder/README.md`` (with ``check``: only compare); True when it was already up to date."""
    page = Path(folder) / PAGE
    text = render(folder, study, title, commands)
    current = page.read_text() if page.is_file() else None
    if current == text:
        return True
    if not check:
        page.write_text(text)
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labeldiff.study.pages",
                                description="Write a study folder's results as one Markdown page, OUT/README.md.")
    p.add_argument("folder", type=Path, help="the study's --out folder (or a copy of its reports)")
    p.add_argument("--study", type=Path, help="the study file [OUT/study.yaml]")
    p.add_argument("--title", help="the page's title [the folder's name]")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the page is not up to date")
    args = p.parse_args(argv)
    if not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder; give a study's --out folder", file=sys.stderr)
        return 2
    fresh = write(args.folder, args.study, args.title, check=args.check)
    if args.check and not fresh:
        print(f"{args.folder / PAGE} is not up to date; run without --check to rewrite it", file=sys.stderr)
        return 1
    print(f"{args.folder / PAGE} {'is up to date' if fresh else 'written'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
