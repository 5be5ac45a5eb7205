"""`inversa report` in a real browser: headless Chromium (the system's, driven by playwright) loads
report.html; every image decodes (naturalWidth > 0), every table renders rows, the plots are there and
the error messages appear grouped under their type. Expected counts come from the rows as written.

Skipped only when no Chromium binary exists (`.ci/run` installs Debian's `chromium`).

The README's screenshot is taken by the same code on a shapes-demo output (the page is checked first):

    python tests/test_report_browser.py out/shapes_demo docs/report.png
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from output_tables import write_output
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
SCREENSHOT_BYTES = 500_000
README_SHOT_HEIGHT = 2200  # the tables, the plots and the gallery's first rows


def chromium() -> str:
    found = os.environ.get("INVERSA_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if not found:
        pytest.skip(
            f"no Chromium binary ({' / '.join(CHROMIUM_NAMES)} on PATH, or INVERSA_CHROMIUM); .ci/run installs it"
        )
    return found


def render(report_path, screenshot_path, height: int | None = None) -> dict:
    """Open the report in headless Chromium; return what the page shows. The screenshot is the
    viewport, or the page's top `height` pixels."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(report_path.resolve().as_uri(), wait_until="load")
            shown = page.evaluate(
                """() => ({
                    images: Array.from(document.images).map(i => ({
                        complete: i.complete, width: i.naturalWidth, plot: i.classList.contains('plot')})),
                    tables: Array.from(document.querySelectorAll('table')).map(t => ({
                        rows: t.rows.length, height: t.getBoundingClientRect().height})),
                    headings: Array.from(document.querySelectorAll('h2, h3')).map(h => h.innerText),
                    messages: Array.from(document.querySelectorAll('h3 + table')).map(t =>
                        Array.from(t.querySelectorAll('td.message')).map(c => c.innerText)),
                })"""
            )
            clip = {"x": 0, "y": 0, "width": 1400, "height": height} if height else None
            page.screenshot(path=str(screenshot_path), full_page=bool(height), clip=clip)
        finally:
            browser.close()
    return shown


def check_page(shown: dict, sources: int, edits: int, composites: int = 0) -> None:
    assert all(image["complete"] and image["width"] > 0 for image in shown["images"]), shown["images"]
    gallery = [image for image in shown["images"] if not image["plot"]]
    # Source + reconstruction per source, one per edit and one per composite.
    assert len(gallery) == 2 * sources + edits + composites
    assert sum(image["plot"] for image in shown["images"]) == 2
    assert shown["tables"] and all(t["rows"] >= 2 and t["height"] > 0 for t in shown["tables"])
    assert {"Plots", "Errors", "Gallery"} <= set(shown["headings"])


def test_report_renders_in_chromium(tmp_path):
    chromium()
    output = tmp_path / "out"
    rows = write_output(str(output))
    result = runner.invoke(app, ["report", str(output)])
    assert result.exit_code == 0, result.output
    screenshot = tmp_path / "report.png"
    shown = render(output / "report.html", screenshot)
    check_page(shown, len(rows["sources"]), len(rows["edits"]))
    groups: dict[str, dict[str, None]] = {}
    for error in rows["errors"]:
        groups.setdefault(f"{error['stage']}: {error['error_type']}", {})[error["error"]] = None
    headings = [h for h in shown["headings"] if ": " in h]
    assert headings == sorted(groups)
    assert [sorted(messages) for messages in shown["messages"]] == [sorted(groups[h]) for h in headings]
    assert 0 < screenshot.stat().st_size < SCREENSHOT_BYTES


def test_an_output_without_errors_says_so(tmp_path):
    from pipeline.report import write_report

    output = tmp_path / "out"
    write_output(str(output))
    for path in (output / "errors").glob("*.parquet"):
        path.unlink()
    page = Path(write_report(str(output))).read_text()
    assert "<h2>Errors</h2><p>no errors</p>" in page and "<h3>" not in page


@pytest.mark.slow
def test_report_of_a_real_job_renders_in_chromium(clean_run, tmp_path):
    chromium()
    path = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(clean_run["output"]), "--path", str(path)])
    assert result.exit_code == 0, result.output
    shown = render(path, tmp_path / "report.png")
    sources, edits, composites = table_counts(str(clean_run["output"]))
    assert composites > 0  # the test job composites
    check_page(shown, sources, edits, composites)
    assert edits == clean_run["manifest"]["counts"]["edits"]


def table_counts(output: str) -> tuple[int, int, int]:
    """(sources, edits, composited edits) rows of OUTPUT's tables."""
    from pipeline.report import connect

    counts = connect(output).sql(
        "select (select count(*) from sources), (select count(*) from edits), "
        "(select count(composite_image) from edits)"
    )
    return counts.fetchall()[0]


if __name__ == "__main__":
    import sys

    from pipeline.report import write_report

    output, screenshot = sys.argv[1], Path(sys.argv[2])
    report = Path(write_report(output))
    check_page(render(report, screenshot, height=README_SHOT_HEIGHT), *table_counts(output))
    size = screenshot.stat().st_size
    assert size < SCREENSHOT_BYTES, (
        f"{screenshot}: {size} bytes; keep the README's screenshot under {SCREENSHOT_BYTES}"
    )
    print(f"{screenshot}: {size} bytes")


def test_stochastic_samples_are_shown_side_by_side_with_their_diversity(tmp_path):
    """Each sample group is one row: the source, then its samples in sample_index order; the summary's
    mean diversity is the mean over groups of the written rows."""
    import re

    import numpy as np

    from pipeline.report import write_report

    output = tmp_path / "out"
    rows = write_output(str(output), sample_groups=True)
    page = Path(write_report(str(output))).read_text()
    section = page[page.index("<h2>Stochastic samples</h2>") : page.index("<h2>Errors</h2>")]
    groups: dict[str, list[dict]] = {}
    for row in rows["edits"]:
        groups.setdefault(row["sample_group"], []).append(row)
    assert section.count('class="sample"') == len(rows["edits"])
    assert re.findall(r"sample (\d) \(seed (\d+)\)", section) == [("0", "10"), ("1", "11")] * len(groups)
    by_class: dict[str, list[float]] = {}
    for members in groups.values():
        by_class.setdefault(members[0]["target_class"], []).extend(row["diversity"] for row in members)
    first_class = sorted(by_class)[0]
    summary_row = re.search(rf"<tr><td>{first_class}</td><td>null_text</td>(.*?)</tr>", section).group(1)
    cells = re.findall(r"<td>(.*?)</td>", summary_row)
    assert cells[1] == "2" and cells[2] == f"{np.mean(by_class[first_class]):.3f}"
    without = tmp_path / "plain"
    write_output(str(without))
    assert "Stochastic samples" not in Path(write_report(str(without))).read_text()
