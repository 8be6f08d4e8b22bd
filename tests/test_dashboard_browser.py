"""The box's page in a real headless Chromium against a real daemon with the real model.

Debian's ``chromium`` driven by Playwright (``scripts/bootstrap test`` installs both; no
browser is downloaded). Set ``EDGE_AGENT_SCREENSHOT=docs/dashboard.png`` to keep the
screenshot the README shows.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.manifest import load_manifest
from tests.conftest import Daemon

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The page polls every 3 s; a change shows within two polls.
WITHIN_MS = 10_000

sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra brings playwright")
if not Path(CHROMIUM).exists():
    pytest.skip(
        "Debian's chromium is not installed (scripts/bootstrap test)", allow_module_level=True
    )


def get_json(daemon: Daemon, path: str) -> Any:
    with urllib.request.urlopen(daemon.url + path, timeout=30) as response:
        return json.load(response)


def complete(daemon: Daemon, prompt: str) -> dict[str, Any]:
    request = urllib.request.Request(
        daemon.url + "/infer/openai/v1/completions",
        data=json.dumps({"prompt": prompt, "max_tokens": 12, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body: dict[str, Any] = json.load(response)
    # A request that made no token has no ttft or tps: each one here must chart.
    assert body["usage"]["completion_tokens"] > 0, prompt
    return body


def wait_serving(daemon: Daemon) -> None:
    """Until the daemon answers HTTP at all (before its model is ready, or never)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            get_json(daemon, "/healthz")
            return
        except OSError:
            if time.monotonic() > deadline or daemon.process.poll() is not None:
                raise
            time.sleep(0.1)


def wait_for_count(page: Any, selector: str, count: int) -> None:
    page.wait_for_function(
        "([selector, count]) => document.querySelectorAll(selector).length === count",
        arg=[selector, count],
        timeout=WITHIN_MS,
    )


@pytest.fixture
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def test_the_page_shows_charts_records_and_new_requests_without_errors(
    start_daemon: Callable[..., Daemon], browser: Any, tmp_path: Path
) -> None:
    daemon = start_daemon()
    answers = [complete(daemon, f"Once upon a time, robot number {n}") for n in range(3)]

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(daemon.url + "/")

    # The table: those requests, newest first.
    rows = page.locator("#latest tr.record")
    wait_for_count(page, "#latest tr.record", 3)
    logged = get_json(daemon, "/logs?limit=10")["data"]
    assert [r["id"] for r in logged] == [rows.nth(i).get_attribute("data-id") for i in range(3)]
    assert [r["time"] for r in logged] == sorted((r["time"] for r in logged), reverse=True)

    # Both charts: one median and one p95 point per bucket the stats list.
    stats = get_json(daemon, "/stats?window=1h")
    assert sum(p["count"] for p in stats["ttft"]) == sum(p["count"] for p in stats["tps"]) == 3
    for chart in ("ttft", "tps"):
        for key in ("p50", "p95"):
            wait_for_count(page, f"#chart-{chart} circle.{key}", len(stats[chart]))
    wait_for_count(page, "#chart-requests rect.ok", len(stats["requests"]))
    page.wait_for_function("document.getElementById('state').textContent === 'ready'")
    assert page.locator("#banner").is_hidden()

    # Opening the newest row shows its completion text.
    rows.first.click()
    completion = page.locator("#latest pre.completion")
    completion.wait_for(timeout=WITHIN_MS)
    assert completion.text_content() == answers[-1]["choices"][0]["text"]

    # A new request appears on its own, without a reload.
    page.evaluate("window.notReloaded = true")
    newest = complete(daemon, "Once upon a time, one more robot")
    wait_for_count(page, "#latest tr.record", 4)
    assert page.evaluate("window.notReloaded") is True
    newest_id = get_json(daemon, "/logs?limit=1")["data"][0]["id"]
    assert rows.first.get_attribute("data-id") == newest_id
    assert newest["choices"][0]["text"] is not None

    screenshot = tmp_path / "dashboard.png"
    page.screenshot(path=str(screenshot), full_page=True)
    if target := os.environ.get("EDGE_AGENT_SCREENSHOT"):
        shutil.copyfile(screenshot, target)

    # On a phone-sized screen nothing is wider than the screen.
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert problems == []


def test_the_page_says_when_the_model_is_not_served(
    start_daemon: Callable[..., Daemon], browser: Any, tmp_path: Path
) -> None:
    # A manifest whose digest the weights do not match: the box never becomes ready.
    gguf = load_manifest("smollm2-135m-instruct").gguf
    assert gguf is not None and gguf.package is not None
    manifest = tmp_path / "wrong.toml"
    manifest.write_text(
        f'name = "wrong"\n[gguf]\npackage = "{gguf.package}"\nfile = "{gguf.file}"\n'
        f'sha256 = "{"0" * 64}"\n'
    )
    daemon = start_daemon("--model", str(manifest), ready=False)
    wait_serving(daemon)
    page = browser.new_page()
    page.goto(daemon.url + "/dashboard")
    page.wait_for_function(
        "document.getElementById('state').textContent === 'error'", timeout=60_000
    )
    banner = page.locator("#banner")
    assert banner.is_visible()
    assert "model failed" in banner.inner_text() and "sha256" in banner.inner_text()
