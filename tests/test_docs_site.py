"""The docs site builds with warnings as errors and renders in a real headless Chromium.

Builds ``mkdocs build --strict`` into ``build/site``, opens the home and API pages in Debian's chromium
through its chromedriver (selenium; nothing downloaded), checks the title, the navigation and that the API
page documents ``SampleCountRescaler`` with its signature and a parameter table (name, type, default), and
saves screenshots to ``build/site-screenshots/``. Without chromium, chromedriver or the ``docs`` extra the
test skips, unless ``LIGHTNING_ACCUM_REQUIRE_BROWSER=1`` (as in .ci/run), where it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "build" / "site"
SCREENSHOTS = ROOT / "build" / "site-screenshots"
REQUIRE = os.environ.get("LIGHTNING_ACCUM_REQUIRE_BROWSER") == "1"
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]


def missing(what: str) -> None:
    """Skip for ``what`` missing, or fail where CI requires the browser check."""
    message = f"{what} (install: apt-get install -y chromium chromium-driver; pip install -e '.[docs]')"
    if REQUIRE:
        pytest.fail(f"LIGHTNING_ACCUM_REQUIRE_BROWSER=1 but {message}")
    pytest.skip(message)


def build_site() -> None:
    """``mkdocs build --strict`` into build/site; fails the test with mkdocs' output on any warning."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(SITE)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"


@pytest.mark.slow
def test_site_builds_strict_and_renders_in_chromium() -> None:
    try:
        import mkdocs  # noqa: F401
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
    except ImportError as error:
        missing(f"the docs extra is not installed ({error})")
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        missing("chromium or chromedriver is not on PATH")
    build_site()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        browser = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
        try:
            browser.get((SITE / "index.html").as_uri())
            assert browser.title.startswith("lightning-accum"), browser.title
            nav = browser.find_element(By.CSS_SELECTOR, "nav.md-nav--primary").get_attribute("textContent")
            for entry in ("Getting started", "User guide", "API reference", "Evidence", "FSDP"):
                assert entry in nav, f"{entry!r} missing from the navigation: {nav!r}"
            image = browser.find_element(By.CSS_SELECTOR, "img[src$='naive-vs-exact.png']")
            assert browser.execute_script("return arguments[0].naturalWidth", image) > 0, "figure did not load"
            browser.save_screenshot(str(SCREENSHOTS / "home.png"))
            browser.get((SITE / "api.html").as_uri())
            assert "API reference" in browser.title, browser.title
            headings = [h.get_attribute("id") for h in browser.find_elements(By.CSS_SELECTOR, "h2[id]")]
            for name in ("SampleCountRescaler", "SampleCountMixin", "GlobalBatchSampler", "GlobalBatchLoader"):
                assert f"lightning_accum.{name}" in headings, f"{name} not documented on the API page: {headings}"
            rescaler = browser.find_element(By.ID, "lightning_accum.SampleCountRescaler").find_element(By.XPATH, "..")
            signature = rescaler.find_element(By.CSS_SELECTOR, ".doc-signature").get_attribute("textContent")
            assert 'mode: Literal["deferred", "lookahead"] = "deferred"' in signature, signature
            rows = {  # the Args: section as a parameter table (Google-style docstrings): name -> (type, default)
                cells[0].text: (cells[1].text, cells[3].text)
                for row in rescaler.find_elements(By.CSS_SELECTOR, "table tr.doc-section-item")
                for cells in [row.find_elements(By.TAG_NAME, "td")]
                if len(cells) == 4
            }
            assert rows.get("loss_name") == ("str", "'train/loss'"), rows
            assert rows.get("mode", ("", ""))[1] == "'deferred'", rows
            assert "Example::" not in rescaler.get_attribute("textContent")
            browser.save_screenshot(str(SCREENSHOTS / "api.png"))
        finally:
            browser.quit()
