"""``report.html``: a study's results, or a comparison, as one page that opens in any browser, offline.

A study's page (:func:`study_page`, written by ``labeldiff study`` into its folder) holds, in this order: the
verdict (with the family-wise correction line when the study has ``family:``); the results tables with
``dice_vs_labels.png``; the paired differences to scratch with their 95 % intervals and ``paired.png``; the
tuning tables (a study with ``tune:``); the per-class Dice; every cell's row of ``results.csv``; the overlay
grid ``overlays.png``; and an overlay viewer. The viewer shows, for one cell and one test image at a time, the
image, the ground truth, the prediction, the outcome of each pixel (true positive, false positive, false
negative, wrong class) and the uncertainty (the entropy of the class probabilities, dark = certain). Buttons
and a list step through the test images each cell kept (the first
:data:`~labeldiff.study.execute.VIEWER_IMAGES`, the same for every cell, ``eval/predictions/``); a list picks
the cell and a switch shows its scratch pair (the same network, protocol, k, seed and selection) on the same
image.

``labeldiff compare A B --out FILE.md`` writes ``FILE.html`` beside it (:func:`runs_page`,
:func:`studies_page`): two runs — the paired table with its interval, the plot of the per-image differences
and the test images where A is most behind and most ahead (image | truth | A | B); two studies — the table
of their cell-by-cell differences.

The page needs no network: its style and script are inline and every picture is a base64 ``data:`` URI, so
it can be opened from the file (``file://``), mailed or archived and shows the same everywhere. The tables
are the Markdown reports' own text (the functions of :mod:`labeldiff.study.report`,
:mod:`labeldiff.study.verdict` and :mod:`labeldiff.study.paired_runs` that write ``results.md``,
``paired.md``, ...), turned into HTML by :func:`markdown_html`, which reads the subset those functions write;
the table of every cell is ``results.csv`` read back. Viewer panels are drawn at most :data:`PANEL_SIDE`
pixels a side (each as the smaller of PNG and JPEG; uncertainty maps :data:`UNCERTAINTY_SIDE`), figures at
most :data:`FIGURE_WIDTH` pixels wide. A cell adds only its predicted mask (a small lossless PNG) and its
uncertainty map per test image: the page paints the truth, prediction and outcome overlays itself, in the
browser, from the test image (stored once for all cells) and the masks, with the colours and weights of the
Python that draws them (:func:`paint_settings`).
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import re
from pathlib import Path

import numpy as np

PAGE = "report.html"
PANEL_SIDE = 256  # pixels: the longest side of a viewer panel
UNCERTAINTY_SIDE = 128  # pixels: an uncertainty map is smooth, and this is a quarter of the bytes (shown at PANEL_SIDE)
FIGURE_WIDTH = 1600  # pixels: wider figures are scaled down
JPEG_QUALITY = 85

# ------------------------------------------------------------------------------------ Markdown subset → HTML

_TABLE_RULE = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def inline_html(text: str) -> str:
    """One line of Markdown as HTML, escaped: ``**bold**``, ``*italic*``, ```code```, and ``[text](link)``: a
    link to a file beside the page stays a link; one to the web becomes its text, the address in brackets
    (the page loads nothing from the network, and links to nowhere else)."""
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:  # a code span: verbatim
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        links: list[str] = []

        def keep(m: re.Match) -> str:
            label, target = m.group(1), m.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
                links.append(f"{html.escape(label)} ({html.escape(target)})")
            else:
                links.append(f'<a href="{html.escape(target)}">{html.escape(label)}</a>')
            return f"\x00{len(links) - 1}\x00"

        s = html.escape(_LINK.sub(keep, part), quote=False)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        s = re.sub(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])", r"<em>\1</em>", s)
        out.append(re.sub("\x00(\\d+)\x00", lambda m: links[int(m.group(1))], s))
    return "".join(out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_html(text: str, shift: int = 0) -> str:
    """The Markdown the study's reports write, as HTML: headings (``shift`` levels lower), paragraphs,
    pipe tables (a header row, a ``|---|`` rule, body rows), ``- `` lists and fenced code blocks. Text is
    escaped (:func:`inline_html`); anything else is kept as a paragraph of text."""
    lines = text.splitlines()
    out: list[str] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            out.append(f"<p>{inline_html(' '.join(para))}</p>")
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        heading = _HEADING.match(line)
        if not line.strip():
            flush()
        elif line.startswith("```"):
            flush()
            body = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            out.append(f"<pre><code>{html.escape(chr(10).join(body))}</code></pre>")
        elif heading:
            flush()
            level = min(6, len(heading.group(1)) + shift)
            out.append(f"<h{level}>{inline_html(heading.group(2).strip())}</h{level}>")
        elif line.startswith("|") and i + 1 < len(lines) and _TABLE_RULE.match(lines[i + 1]):
            flush()
            head = _cells(line)
            body = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                body.append(_cells(lines[i]))
                i += 1
            out.append(table_html(head, body, markdown=True))
            continue
        elif line.startswith("- "):
            flush()
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{inline_html(lines[i][2:].strip())}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        else:
            para.append(line.strip())
        i += 1
    flush()
    return "\n".join(out)


# a table cell that reads as a number: 0.812, -1e-05, **0.812 ± 0.020 (3)**
_NUMBER = re.compile(r"\**[-+−]?[\d.]+(e[-+]?\d+)?( ± [\d.]+)?( \(\d+\))?\**")


def table_html(head: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """A ``<table>``: ``head`` the column names, ``rows`` the cells (Markdown inline text with ``markdown``,
    else plain text, escaped either way). Cells that read as numbers are right-aligned."""
    def cell(tag: str, text: str) -> str:
        body = inline_html(text) if markdown else html.escape(text)
        num = ' class="num"' if tag == "td" and _NUMBER.fullmatch(text.strip()) else ""
        return f"<{tag}{num}>{body}</{tag}>"

    lines = ['<div class="scroll"><table>', "<thead><tr>" + "".join(cell("th", h) for h in head) + "</tr></thead>",
             "<tbody>"]
    lines += ["<tr>" + "".join(cell("td", c) for c in r) + "</tr>" for r in rows]
    return "\n".join(lines + ["</tbody></table></div>"])


# ------------------------------------------------------------------------------------------------ pictures


def panel_size(height: int, width: int, side: int = PANEL_SIDE) -> tuple[int, int]:
    """``(width, height)`` of a picture scaled down to at most ``side`` pixels a side (as it is if smaller)."""
    scale = min(1.0, side / max(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _uri(img, kind: str = "smaller") -> str:
    """A PIL image as a ``data:`` URI: PNG, or (``kind="smaller"``) the smaller of PNG and JPEG."""
    png = io.BytesIO()
    img.save(png, "PNG", optimize=True)
    data, fmt = png.getvalue(), "png"
    if kind == "smaller":
        jpeg = io.BytesIO()
        img.convert("RGB").save(jpeg, "JPEG", quality=JPEG_QUALITY)
        if len(jpeg.getvalue()) < len(data):
            data, fmt = jpeg.getvalue(), "jpeg"
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode('ascii')}"


def picture_uri(rgb: np.ndarray, side: int = PANEL_SIDE) -> str:
    """``rgb [H, W, 3]`` (or ``[H, W]`` grey) uint8 as a ``data:`` URI, scaled down to at most ``side`` pixels
    a side (:func:`panel_size`): a PNG or a JPEG, whichever is smaller."""
    from PIL import Image

    rgb = np.ascontiguousarray(rgb)
    img = Image.fromarray(rgb)
    size = panel_size(*rgb.shape[:2], side)
    return _uri(img if size == img.size else img.resize(size, Image.LANCZOS))


def mask_uri(mask: np.ndarray, side: int = PANEL_SIDE) -> str:
    """Class ids ``[H, W]`` as a lossless PNG ``data:`` URI that the page reads back as ids (red = id mod 256,
    green = id // 256), scaled down like :func:`picture_uri` with the nearest pixel, so that it lies exactly
    on the picture of its image."""
    from PIL import Image

    mask = np.asarray(mask).astype(np.int64)
    ids = np.stack([mask % 256, mask // 256, np.zeros_like(mask)], axis=-1).astype(np.uint8)
    img = Image.fromarray(ids, "RGB")
    size = panel_size(*mask.shape, side)
    return _uri(img if size == img.size else img.resize(size, Image.NEAREST), kind="png")


def figure_uri(path: Path, width: int = FIGURE_WIDTH) -> str:
    """The figure file ``path`` (PNG or JPEG) as a ``data:`` URI, as it is unless wider than ``width``."""
    from PIL import Image

    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        kind = (img.format or "PNG").lower()
        if img.width > width:
            small = img.convert("RGB").resize((width, round(img.height * width / img.width)), Image.LANCZOS)
            buf = io.BytesIO()
            small.save(buf, "PNG", optimize=True)
            data, kind = buf.getvalue(), "png"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


class Pictures:
    """The viewer's pictures by id, each stored once: a picture equal to one already added (the same test
    image, or the same predicted mask of two cells) gets that one's id."""

    def __init__(self) -> None:
        self.uris: dict[str, str] = {}

    def add(self, uri: str) -> str:
        key = hashlib.sha1(uri.encode("ascii")).hexdigest()[:12]
        self.uris.setdefault(key, uri)
        return key


