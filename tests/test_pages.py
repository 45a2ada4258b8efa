"""Pages generated from result folders and docstrings: a study folder's page (labeldiff.study.pages), and
the committed pages of the repository, which must be exactly what ``python tools/pages.py`` generates."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from labeldiff.study.pages import environment, main, render, study_header, write

REPO = Path(__file__).resolve().parents[1]


def tools_pages():
    spec = importlib.util.spec_from_file_location("tools_pages", REPO / "tools" / "pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_pages_are_what_the_command_generates():
    stale = [str(path.relative_to(REPO)) for path, text in tools_pages().all_pages().items()
             if not path.is_file() or path.read_text() != text]
    assert not stale, f"run `python tools/pages.py` and commit: {stale}"


STUDY = """# Does X pay on Y? The question, on two lines
# of comment.
# Fixed in advance:
#   - primary: X − scratch
#   mkdir -p studies/runs/x && cp -r studies/runs/w/cells studies/runs/x/
#   labeldiff study studies/x.yaml --out studies/runs/x
data: {path: data}
"""


def study_folder(root: Path) -> Path:
    folder = root / "x"
    folder.mkdir()
    (folder / "results.md").write_text("# x: data, test split 4 images\n\n## Dice\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    (folder / "verdict.md").write_text("# Verdict: x\n\n| k | Δ |\n|---|---|\n| 1 | +0.1 |\n")
    (folder / "paired.md").write_text("# Paired\n\n## diverse − random\n\ntable\n")
    for name in ("dice_vs_labels.png", "overlays.jpg", "extra.png"):
        (folder / name).write_bytes(b"\x89PNG")
    (folder / "summary.tsv").write_text("a\tb\n")
    (folder / "environment.json").write_text(json.dumps({
        "cpu": {"model": "AMD EPYC", "count": 2, "precision_auto": "bf16 autocast"}, "packages": {"torch": "2.13"},
        "python": "3.11", "seconds_per_pretraining": {"ddpm": 600.0}, "seconds_per_cell": {"a": 10, "b": 30, "c": 20}}))
    (folder / "study.yaml").write_text(STUDY)
    return folder


def test_a_study_page_is_built_from_the_folder_alone(tmp_path):
    page = render(study_folder(tmp_path))
    order = ["# x\n", "*data, test split 4 images*", "Does X pay on Y? The question, on two lines of comment. Fixed in advance:",
             "## Run it", "labeldiff study studies/x.yaml", "## Verdict", "| 1 | +0.1 |", "## Results", "### Dice",
             "![Dice against the number of labeled images](dice_vs_labels.png)", "## Paired differences",
             "### diverse − random", "## Overlays", "(overlays.jpg)", "## Other files", "- [extra.png](extra.png)",
             "- [summary.tsv](summary.tsv)", "## Where it ran", "AMD EPYC, 2 cores, training in bf16 autocast",
             "ddpm 10 min", "3 timed, median 20 s", "## The study file", "data: {path: data}"]
    at = [page.find(part) for part in order]
    assert -1 not in at, [p for p, i in zip(order, at) if i < 0]
    assert at == sorted(at)
    assert "primary: X − scratch" not in page.split("## Run it")[0]  # indented comment lines are not the question
    assert "## Per class" not in page  # no per_class.md: no section


def test_a_study_page_links_the_folders_report_html(tmp_path):
    folder = study_folder(tmp_path)
    assert "report.html" not in render(folder)
    (folder / "report.html").write_text("<!DOCTYPE html>\n")
    page = render(folder)
    link = "[report.html](report.html) (it opens offline in a browser)"
    assert link in page and page.find(link) < page.find("## Run it")  # said before the sections, once
    assert page.count("report.html") == 2


def test_study_header_and_environment():
    question, commands = study_header(STUDY)
    assert question == ["Does X pay on Y? The question, on two lines", "of comment.", "Fixed in advance:"]
    assert commands == ["mkdir -p studies/runs/x && cp -r studies/runs/w/cells studies/runs/x/",
                        "labeldiff study studies/x.yaml --out studies/runs/x"]
    assert environment({}) == []


def test_write_and_check(tmp_path, capsys):
    folder = study_folder(tmp_path)
    assert main([str(folder), "--check"]) == 1 and not (folder / "README.md").exists()
    assert main([str(folder)]) == 0 and (folder / "README.md").read_text() == render(folder)
    assert write(folder, check=True)
    (folder / "README.md").write_text("edited by hand\n")
    assert main([str(folder), "--check"]) == 1
    assert main([str(tmp_path / "nothere")]) == 2
    assert "not a folder" in capsys.readouterr().err
