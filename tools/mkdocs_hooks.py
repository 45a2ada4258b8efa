"""MkDocs hooks (``hooks:`` in mkdocs.yml).

1. The research notebook lives in ``research/`` at the checkout's root, not under ``docs/``: its result
   folders are where the study commands write them and where a reader browsing the repository finds
   them. :func:`on_files` adds every file of ``research/`` to the site under ``research/`` (pages,
   figures, CSV, the study YAMLs), so nothing is copied into ``docs/`` twice.
2. Links are written for the repository, relative to the file they are in, so they work when browsing
   the checkout: ``docs/index.md`` links ``../research/README.md``. :func:`on_page_markdown` rewrites
   each relative link that reaches into ``docs/`` or ``research/`` to the same file's place on the site.
   A link to anything else is left alone, and ``mkdocs build --strict`` fails on it.
"""
from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
MOUNTS = {"research": ROOT / "research"}  # site folder → checkout folder
SKIP = {"runs", "out", "logs", "__pycache__"}  # run folders the study commands write there (not in git)
LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def _site_files(folder: Path):
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part in SKIP or part.startswith(".") for part in rel.parts):
            yield rel


def on_files(files, config):
    for name, folder in MOUNTS.items():
        for rel in _site_files(folder):
            files.append(File.generated(config, f"{name}/{rel.as_posix()}", abs_src_path=str(folder / rel)))
    return files


def _site_uri(path: str, docs_dir: str) -> str | None:
    """The site's src_uri of the checkout file ``path``, or None when the site does not hold it."""
    for name, folder in (("", Path(docs_dir)), *MOUNTS.items()):
        try:
            rel = Path(path).relative_to(folder.resolve())
        except ValueError:
            continue
        return posixpath.join(name, rel.as_posix()) if name else rel.as_posix()
    return None


def on_page_markdown(markdown, page, config, files):
    here = os.path.dirname(page.file.abs_src_path)
    page_dir = posixpath.dirname(page.file.src_uri)

    def rewrite(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
            return m.group(0)
        path, hash_, fragment = target.partition("#")
        uri = _site_uri(os.path.normpath(os.path.join(here, path)), config["docs_dir"]) if path else None
        if uri is None:
            return m.group(0)
        link = posixpath.relpath(uri, page_dir or ".")
        return f"{m.group(1)}{link}{hash_}{fragment}{m.group(3)}"

    return LINK.sub(rewrite, markdown)