def uncertainty_rgb(entropy: np.ndarray) -> np.ndarray:
    """``[H, W]`` uint8 entropy (255 = log K) in the magma colour map: dark = certain, bright = unsure."""
    from matplotlib import colormaps

    return (colormaps["magma"](np.asarray(entropy))[..., :3] * 255).round().astype(np.uint8)


def panel_pictures(image: np.ndarray, target: np.ndarray, pred: np.ndarray | None, num_classes: int,
                   ignore_index: int | None = None) -> dict[str, np.ndarray]:
    """The panels of one test image: ``image``, ``truth`` (class colours), and with ``pred`` ``prediction``
    (class colours) and ``outcome`` (:func:`~labeldiff.evaluate.overlays.outcome_overlay`), each ``[H, W, 3]``
    uint8: what the overlay viewer paints in the page, and what ``compare``'s page shows."""
    from labeldiff.evaluate.overlays import outcome_overlay
    from labeldiff.evaluate.report import overlay, to_rgb

    truth = np.where(target == ignore_index, 0, target) if ignore_index is not None else target
    out = {"image": to_rgb(image), "truth": overlay(image, truth)}
    if pred is not None:
        out["prediction"] = overlay(image, pred)
        out["outcome"] = outcome_overlay(image, pred, target, ignore_index)
    return out


