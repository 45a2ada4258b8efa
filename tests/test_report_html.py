"""``report.html`` (labeldiff.study.html_report): the Markdown subset it renders, a page built from a study
folder's files that loads nothing from the network and names every cell, and a real tiny study's page
opened in headless Chromium: no console errors, the table of cells equal to results.csv, and the overlay
viewer stepping through test images and switching a pretrained cell for its scratch pair."""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_labeled_dataset, write_tiny_study

from labeldiff.config import DataConfig
from labeldiff.data.folders import open_labeled
from labeldiff.evaluate.run import save_prediction
from labeldiff.study import html_report, report
from labeldiff.study.verdict import verdict_markdown


class Page(HTMLParser):
    """What the tests read from a page: every src / href value, the <style> and <script> elements' attributes,
    and the ids of elements."""

    def __init__(self, text: str):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.tags: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        self.refs += [(tag, k, v or "") for k, v in attrs if k in ("src", "href", "srcset", "poster", "data")]


def external_references(text: str) -> list[str]:
    """Everything in the page that would load (or link) something from elsewhere: a src / href that is not a
    data: URI, an anchor in the page or a file beside it; a <link> or an external <script>; a CSS url() or
    @import; any http(s):// or protocol-relative address in an attribute."""
    page = Page(text)
    bad = [f"<{t} {k}={v[:60]}>" for t, k, v in page.refs
           if not (v.startswith("data:image/") or v.startswith("#")
                   or (t == "a" and k == "href" and re.fullmatch(r"[\w.-]+", v)))]
    bad += [f"<{t}>" for t, a in page.tags if t == "link" or (t == "script" and "src" in a)]
    bad += re.findall(r"url\(\s*['\"]?(?!data:)[^)]*\)|@import[^;]*", text)
    bad += re.findall(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//[^\s\"'>]+", text)
    return bad


def test_markdown_subset_renders_tables_emphasis_and_escapes():
    text = ("# Title dropped by the caller\n\nSome *text* with **bold** & <tags> and `a|b`.\n\n## Dice\n\n"
            "| method | k = 2 |\n|---|---|\n| ddpm | **0.812 ± 0.020 (3)** |\n| <x> | – |\n\n"
            "- one [results.csv](results.csv)\n- two [site](https://example.org)\n")
    out = html_report.markdown_html(text, shift=1)
    assert "<h2>Title dropped by the caller</h2>" in out and "<h3>Dice</h3>" in out
    assert "<p>Some <em>text</em> with <strong>bold</strong> &amp; &lt;tags&gt; and <code>a|b</code>.</p>" in out
    assert "<th>method</th><th>k = 2</th>" in out
    assert '<td class="num"><strong>0.812 ± 0.020 (3)</strong></td>' in out
    assert "<td>&lt;x&gt;</td>" in out
    assert '<li>one <a href="results.csv">results.csv</a></li>' in out
    assert "<li>two site (https://example.org)</li>" in out  # a web address is shown, never linked or loaded
    assert not external_references(out)
    for outside in ('<img src="https://example.org/a.png">', '<link rel="stylesheet" href="//cdn.example.org/a.css">',
                    '<script src="a.js"></script>', "<style>body { background: url(http://example.org/a.png) }</style>",
                    '<a href="http://example.org">x</a>'):
        assert external_references(outside), outside


def _fake_cell(folder: Path, stems: list[str], seed: int, keep: bool) -> None:
    """A finished cell's eval/: metrics.json, per_image.csv and (``keep``) predictions of ``stems``."""
    ev = folder / "eval"
    ev.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, stem in enumerate(stems):
        logits = torch.randn(3, 40, 48, generator=g)
        if keep:
            save_prediction(ev / "predictions", stem, logits, logits.argmax(0).numpy(), 3)
        rows.append(f"{stem},0.9,{0.5 + 0.1 * i:.6f},0.7")
    (ev / "per_image.csv").write_text("stem,dice_0,dice_1,dice_2\n" + "\n".join(rows) + "\n")
    (ev / "metrics.json").write_text(json.dumps({"dice": {"mean": 0.5, "per_class": {"0": 1, "1": 0.4, "2": 0.6}}}))


@pytest.fixture
def study_folder(tmp_path):
    """A study folder as the runner leaves it, without training: 6 images (4 test), three cells (a pretrained
    and a scratch cell of seed 0 with kept predictions, a pretrained cell of seed 1 without), results.csv,
    the reports of the real report functions and a figure."""
    data = write_labeled_dataset(tmp_path / "data", n=6, k=3, n_train=2)
    ds = open_labeled(DataConfig(path=str(data), size=16, channels=3))
    test = ds.stems("test")
    out = tmp_path / "out"

    def row(cell, method, strategy, seed, dice):
        return {"cell": cell, "method": method, "pretrain_steps": 2 if method != "none" else None, "arch": "A",
                "strategy": strategy, "protocol": "default", "k": 2, "seed": seed, "select": "random",
                "stems": "img_00;img_01", "dice": dice, "iou": dice / 2, "dice_0": 0.9, "dice_1": dice,
                "dice_2": dice, "seconds": 1.0}

    rows = [row("ddpm-full-k2-s0-random-aaaa", "ddpm", "full", 0, 0.61),
            row("none-scratch-k2-s0-random-bbbb", "none", "scratch", 0, 0.52),
            row("ddpm-full-k2-s1-random-cccc", "ddpm", "full", 1, 0.58)]
    dirs = {r["cell"]: out / "cells" / r["cell"] for r in rows}
    for i, r in enumerate(rows):
        _fake_cell(dirs[r["cell"]], test, seed=i, keep=r["seed"] == 0)
    report.write_csv(rows, out / "results.csv")
    shutil.copyfile(data / "images" / "img_00.png", out / "dice_vs_labels.png")
    texts = {"results.md": report.results_markdown(rows, ["dice", "iou"], "x: data, test split 4 images"),
             "paired.md": report.paired_markdown(rows), "verdict.md": verdict_markdown(rows, "x: data")}
    return out, rows, dirs, ds.samples(test), texts


def test_a_study_page_loads_nothing_from_the_network_and_names_every_cell(study_folder):
    out, rows, dirs, samples, texts = study_folder
    viewer = html_report.viewer_data(rows, dirs, samples, channels=3, num_classes=3)
    text = html_report.study_page(out, "x: data, test split 4 images", texts, out / "results.csv", viewer, 3)
    assert not external_references(text), external_references(text)
    for r in rows:
        assert r["cell"] in text
    for heading in ("Verdict", "Results", "Paired differences", "Every cell", "Overlay viewer"):
        assert f"<h2>{heading}</h2>" in text
    assert "95 % CI" in text and "dice_vs_labels.png:" in text
    # the viewer: the two cells that kept predictions, the pretrained one paired with its scratch cell
    assert set(viewer["cells"]) == {rows[0]["cell"], rows[1]["cell"]}
    assert viewer["entries"] == [{"label": "ddpm / full · k = 2 · seed 0", "pretrained": rows[0]["cell"],
                                  "scratch": rows[1]["cell"]}]
    assert viewer["stems"] == [s.stem for s in samples]
    panels = viewer["cells"][rows[0]["cell"]]["panels"]
    assert panels[samples[1].stem]["dice"] == pytest.approx(np.mean([0.6, 0.7]))  # foreground mean of per_image.csv
    # each test image and its truth stored once for both cells, a cell adding its mask and uncertainty per image
    assert len(viewer["images"]) == 2 * len(samples) + 2 * 2 * len(samples)
    assert all(uri.startswith(("data:image/png;base64,", "data:image/jpeg;base64,"))
               for uri in viewer["images"].values())
    truth = samples[0].read_mask(3)
    assert np.array_equal(decode_ids(viewer["images"][viewer["base"][samples[0].stem]["truth"]]), truth)
    data = json.loads(re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', text, re.S)
                      .group(1))
    assert data == json.loads(json.dumps(viewer))


def decode(uri: str) -> np.ndarray:
    """A data: URI's picture as an array."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        return np.asarray(im.convert("RGB"))


def decode_ids(uri: str) -> np.ndarray:
    """The class ids of a mask picture of the page (red + 256 × green, as the page reads them)."""
    px = decode(uri).astype(np.int64)
    return px[..., 0] + 256 * px[..., 1]


def test_pictures_are_scaled_down_to_the_panel_side_and_masks_keep_their_ids():
    side = html_report.PANEL_SIDE
    wide = decode(html_report.picture_uri(np.zeros((1000, 600, 3), np.uint8)))
    assert wide.shape == (side, round(600 * side / 1000), 3)
    mask = np.zeros((1000, 600), np.int64)
    mask[:500] = 300  # above 255: the green byte carries it
    mask[500:, :300] = 2
    small = decode_ids(html_report.mask_uri(mask))
    assert small.shape == (side, round(600 * side / 1000))
    assert set(np.unique(small)) == {0, 2, 300} and (small[: side // 2 - 1] == 300).all()
    assert np.array_equal(decode_ids(html_report.mask_uri(mask[:40, :48])), mask[:40, :48])  # small: as it is


# ------------------------------------------------------------------------------------- in a real browser


def _missing(reason: str):
    """Skip for want of a browser; fail instead where CI has promised one (.ci/run sets
    LABELDIFF_REQUIRE_BROWSER after installing it)."""
    if os.environ.get("LABELDIFF_REQUIRE_BROWSER"):
        pytest.fail(f"{reason}, and LABELDIFF_REQUIRE_BROWSER is set")
    pytest.skip(reason)


def _browser():
    """A headless Chromium driven by Selenium, or a skip naming what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install -e '.[test]')")
    binary = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        _missing("no Chromium or chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1300,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))  # the given driver: no download


def _severe(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _shown(driver, what: str) -> None:
    """Wait until the viewer has painted ``what`` ("cell|stem"): it paints after a click, not during it."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 10).until(
        lambda d: d.find_element("id", "viewer-panels").get_attribute("data-shown") == what)


def _painted_as_python_paints(driver, viewer: dict, cell: str, stem: str) -> None:
    """The truth, prediction and outcome the page painted for ``cell`` on ``stem`` are the pixels of
    labeldiff.evaluate's overlay and outcome_overlay on the page's own image and masks (±1 for rounding,
    a little more where two JPEG decoders differ)."""
    from labeldiff.study.html_report import panel_pictures

    image = decode(viewer["images"][viewer["base"][stem]["image"]])
    truth = decode_ids(viewer["images"][viewer["base"][stem]["truth"]])
    pred = decode_ids(viewer["images"][viewer["cells"][cell]["panels"][stem]["prediction"]])
    want = panel_pictures(image.transpose(2, 0, 1) / 127.5 - 1, truth, pred, len(viewer["paint"]["classes"]),
                          viewer["paint"]["ignore"])
    for name in ("truth", "prediction", "outcome"):
        got = decode(driver.find_element("id", f"panel-{name}").get_attribute("src")).astype(int)
        diff = np.abs(got - want[name].astype(int))
        assert got.shape == want[name].shape and diff.mean() < 0.5 and diff.max() <= 3, (name, diff.mean(), diff.max())


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> Path:
    """A tiny study run to the end (ddpm full and scratch, k = 2, seed 0, 2 test images): its folder."""
    from labeldiff.cli import main

    root = tmp_path_factory.mktemp("report")
    study = write_tiny_study(root, finetune_steps=4)
    for recipe in ("pre.yaml", "ft.yaml"):  # a learning rate from the first step: the two networks differ
        values = yaml.safe_load((root / recipe).read_text())
        values["train"]["warmup_steps"] = 1
        (root / recipe).write_text(yaml.safe_dump(values))
    assert main(["study", str(study), "--out", str(root / "out")]) == 0
    return root / "out"


@pytest.mark.slow
def test_report_only_predicts_the_viewer_images_of_cells_that_finished_without(tiny_study, capsys):
    """A cell evaluated before cells kept their predictions gets them from --report-only, once: the same
    files its evaluation writes (the same model, precision and images)."""
    from labeldiff.cli import main

    cell = next((tiny_study / "cells").glob("ddpm-*"))
    kept = cell / "eval" / "predictions"
    files = sorted(p.relative_to(kept) for p in kept.rglob("*.png"))
    assert [str(f) for f in files] == ["img_04.png", "img_05.png", "uncertainty/img_04.png", "uncertainty/img_05.png"]
    written = {f: (kept / f).read_bytes() for f in files}
    shutil.rmtree(kept)
    capsys.readouterr()
    assert main(["study", str(tiny_study.parent / "s.yaml"), "--out", str(tiny_study), "--report-only"]) == 0
    assert "predictions for the report's viewer" in capsys.readouterr().err
    assert {f: (kept / f).read_bytes() for f in files} == written
    page = (tiny_study / "report.html").read_text()
    viewer = json.loads(re.search(r'id="viewer-data">(.*?)</script>', page, re.S).group(1))
    assert set(viewer["cells"][cell.name]["panels"]) == {"img_04", "img_05"}


@pytest.mark.slow
def test_a_tiny_study_report_in_headless_chromium(tiny_study, tmp_path):
    driver = _browser()  # first: it skips when selenium or the browser is missing
    from selenium.webdriver.common.by import By

    try:
        page = tiny_study / "report.html"
        assert page.stat().st_size < 1_000_000
        assert not external_references(page.read_text())
        driver.get(page.as_uri())
        assert driver.execute_script("return document.readyState") == "complete"
        assert not _severe(driver)

        # the table of every cell holds results.csv's numbers
        with open(tiny_study / "results.csv", newline="") as f:
            expected = {r["cell"]: r for r in csv.DictReader(f)}
        table = driver.find_element(By.ID, "cells-table")
        head = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
        shown = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                 for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
        assert {"cell", "dice", "iou", "dice_1", "dice_2"} <= set(head)
        assert sorted(r[head.index("cell")] for r in shown) == sorted(expected)
        for r in shown:
            want = expected[r[head.index("cell")]]
            for col, value in zip(head, r):
                try:
                    assert float(value) == float(want[col]), (col, value, want[col])
                except ValueError:
                    assert value == want[col], (col, value, want[col])

        # the viewer: the next image, then the scratch pair on the same image
        scratch = next(c for c, r in expected.items() if r["strategy"] == "scratch")
        pretrained = next(c for c, r in expected.items() if r["strategy"] != "scratch")
        image = driver.find_element(By.ID, "panel-image")
        caption = driver.find_element(By.ID, "viewer-caption")
        _shown(driver, f"{pretrained}|img_04")
        viewer = json.loads(driver.find_element(By.ID, "viewer-data").get_attribute("textContent"))
        _painted_as_python_paints(driver, viewer, pretrained, "img_04")
        first = image.get_attribute("src")
        assert first.startswith("data:image/") and caption.text.startswith("img_04")
        assert driver.find_element(By.ID, "prev-image").get_attribute("disabled")
        driver.find_element(By.ID, "next-image").click()
        _shown(driver, f"{pretrained}|img_05")
        assert image.get_attribute("src") != first and caption.text.startswith("img_05")
        assert driver.find_element(By.ID, "viewer-image").get_attribute("value") == "1"
        prediction = driver.find_element(By.ID, "panel-prediction")
        assert prediction.get_attribute("data-cell") == pretrained
        before = {p: driver.find_element(By.ID, f"panel-{p}").get_attribute("src")
                  for p in ("prediction", "uncertainty")}
        driver.find_element(By.ID, "show-scratch").click()
        _shown(driver, f"{scratch}|img_05")
        _painted_as_python_paints(driver, viewer, scratch, "img_05")
        assert prediction.get_attribute("data-cell") == scratch and scratch in caption.text
        assert driver.find_element(By.ID, "show-scratch").get_attribute("aria-pressed") == "true"
        after = {p: driver.find_element(By.ID, f"panel-{p}").get_attribute("src")
                 for p in ("prediction", "uncertainty")}
        assert after["uncertainty"] != before["uncertainty"]  # another network's pixels
        assert caption.text.startswith("img_05")  # the same test image
        assert not _severe(driver)
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        driver.quit()
