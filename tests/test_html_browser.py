"""The HTML report in a real headless browser (Debian's chromium): every plot decodes and is shown
at a readable width (at least half the page's content width), the tables are there and none is
wider than its container or the page, and a screenshot is kept as an artefact.

Without a browser the test FAILS (CI installs chromium in .ci/run). Set BENCH_SKIP_BROWSER=1 to
skip it on a machine without one; BENCH_CHROMIUM=/path/to/chrome picks another binary.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("BENCH_ARTIFACTS", ROOT / "artifacts"))

# Appended to a copy of the report: after load, write what the browser rendered into the DOM.
CHECK = """<script>
window.addEventListener("load", () => {
  const style = getComputedStyle(document.body);
  const page = document.body.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  const images = [...document.images].map(img => ({plot: img.dataset.plot || img.alt, ok: img.complete && img.naturalWidth > 0,
                                                   width: img.naturalWidth, height: img.naturalHeight,
                                                   shown: img.getBoundingClientRect().width}));
  const tables = [...document.querySelectorAll("table")].map(t => ({
    id: t.id, rows: t.rows.length, visible: t.offsetParent !== null, width: t.getBoundingClientRect().width,
    container: t.parentElement.getBoundingClientRect().width}));
  document.body.setAttribute("data-check", JSON.stringify({page, images, tables}));
});
</script>"""


def chromium() -> str:
    found = os.environ.get("BENCH_CHROMIUM") or next(
        (path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None)
    if found:
        return found
    if os.environ.get("BENCH_SKIP_BROWSER"):
        pytest.skip("BENCH_SKIP_BROWSER is set and no chromium is installed")
    pytest.fail("no chromium found: install it (apt-get install chromium) or set BENCH_SKIP_BROWSER=1 to skip")


def browse(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, f"chromium failed ({result.returncode}): {result.stderr[-2000:]}"
    return result


def test_report_renders_in_headless_chromium(fabricated_report, tmp_path):
    binary = chromium()
    _, out, _ = fabricated_report  # `bench report --out` on test_reports' fabricated store (conftest.py)
    page = (out / "report.html").read_text(encoding="utf-8")
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", CHECK + "</body>"), encoding="utf-8")

    dom = browse(binary, tmp_path / "profile-dom", "--window-size=1280,4000", "--virtual-time-budget=5000", "--dump-dom",
                 checked.as_uri()).stdout
    match = re.search(r'data-check="([^"]*)"', dom)
    assert match, "the check script did not run: " + dom[:500]
    check = json.loads(unescape(match.group(1)))
    plots = {image["plot"]: image for image in check["images"]}
    assert set(plots) == {"accuracy_under_attack", "median_perturbation", "certified_accuracy", "robust_precision_recall", "cost"}
    page_width = check["page"]
    assert page_width > 1000, check["page"]  # the window is 1280 px wide: the page is its 1200 px container
    for name, image in plots.items():
        assert image["ok"] and image["width"] > 300 and image["height"] > 150, f"plot {name} did not render: {image}"
        # readable: at least half of the content width (two per row or full width), never wider than it
        assert page_width / 2 - 30 <= image["shown"] <= page_width + 0.5, f"plot {name} shown {image['shown']} px wide"
    assert plots["cost"]["shown"] > page_width - 2  # a wide figure spans the row
    for table in check["tables"]:
        if table["visible"]:  # the library-version tables sit in closed <details>
            assert table["width"] <= table["container"] + 0.5 <= page_width + 1, f"table wider than its container: {table}"
    certified = next(t for t in check["tables"] if t["id"] == "table-certified-accuracy")
    assert certified["width"] > page_width / 2  # it is the wide one: the check above means something
    assert check["tables"][0]["id"].startswith("table-ranking")  # the ranking comes first, after the diagnostics
    tables = {table["id"]: table["rows"] for table in check["tables"]}
    for expected in ("table-clean-accuracy", "table-certified-accuracy", "table-cost"):
        assert tables.get(expected, 0) > 1, f"table {expected} missing or empty: {tables}"
    assert sum(1 for t in tables if t.startswith("table-accuracy-under-attack")) == 3
    assert sum(1 for t in tables if t.startswith("versions-")) == 3  # library versions of every run
    assert "accuracy rises with epsilon" in dom

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "report-screenshot.png"
    screenshot.unlink(missing_ok=True)
    browse(binary, tmp_path / "profile-shot", "--window-size=1280,4000", f"--screenshot={screenshot}",
           (out / "report.html").as_uri())
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 50_000
    print(f"screenshot of the report: {screenshot}")