def outcome_legend(num_classes: int, uncertainty: bool = True) -> str:
    """The outcome colours, named (wrong class only with more than one foreground class), and with
    ``uncertainty`` how to read the uncertainty panel."""
    from labeldiff.evaluate.overlays import OUTCOMES, WRONG

    items = [f'<span class="swatch" style="background:rgb{colour}"></span>{html.escape(name)}'
             for i, (name, colour) in OUTCOMES.items() if i != WRONG or num_classes > 2]
    unsure = (" · uncertainty: dark = certain, bright = unsure (entropy of the class probabilities)"
              if uncertainty else "")
    return '<p class="legend">Outcome: ' + " ".join(f"<span>{x}</span>" for x in items) + unsure + "</p>"


# ------------------------------------------------------------------------------------------------ the page

STYLE = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #d8dce4; --bg: #ffffff; --alt: #f4f6f9; --accent: #2b5fb4; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); background: var(--bg); margin: 0; }
main { max-width: 1280px; margin: 0 auto; padding: 1rem 1.5rem 4rem; }
h1 { font-size: 1.6rem; margin: 0.5rem 0; } h2 { font-size: 1.3rem; margin-top: 2.2rem;
     border-bottom: 2px solid var(--line); padding-bottom: 0.2rem; } h3 { font-size: 1.1rem; } h4 { font-size: 1rem; }
p.sub, .muted { color: var(--muted); }
nav { display: flex; flex-wrap: wrap; gap: 0.4rem 1rem; margin: 0.6rem 0 1rem; font-size: 0.95rem; }
a { color: var(--accent); }
.scroll { overflow-x: auto; margin: 0.6rem 0; }
table { border-collapse: collapse; font-size: 0.88rem; }
th, td { border: 1px solid var(--line); padding: 0.25rem 0.55rem; text-align: left; vertical-align: top; }
th { background: var(--alt); position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.9em;
       background: var(--alt); padding: 0 0.2em; border-radius: 3px; }
pre { background: var(--alt); padding: 0.6rem; overflow-x: auto; }
figure { margin: 1rem 0; } figure img.plot { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 0.85rem; }
.controls { display: flex; flex-wrap: wrap; align-items: center; gap: 0.5rem 0.8rem; margin: 0.6rem 0;
            padding: 0.6rem; background: var(--alt); border: 1px solid var(--line); border-radius: 6px; }
