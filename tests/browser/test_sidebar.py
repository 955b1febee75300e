"""The JupyterLab sidebar in a real browser (Debian's Chromium, driven by Playwright) against a
real JupyterLab with the extension: open it, load the demo model, see a notebook's generation,
unload it, and read a clear message when the server goes away. Screenshots go to
test-artifacts/sidebar/."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from live_server import start_server, stop_server
from unavailable import unavailable

from mlx_jupyter.models.registry import DEMO_MODEL_PATH

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "sidebar"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]
NOTEBOOK = {
    "cells": [
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": "%load_ext mlx_jupyter"},
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": "%%mlx demo --max-tokens 24 --temperature 0\nTell me about the sea."}],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                "language": "python"}},
    "nbformat": 4, "nbformat_minor": 5}

if not Path(CHROMIUM).exists():
    unavailable("the browser tests need Chromium (apt-get install chromium, or make browser-deps)",
                module=True)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    # One model at a time: a second load while the first is pinned is refused (a 409).
    server = start_server(root, root / "lab.log", lab=True,
                          args=("--MlxApp.max_loaded_models=1",))
    shutil.copytree(DEMO_MODEL_PATH, server.root_dir / "demo-copy")
    yield server
    if server.process.poll() is None:
        stop_server(server)


@pytest.fixture(scope="module")
def page(lab):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(f"{lab.url}lab?token={lab.token}")
        page.wait_for_selector(".jp-LabShell")
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.started")
        yield page
        browser.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def status_of(page, model: str) -> str:
    return page.inner_text(f'[data-testid="mlx-status-{model}"]')


def test_the_extension_is_installed_enabled_and_ok():
    listed = subprocess.run([sys.executable, "-m", "jupyter", "labextension", "list"],
                            capture_output=True, text=True, check=True)
    line = next(line for line in (listed.stdout + listed.stderr).splitlines()
                if "mlx-jupyter" in line)
    assert "enabled" in line and "OK" in line


def test_the_panel_opens_and_lists_the_demo_model(page):
    page.click('.jp-SideBar li[data-id="mlx-jupyter-sidebar"]')
    page.wait_for_selector('[data-testid="mlx-model-demo"]')
    assert page.inner_text('[data-testid="mlx-memory"]').count("GB") >= 3
    assert page.evaluate("() => ['mlx-jupyter:load', 'mlx-jupyter:unload'].every("
                         "c => window.jupyterapp.commands.hasCommand(c))")
    shot(page, "1-opened")


def test_load_makes_it_loaded_and_the_status_bar_says_so(page, lab):
    page.click('[data-testid="mlx-load-demo"]')
    page.wait_for_function(
        """() => document.querySelector('[data-testid="mlx-status-demo"]')
                 .textContent === 'loaded'""")
    assert lab.get("mlx/api/models/demo").json()["status"] == "loaded"
    # The estimate it is counted for beside what its worker reports holding.
    page.wait_for_function(
        """() => /estimate \\d+\\.\\d\\d GB · live \\d+\\.\\d\\d GB/.test(
                 document.querySelector('[data-testid="mlx-memory-demo"]').textContent)""")
    page.wait_for_function(
        """() => document.querySelector('[data-testid="mlx-statusbar"]')
                 .textContent.includes('1 loaded')""")
    shot(page, "2-loaded")


def test_a_refused_load_shows_the_servers_reason(page, lab):
    httpx.post(lab.url + "mlx/api/models", headers={"Authorization": f"token {lab.token}"},
               json={"name": "demo-copy", "path": str(lab.root_dir / "demo-copy")},
               timeout=30).raise_for_status()
    page.wait_for_selector('[data-testid="mlx-model-demo-copy"]')
    page.click('[data-testid="mlx-pin-demo"]')
    page.wait_for_selector('[data-testid="mlx-unpin-demo"]')
    page.click('[data-testid="mlx-load-demo-copy"]')
    error = page.wait_for_selector('[data-testid="mlx-action-error"]')
    assert "load demo-copy: cannot load 'demo-copy'" in error.inner_text()
    assert "pinned" in error.inner_text()
    shot(page, "3-refused")
    page.click('[data-testid="mlx-unpin-demo"]')
    page.wait_for_selector('[data-testid="mlx-pin-demo"]')


def test_a_generation_from_a_notebook_appears_in_the_recent_list(page, lab):
    headers = {"Authorization": f"token {lab.token}"}
    httpx.put(lab.url + "api/contents/sea.ipynb", headers=headers, timeout=30,
              json={"type": "notebook", "format": "json", "content": NOTEBOOK}
              ).raise_for_status()
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:open', "
                  "{path: 'sea.ipynb'})")
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    page.wait_for_function(  # the kernel is up
        "() => document.querySelector('.jp-Notebook-ExecutionIndicator') === null || "
        "!document.title.includes('Busy')")
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_selector('[data-testid^="mlx-recent-"][data-notebook$="sea.ipynb"]'
                           '[data-status="completed"]', timeout=120_000)
    recent = page.inner_text('[data-testid="mlx-recent"]')
    assert "sea.ipynb" in recent and "demo" in recent and "completed" in recent
    history = lab.get("mlx/api/requests", params={"model": "demo"}).json()["requests"]
    row = next(r for r in history if (r["notebook"] or "").endswith("sea.ipynb"))
    # The decode speed as stored: the recent list and the cell's footer show the same figure.
    stored = f"{row['timings']['tokens_per_second']:.1f} tok/s"
    assert stored in page.inner_text(f'[data-testid="mlx-recent-{row["id"]}"]')
    page.wait_for_selector(f'.jp-OutputArea-output:has-text("{stored}")')
    shot(page, "4-generated")


def test_cancel_in_the_queue_cancels_the_request(page, lab):
    headers = {"Authorization": f"token {lab.token}"}
    pid = lab.get("mlx/api/models/demo").json()["pid"]
    os.kill(pid, signal.SIGSTOP)  # the job stays running until it is cancelled
    try:
        job = httpx.post(lab.url + "mlx/api/generate", headers=headers, timeout=30, json={
            "model": "demo", "prompt": "The sea", "max_tokens": 2000, "background": True,
        }).json()["request_id"]
        page.wait_for_selector(f'[data-testid="mlx-request-{job}"]')
        shot(page, "5-queue")
        page.click(f'[data-testid="mlx-cancel-{job}"]')
    finally:
        os.kill(pid, signal.SIGCONT)
    page.wait_for_selector(f'[data-testid="mlx-request-{job}"]', state="detached")
    assert lab.get(f"mlx/api/requests/{job}").json()["status"] == "cancelled"


def test_unload_frees_it(page, lab):
    page.click('[data-testid="mlx-unload-demo"]')
    page.wait_for_function(
        """() => document.querySelector('[data-testid="mlx-status-demo"]')
                 .textContent === 'unloaded'""")
    status = lab.get("mlx/api/status").json()
    assert status["models"]["loaded_count"] == 0 and status["memory"]["used_by_models"] == 0
    shot(page, "6-unloaded")


def test_a_server_that_goes_away_is_a_readable_message(page, lab):
    stop_server(lab)
    error = page.wait_for_selector('[data-testid="mlx-error"]', timeout=60_000)
    assert "cannot be reached" in error.inner_text()
    assert "offline" in page.inner_text('[data-testid="mlx-statusbar"]')
    shot(page, "7-server-gone")
