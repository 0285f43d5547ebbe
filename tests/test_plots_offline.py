"""The project's DVC plots page template (.dvc/offline_plots.html, written by .ci/plots_template):
`dvc plots show` pages draw every plot in a real headless Chromium with the network blocked."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, sh

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed here (.ci/run installs it: apt-get install chromium)"
)


def plots_project(tmp_path: Path, offline_template: bool) -> Path:
    """A repo with the committed dvc.yaml, .dvc/ and plots/ (the files a clone has)."""
    project = tmp_path / ("offline" if offline_template else "default")
    shutil.copytree(REPO / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    shutil.copytree(REPO / "plots", project / "plots")
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    sh(project, "git", "init", "-q")
    if not offline_template:
        sh(project, "dvc", "config", "--unset", "plots.html_template")
    return project


def render_offline(page_path: Path) -> dict:
    """Open the page with every non-file request aborted; count what drew, and what failed."""
    from playwright.sync_api import sync_playwright

    blocked, errors = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()

        def only_files(route) -> None:
            if route.request.url.startswith("file://"):
                route.continue_()
            else:
                blocked.append(route.request.url)
                route.abort()

        page.route("**/*", only_files)
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(page_path.as_uri(), wait_until="load")
        page.wait_for_timeout(3000)  # vegaEmbed renders asynchronously after load
        charts = page.locator(".vega-embed canvas, .vega-embed svg.marks").count()
        images = page.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length")
        browser.close()
    return {"charts": charts, "images": images, "blocked": blocked, "errors": errors}


def declared_plots() -> tuple[int, int]:
    """(Vega charts, images) that dvc.yaml declares."""
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    images = [plot for plot in plots if isinstance(plot, str) and plot.endswith(".png")]
    return len(plots) - len(images), len(images)


@pytest.mark.pipeline
def test_dvc_plots_show_draws_every_plot_with_the_network_blocked(tmp_path: Path) -> None:
    charts, images = declared_plots()
    assert (charts, images) == (5, 4)
    project = plots_project(tmp_path, offline_template=True)
    sh(project, "dvc", "plots", "show", "-o", "out")
    result = render_offline(project / "out/index.html")
    assert result == {"charts": charts, "images": images, "blocked": [], "errors": []}


@pytest.mark.pipeline
def test_dvc_default_page_stays_blank_offline(tmp_path: Path) -> None:
    """What the template fixes: DVC's own page loads Vega from a CDN and draws nothing offline."""
    project = plots_project(tmp_path, offline_template=False)
    sh(project, "dvc", "plots", "show", "-o", "out")
    result = render_offline(project / "out/index.html")
    assert result["charts"] == 0
    assert any("cdn.jsdelivr.net/npm/vega@" in url for url in result["blocked"])