.controls select, .controls button { font: inherit; padding: 0.2rem 0.5rem; }
.switch button[aria-pressed="true"] { background: var(--accent); color: #fff; border-color: var(--accent); }
.panels { display: flex; flex-wrap: wrap; gap: 0.8rem; }
.panels figure { margin: 0; flex: 1 1 0; min-width: 150px; max-width: 256px; }
.panels img { width: 100%; height: auto; image-rendering: pixelated; border: 1px solid var(--line);
              background: var(--alt); display: block; }
.panels img[hidden], .panels .missing[hidden] { display: none; }
.panels img#panel-uncertainty { image-rendering: auto; }
.panels .missing { width: 100%; height: 120px; display: flex; align-items: center; justify-content: center;
                   border: 1px dashed var(--line); color: var(--muted); font-size: 0.85rem; text-align: center; }
.legend span { margin-right: 0.8rem; white-space: nowrap; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.3em; vertical-align: -0.1em;
          border: 1px solid #0005; }
#viewer-caption { font-weight: 600; margin: 0.4rem 0; }
"""


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]], script: str = "") -> str:
    """A whole HTML document: ``title``, a ``subtitle`` line, a table of contents, then each section
    ``(anchor, heading, body HTML)``; ``script``: inline JavaScript run at the end."""
    nav = " ".join(f'<a href="#{a}">{html.escape(h)}</a>' for a, h, _ in sections)
    body = "\n".join(f'<section id="{a}">\n<h2>{html.escape(h)}</h2>\n{b}\n</section>' for a, h, b in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n"
            f"<style>{STYLE}</style>\n</head>\n<body>\n<main>\n<h1>{html.escape(title)}</h1>\n"
            f'<p class="sub">{inline_html(subtitle)}</p>\n<nav>{nav}</nav>\n{body}\n</main>\n'
            + (f"<script>\n{script}\n</script>\n" if script else "") + "</body>\n</html>\n")


def figure_html(path: Path, caption: str) -> str:
    """A figure file of the folder, embedded, with its file name and ``caption`` under it."""
    return (f'<figure><img class="plot" src="{figure_uri(path)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(path.name)}: {html.escape(caption)}</figcaption></figure>")


def json_script(element_id: str, data) -> str:
    """``data`` as JSON in a ``<script type="application/json">`` (``</`` escaped so it cannot end the tag)."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def write_page(path: Path, text: str) -> Path:
    """Write the page ``text`` to ``path`` whole (a temporary file renamed), readable as a file the process
    writes plainly would be (the temporary file is created private)."""
    import os

    from labeldiff.fs import atomic_write_text

    atomic_write_text(Path(path), text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return Path(path)


def size_words(path: Path) -> str:
    """``"1.2 MB"`` / ``"340 kB"``: the size of the file ``path``."""
    n = Path(path).stat().st_size
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{max(1, round(n / 1e3))} kB"


# -------------------------------------------------------------------------------------------- a study's page

REPORTS = (("verdict", "Verdict", "verdict.md", None), ("results", "Results", "results.md", "dice_vs_labels"),
           ("paired", "Paired differences", "paired.md", "paired"), ("tuning", "Tuning", "tuning.md", None),
           ("per-class", "Per class", "per_class.md", None))
FIGURES = {"dice_vs_labels": "Dice against the number of labeled images, mean ± std over seeds",
           "paired": "each seed's paired difference to scratch, the mean with its 95 % interval",
           "overlays": "the first test images predicted by each setting at the largest k"}
HIDDEN_COLUMNS = ("stems",)  # results.csv columns the page leaves out of its table (the cell's tooltip shows them)


def report_body(text: str) -> str:
    """A report's Markdown without its first-level title (the section's heading says it), as HTML."""
    if text.startswith("# "):
        text = text.split("\n", 1)[1] if "\n" in text else ""
    return markdown_html(text, shift=1)


def cells_table(rows: list[dict[str, str]]) -> str:
    """Every row of ``results.csv`` as it is written (the page's numbers are the file's), columns that are
    empty in every row left out; a cell's labeled images show on its id."""
    if not rows:
        return "<p>No finished cells yet.</p>"
    cols = [c for c in rows[0] if c not in HIDDEN_COLUMNS and any(r.get(c) not in (None, "") for r in rows)]
    head = "<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr></thead>"
    body = []
    for r in rows:
        tds = []
        for c in cols:
            v = r.get(c) or ""
            num = ' class="num"' if _NUMBER.fullmatch(v) else ""
            title = f' title="labeled: {html.escape(r["stems"])}"' if c == "cell" and r.get("stems") else ""
            tds.append(f"<td{num}{title}>{html.escape(v)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return ('<div class="scroll"><table id="cells-table">' + head + "<tbody>" + "\n".join(body) +
            "</tbody></table></div>")


def _number(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def cell_label(row: dict, extras: tuple[str, ...]) -> str:
    """``"ddpm / full · k = 2 · seed 0"`` (with the protocol and selection when the study varies them)."""
    from labeldiff.study.stats import axis

    more = "".join(f" · {axis(row, a)}" for a in extras)
    return f"{row['method']} / {row['strategy']}{more} · k = {row['k']} · seed {row['seed']}"


def paint_settings(num_classes: int, ignore_index: int | None) -> dict:
    """The colours and weights the page paints overlays with, from the Python that draws them
    (:func:`labeldiff.evaluate.report.overlay`, :func:`labeldiff.evaluate.overlays.paint`): class colours
    blended at 0.45; outcomes filled at 0.4 with a solid 1-pixel edge and a rim darkened to 0.25."""
    from labeldiff.data.io import class_colours
    from labeldiff.evaluate.overlays import OUTCOMES

    return {"classes": class_colours(num_classes).tolist(), "class_alpha": 0.45,
            "outcomes": {str(i): list(c) for i, (_, c) in OUTCOMES.items()}, "outcome_alpha": 0.4, "rim": 0.25,
            "ignore": ignore_index}


def viewer_data(rows: list[dict], cell_dirs: dict[str, Path], samples: list, channels: int, num_classes: int,
                ignore_index: int | None = None) -> dict:
    """What the overlay viewer shows: the test images ``samples`` (each image and its truth), and for every
    cell of ``rows`` whose folder (``cell_dirs[id]``) kept predictions in ``eval/predictions/``, its predicted
    mask and uncertainty on each, and its Dice there; ``entries``: each pretrained cell with its scratch pair
    (:func:`labeldiff.study.stats.scratch_pairs`), and each scratch cell that pairs with none.

    The page paints the truth, prediction and outcome overlays itself from the image and the masks
    (:func:`paint_settings`), so a cell adds only a small lossless mask and its uncertainty picture per image,
    not three pictures of the image. Returns ``{"images": {id: data URI}, "stems": [...], "base": {stem:
    {"image", "truth"}}, "cells": {cell: {"label", "dice", "panels": {stem: {"prediction", "uncertainty",
    "dice"}}}}, "entries": [{"label", "pretrained", "scratch"}], "paint": ...}`` (picture ids into
    ``images``; ``pretrained`` or ``scratch`` None where there is none)."""
    from labeldiff.data.io import read_mask
    from labeldiff.evaluate.report import to_rgb
    from labeldiff.study.paired_runs import open_evaluation
    from labeldiff.study.stats import BASELINE, scratch_pairs, varying

    pictures = Pictures()
    kept = {r["cell"]: cell_dirs[r["cell"]] / "eval" for r in rows
            if r["cell"] in cell_dirs and (cell_dirs[r["cell"]] / "eval" / "predictions").is_dir()}
    samples = [s for s in samples if any((e / "predictions" / f"{s.stem}.png").is_file() for e in kept.values())]
    base = {s.stem: {"image": pictures.add(picture_uri(to_rgb(s.read_image(channels)))),
                     "truth": pictures.add(mask_uri(s.read_mask(num_classes)))} for s in samples}
    extras = varying(rows)
    cells = {}
    for r in rows:
        folder = kept.get(r["cell"])
        if folder is None:
            continue
        dice = open_evaluation(folder).values("dice")
        panels = {}
        for stem in base:
            file = folder / "predictions" / f"{stem}.png"
            if not file.is_file():
                continue
            unsure = folder / "predictions" / "uncertainty" / f"{stem}.png"
            panels[stem] = {"prediction": pictures.add(mask_uri(read_mask(file, num_classes))),
                            "uncertainty": pictures.add(picture_uri(uncertainty_rgb(_grey(unsure)), UNCERTAINTY_SIDE))
                            if unsure.is_file() else None,
                            "dice": _number(dice.get(stem))}
        cells[r["cell"]] = {"label": cell_label(r, extras), "dice": _number(r.get("dice")), "panels": panels}
    paired = {a["cell"]: b["cell"] for a, b in scratch_pairs(rows) if a["cell"] in cells and b["cell"] in cells}
    entries = [{"label": cells[r["cell"]]["label"], "pretrained": r["cell"], "scratch": paired.get(r["cell"])}
               for r in rows if r["cell"] in cells and r["strategy"] != BASELINE]
    entries += [{"label": cells[r["cell"]]["label"], "pretrained": None, "scratch": r["cell"]}
                for r in rows if r["cell"] in cells and r["strategy"] == BASELINE and r["cell"] not in paired.values()]
    return {"images": pictures.uris, "stems": list(base), "base": base, "cells": cells, "entries": entries,
            "paint": paint_settings(num_classes, ignore_index)}


def _grey(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


VIEWER_HTML = """
<p>One cell and one test image at a time. <em>Cell</em> picks a pretrained cell; <em>pretrained</em> /
<em>scratch</em> switch between it and its scratch pair (the same network, protocol, k, seed and selection)
on the same image. The arrow keys step through the images too.</p>
<div class="controls">
  <label>Cell <select id="viewer-cell"></select></label>
  <span class="switch" role="group" aria-label="pretrained or scratch">
    <button type="button" id="show-pretrained" aria-pressed="true">pretrained</button>
    <button type="button" id="show-scratch" aria-pressed="false">scratch</button>
  </span>
  <span>
    <button type="button" id="prev-image" aria-label="previous test image">&#9664; previous</button>
    <select id="viewer-image" aria-label="test image"></select>
    <button type="button" id="next-image" aria-label="next test image">next &#9654;</button>
  </span>
</div>
<p id="viewer-caption"></p>
<div class="panels" id="viewer-panels">
  <figure><img id="panel-image" alt="test image"><div class="missing" hidden></div>
    <figcaption>image</figcaption></figure>
  <figure><img id="panel-truth" alt="ground truth"><div class="missing" hidden></div>
    <figcaption>ground truth</figcaption></figure>
  <figure><img id="panel-prediction" alt="prediction"><div class="missing" hidden></div>
    <figcaption>prediction</figcaption></figure>
  <figure><img id="panel-outcome" alt="outcome of each pixel"><div class="missing" hidden></div>
    <figcaption>outcome</figcaption></figure>
  <figure><img id="panel-uncertainty" alt="uncertainty"><div class="missing" hidden></div>
    <figcaption>uncertainty</figcaption></figure>
</div>
"""

VIEWER_SCRIPT = r"""
(function () {
  "use strict";
  const source = document.getElementById("viewer-data");
  if (!source) { return; }
  const data = JSON.parse(source.textContent);
  const paint = data.paint;
  const $ = (id) => document.getElementById(id);
  const state = { entry: 0, side: "pretrained", stem: 0 };
  data.entries.forEach((e, i) => $("viewer-cell").add(new Option(e.label, String(i))));
  data.stems.forEach((s, i) => $("viewer-image").add(new Option(s, String(i))));

  // ---- pictures: decoded once, painted once per cell and image
  const decoded = new Map();
  function decode(key) {  // a picture of the page as {w, h, px: RGBA bytes}
    if (!decoded.has(key)) {
      decoded.set(key, new Promise((resolve, reject) => {
        const im = new Image();
        im.onload = () => {
          const c = document.createElement("canvas");
          c.width = im.naturalWidth;
          c.height = im.naturalHeight;
          const g = c.getContext("2d", { willReadFrequently: true });
          g.drawImage(im, 0, 0);
          resolve({ w: c.width, h: c.height, px: g.getImageData(0, 0, c.width, c.height).data });
        };
        im.onerror = () => reject(new Error("the page's picture " + key + " does not decode"));
        im.src = data.images[key];
      }));
    }
    return decoded.get(key);
  }
  function ids(mask) {  // class ids of a mask picture: red + 256 * green
    const out = new Int32Array(mask.w * mask.h);
    for (let i = 0; i < out.length; i++) { out[i] = mask.px[4 * i] + 256 * mask.px[4 * i + 1]; }
    return out;
  }
  function rgbOf(image) {
    const rgb = new Float32Array(3 * image.w * image.h);
    for (let i = 0; i < image.w * image.h; i++) {
      for (let k = 0; k < 3; k++) { rgb[3 * i + k] = image.px[4 * i + k]; }
    }
    return rgb;
  }
  function pictureUrl(w, h, rgb) {  // RGB floats -> PNG data URL (rounded as the Python that draws them)
    const c = document.createElement("canvas");
    c.width = w;
    c.height = h;
    const g = c.getContext("2d");
    const out = g.createImageData(w, h);
    for (let i = 0; i < w * h; i++) {
      for (let k = 0; k < 3; k++) { out.data[4 * i + k] = rgb[3 * i + k]; }
      out.data[4 * i + 3] = 255;
    }
    g.putImageData(out, 0, 0);
    return c.toDataURL("image/png");
  }
  function classes(image, labels) {  // evaluate.report.overlay: class colours blended over the foreground
    const rgb = rgbOf(image), a = paint.class_alpha;
    for (let i = 0; i < labels.length; i++) {
      const c = labels[i] > 0 ? paint.classes[labels[i]] : null;
      if (c) { for (let k = 0; k < 3; k++) { rgb[3 * i + k] = (1 - a) * rgb[3 * i + k] + a * c[k]; } }
    }
    return pictureUrl(image.w, image.h, rgb);
  }
  function outcome(image, pred, truth) {  // evaluate.overlays.outcome_overlay at the picture's size
    const w = image.w, h = image.h, n = w * h, label = new Uint8Array(n);
    for (let i = 0; i < n; i++) {
      const p = pred[i] > 0, t = truth[i] > 0;
      label[i] = truth[i] === paint.ignore ? 0 : p && t ? (pred[i] === truth[i] ? 1 : 4) : p ? 2 : t ? 3 : 0;
    }
    const rgb = rgbOf(image), out = Float32Array.from(rgb), a = paint.outcome_alpha;
    const at = (i, dx, dy) => {  // the label of a 4-neighbour, or -1 outside the picture
      const x = (i % w) + dx, y = Math.floor(i / w) + dy;
      return x < 0 || y < 0 || x >= w || y >= h ? -1 : label[y * w + x];
    };
    const steps = [[1, 0], [-1, 0], [0, 1], [0, -1]];
    for (const [id, c] of Object.entries(paint.outcomes)) {
      const o = Number(id);
      for (let i = 0; i < n; i++) {
        if (label[i] !== o) { continue; }
        const edge = steps.some(([dx, dy]) => { const v = at(i, dx, dy); return v !== -1 && v !== o; });
        for (let k = 0; k < 3; k++) { out[3 * i + k] = edge ? c[k] : (1 - a) * rgb[3 * i + k] + a * c[k]; }
      }
    }
    for (let i = 0; i < n; i++) {  // a dark rim just outside every coloured region
      if (label[i] === 0 && steps.some(([dx, dy]) => at(i, dx, dy) > 0)) {
        for (let k = 0; k < 3; k++) { out[3 * i + k] *= paint.rim; }
      }
    }
    return pictureUrl(w, h, out);
  }
  const painted = new Map();
  function once(key, draw) {
    if (!painted.has(key)) { painted.set(key, draw()); }
    return painted.get(key);
  }

  // ---- the controls
  function format(x) { return x === null || x === undefined ? "–" : x.toFixed(3); }
  function put(id, url, missing) {
    const img = $(id), note = img.nextElementSibling;
    img.hidden = !url;
    note.hidden = Boolean(url);
    note.textContent = missing;
    if (url) { img.src = url; } else { img.removeAttribute("src"); }
  }
  let request = 0;
  async function show() {
    const mine = ++request;
    const entry = data.entries[state.entry];
    if (!entry[state.side]) { state.side = entry.pretrained ? "pretrained" : "scratch"; }
    const id = entry[state.side], cell = data.cells[id], stem = data.stems[state.stem];
    const base = data.base[stem], panels = cell.panels[stem] || {};
    $("viewer-cell").value = String(state.entry);
    $("viewer-image").value = String(state.stem);
    $("show-pretrained").setAttribute("aria-pressed", String(state.side === "pretrained"));
    $("show-scratch").setAttribute("aria-pressed", String(state.side === "scratch"));
    $("show-pretrained").disabled = !entry.pretrained;
    $("show-scratch").disabled = !entry.scratch;
    $("prev-image").disabled = state.stem === 0;
    $("next-image").disabled = state.stem === data.stems.length - 1;
    $("viewer-caption").textContent = stem + " — " + cell.label + " (" + id + "): Dice on this image " +
      format(panels.dice) + ", test mean " + format(cell.dice);
    try {
      const [image, truthPicture] = await Promise.all([decode(base.image), decode(base.truth)]);
      const truth = ids(truthPicture);
      const pred = panels.prediction ? ids(await decode(panels.prediction)) : null;
      if (mine !== request) { return; }
      const shown = truth.map((v) => (v === paint.ignore ? 0 : v));
      put("panel-image", data.images[base.image], "");
      put("panel-truth", once("truth|" + stem, () => classes(image, shown)), "");
      const none = "this cell kept no prediction of " + stem;
      put("panel-prediction", pred && once(id + "|" + stem + "|p", () => classes(image, pred)), none);
      put("panel-outcome", pred && once(id + "|" + stem + "|o", () => outcome(image, pred, truth)), none);
      put("panel-uncertainty", panels.uncertainty ? data.images[panels.uncertainty] : null,
          "no uncertainty map kept");
      $("panel-prediction").dataset.cell = id;
      $("viewer-panels").dataset.shown = id + "|" + stem;
    } catch (err) {
      console.error(err);
      $("viewer-caption").textContent += " (not drawn: " + err.message + ")";
    }
  }
  function step(by) {
    state.stem = Math.min(data.stems.length - 1, Math.max(0, state.stem + by));
    show();
  }
  $("viewer-cell").addEventListener("change", (e) => { state.entry = Number(e.target.value); show(); });
  $("viewer-image").addEventListener("change", (e) => { state.stem = Number(e.target.value); show(); });
  $("prev-image").addEventListener("click", () => step(-1));
  $("next-image").addEventListener("click", () => step(1));
  $("show-pretrained").addEventListener("click", () => { state.side = "pretrained"; show(); });
  $("show-scratch").addEventListener("click", () => { state.side = "scratch"; show(); });
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "SELECT") { return; }
    if (e.key === "ArrowLeft") { step(-1); }
    if (e.key === "ArrowRight") { step(1); }
  });
  show();
})();
"""


def viewer_html(viewer: dict | None, num_classes: int) -> str:
    """The viewer's controls, panels and data (:func:`viewer_data`); a note when no cell kept predictions."""
    if not viewer or not viewer["entries"] or not viewer["stems"]:
        return ("<p>No cell kept predictions of its test images (<code>eval/predictions/</code>). "
                "<code>labeldiff study STUDY.yaml --out FOLDER --report-only</code> predicts them for the finished "
                "cells and writes this page again.</p>")
    n = len(viewer["stems"])
    return (f'<p class="muted">{len(viewer["cells"])} cells, the first {n} test image{"s" * (n != 1)} of each.</p>'
            + VIEWER_HTML + outcome_legend(num_classes) + json_script("viewer-data", viewer))


def study_page(folder: Path, title: str, texts: dict[str, str], results_csv: Path, viewer: dict | None,
               num_classes: int) -> str:
    """The study folder ``folder``'s page (module docstring): ``texts``, report file name → its Markdown (the
    reports of the folder, as the runner wrote them), ``results_csv`` its table of cells, ``viewer`` the
    overlay viewer's data (:func:`viewer_data`; None: no viewer)."""
    folder = Path(folder)
    sections = []
    for anchor, heading, name, figure in REPORTS:
        if name not in texts:
            continue
        body = report_body(texts[name])
        plot = folder / f"{figure}.png" if figure else None
        if plot is not None and plot.is_file():
            body += "\n" + figure_html(plot, FIGURES[figure])
        sections.append((anchor, heading, body))
    from labeldiff.study.report import read_csv

    rows = read_csv(results_csv)
    sections.append(("cells", "Every cell", f'<p class="muted">{len(rows)} finished cells, as in '
                     f'<a href="results.csv">results.csv</a>; point at a cell\'s id for the images it was given.</p>'
                     + cells_table(rows)))
    if (folder / "overlays.png").is_file():
        sections.append(("overlays", "Overlays", figure_html(folder / "overlays.png", FIGURES["overlays"])))
    sections.append(("viewer", "Overlay viewer", viewer_html(viewer, num_classes)))
    head, _, rest = title.partition(": ")
    return page(head, rest or "study report", sections, VIEWER_SCRIPT if viewer and viewer["entries"] else "")


# ---------------------------------------------------------------------------------------- compare's pages


def studies_page(title: str, text: str) -> str:
    """``labeldiff compare STUDY_A STUDY_B``: the table of :func:`~labeldiff.study.report.compare_markdown`."""
    return page(title, "two studies, paired cell by cell", [("differences", "Paired differences", report_body(text))])


def extreme_images(a, b, p: dict, count: int = 3) -> tuple[list[dict], str]:
    """The ``count`` test images where A is most behind B and the ``count`` where it is most ahead (by the
    paired difference of :func:`~labeldiff.study.paired_runs.paired_runs`), each predicted again by both runs
    (the run folders the evaluations name, with their precision and test-time augmentation): ``([{"stem",
    "delta", "a", "b", "image", "target", "pred_a", "pred_b"}], note)``; no images and a note saying why when a
    run or the dataset cannot be opened."""
    import torch

    from labeldiff.data.folders import open_labeled
    from labeldiff.errors import LabeldiffError
    from labeldiff.evaluate.predict import predict_logits
    from labeldiff.runs import RunFolder
    from labeldiff.runtime import INFERENCE_PRECISION, resolve_device

    order = sorted(range(p["n"]), key=lambda i: p["diffs"][i])
    chosen = order if len(order) <= 2 * count else order[:count] + order[-count:]
    if not chosen:
        return [], "no image has a score in both runs"
    stems = [p["stems"][i] for i in chosen]
    preds, shown = {}, []
    try:
        for name, e in (("a", a), ("b", b)):
            run = next((r for r in (Path(str(e.metrics.get("model", ""))), e.folder.parent)
                        if (r / "config.json").is_file()), None)
            if run is None:
                return [], (f"the run that {e.folder} evaluates ({e.metrics.get('model')}) is not there; compare the "
                            f"run folders themselves to see these images")
            folder = RunFolder.open(run)
            model, cfg = folder.segmenter(resolve_device("auto")), folder.config
            ds = open_labeled(cfg.data, Path(e.metrics.get("data") or cfg.data.path), e.scored.get("split_file"))
            samples = ds.samples(stems)
            images = [s.read_image(cfg.data.channels) for s in samples]
            preds[name] = [predict_logits(model, torch.from_numpy(x), cfg.data,
                                          e.metrics.get("precision", INFERENCE_PRECISION),
                                          tta=bool(e.metrics.get("tta"))).argmax(0).numpy() for x in images]
            if not shown:  # the image and truth as A read them
                shown = [(s, x, s.read_mask(a.num_classes)) for s, x in zip(samples, images)]
    except (LabeldiffError, OSError) as err:
        return [], f"the runs could not predict them again ({err})"
    return [{"stem": s.stem, "delta": p["diffs"][i], "a": p["values_a"][i], "b": p["values_b"][i], "image": image,
             "target": target, "pred_a": pa, "pred_b": pb, "ignore_index": s.ignore_index}
            for i, (s, image, target), pa, pb in zip(chosen, shown, preds["a"], preds["b"])], ""


def images_html(images: list[dict], names: tuple[str, str], num_classes: int, metric: str) -> str:
    """One row of panels per image of :func:`extreme_images`: image | truth | A's prediction | B's."""
    rows = []
    for im in images:
        pa = panel_pictures(im["image"], im["target"], im["pred_a"], num_classes, im["ignore_index"])
        pb = panel_pictures(im["image"], im["target"], im["pred_b"], num_classes, im["ignore_index"])
        panels = [("image", pa["image"]), ("ground truth", pa["truth"]),
                  (f"{names[0]}: {im['a']:.3f}", pa["outcome"]), (f"{names[1]}: {im['b']:.3f}", pb["outcome"])]
        figs = "".join(f'<figure><img src="{picture_uri(x)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}'
                       f"</figcaption></figure>" for c, x in panels)
        rows.append(f"<h3>{html.escape(im['stem'])}: Δ {im['delta']:+.3f}</h3>\n<div class=\"panels\">{figs}</div>")
    return (f"<p>The predictions of each run coloured by outcome, with its {html.escape(metric)} on the image.</p>"
            + outcome_legend(num_classes, uncertainty=False) + "\n".join(rows))


def runs_page(title: str, text: str, plot: Path | None, images: list[dict], note: str,
              names: tuple[str, str], num_classes: int, metric: str) -> str:
    """``labeldiff compare RUN_A RUN_B``: the report of :func:`~labeldiff.study.paired_runs.runs_markdown`
    (the summary row with the 95 % interval, then every image), the plot, and :func:`extreme_images`."""
    summary, sep, per_image = text.partition("\n## ")
    body = report_body(summary)
    if plot is not None and plot.is_file():
        body += figure_html(plot, "the per-image differences A − B, the mean with its 95 % interval")
    sections = [("difference", "Paired difference", body)]
    worst = images_html(images, names, num_classes, metric) if images else f"<p>No images: {html.escape(note)}.</p>"
    sections.append(("images", f"Where {names[0]} is most behind and most ahead", worst))
    if sep:  # "Per image, by Δ": every image's scores
        heading, _, table = per_image.partition("\n")
        sections.append(("per-image", heading.strip(), markdown_html(table, shift=1)))
    return page(title, f"two runs on the same test images, paired image by image ({metric})", sections)
