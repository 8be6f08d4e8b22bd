"""The box's own page and its JSON: served from the package, small, and what it shows is right."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import pytest

from edge_agent.manifest import ModelManifest
from edge_agent.protocol.dashboard import BoxStatus, StatsSeries

COMPLETIONS = "/infer/openai/v1/completions"
PAGE_FILES = ("/", "/dashboard/app.js", "/dashboard/app.css")
# The SVG namespace is a name, not a place anything is fetched from.
EXTERNAL = re.compile(r"(?:https?:)?//(?!www\.w3\.org/2000/svg)[\w.-]+\.[a-z]{2,}", re.I)


@pytest.fixture
async def idle(make_client: Any) -> Callable[..., Any]:
    """The app with its model never loaded: for what needs no inference (no engine to start)."""

    async def start(**overrides: Any) -> Any:
        return await make_client(wait=False, load_gate=asyncio.Event(), **overrides)

    return start


async def complete(client: Any, prompt: str, **extra: Any) -> dict[str, Any]:
    response = await client.post(COMPLETIONS, json={"prompt": prompt, "max_tokens": 4, **extra})
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def test_the_page_is_served_whole_from_the_package_and_under_300_kb(
    idle: Callable[..., Any],
) -> None:
    client = await idle()
    total = 0
    for path in (*PAGE_FILES, "/dashboard"):
        response = await client.get(path)
        assert response.status == 200, path
        body = await response.text()
        total += len(body.encode()) if path != "/dashboard" else 0
        assert not EXTERNAL.search(body), f"{path} refers to another host"
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert total < 300 * 1024
    page = await (await client.get("/")).text()
    assert page == await (await client.get("/dashboard")).text()
    for path in PAGE_FILES[1:]:
        assert f'"{path}"' in page  # the page loads exactly these files
    types = [(await client.get(p)).content_type for p in PAGE_FILES]
    assert types == ["text/html", "text/javascript", "text/css"]


async def test_an_unchanged_page_is_not_sent_again(idle: Callable[..., Any]) -> None:
    client = await idle()
    first = await client.get("/dashboard/app.js")
    again = await client.get("/dashboard/app.js", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status == 304 and await again.read() == b""


async def test_stats_count_every_request_and_its_outcome(client: Any) -> None:
    answers = [await complete(client, f"count me {n}") for n in range(3)]
    refused = await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": -1})
    assert refused.status == 400

    response = await client.get("/stats", params={"window": "15m"})
    assert response.status == 200
    stats = StatsSeries.model_validate(await response.json())
    assert (stats.window, stats.step) == ("15m", "1m")
    assert sum(p.total for p in stats.requests) == 4
    assert sum(p.by_status.get("error", 0) for p in stats.requests) == 1
    assert sum(p.by_endpoint.get("completions", 0) for p in stats.requests) == 4
    # The refused request made no token: it has no ttft or tps to chart.
    assert sum(p.count for p in stats.ttft) == sum(p.count for p in stats.tps) == 3
    assert all(0 < p.p50 <= p.p95 for p in stats.ttft + stats.tps)
    assert all(stats.start <= p.time < stats.end for p in stats.requests)
    assert sum(p.completion_tokens for p in stats.requests) >= 3

    # One bucket for all: the median and p95 are the answers' own ttft, within the error.
    hourly = await (await client.get("/stats", params={"window": "1h", "step": "1h"})).json()
    [ttft] = hourly["ttft"]
    values = sorted(a["usage"]["ttft"] for a in answers)
    assert abs(ttft["p50"] - values[1]) <= values[1] * hourly["relative_error"] + 1e-6
    assert abs(ttft["p95"] - values[2]) <= values[2] * hourly["relative_error"] + 1e-6


async def test_a_bad_window_or_step_is_a_400_naming_it(idle: Callable[..., Any]) -> None:
    client = await idle()
    for query, param in [
        ({"window": "2w"}, "window"),
        ({"window": "8d"}, "window"),
        ({"window": "30s"}, "window"),  # shorter than the smallest bucket
        ({"window": "1h", "step": "30s"}, "step"),
        ({"window": "3d", "step": "5m"}, "step"),  # minute buckets are kept two days
        ({"window": "1h", "step": "2h"}, "step"),
        ({"window": "7d", "step": "1m"}, "step"),  # past the most points a chart draws
    ]:
        response = await client.get("/stats", params=query)
        assert response.status == 400, query
        body = await response.json()
        assert body["error"]["param"] == param, query


async def test_status_shows_the_model_engine_queue_log_and_uploads(
    client: Any, manifest: ModelManifest
) -> None:
    await complete(client, "status")
    response = await client.get("/status")
    assert response.status == 200
    status = BoxStatus.model_validate(await response.json())
    assert (status.ready, status.state, status.reason) == (True, "ready", "ready")
    assert status.model.name == manifest.name and status.model.sha == manifest.sha256
    assert status.engine.backend == "llamacpp" and status.engine.configuration
    assert status.engine.cpu_features  # at least the SIMD level this build runs with
    assert status.engine.slots == status.queue.slots == 4
    assert status.queue.busy_slots == status.queue.in_flight == status.queue.queued == 0
    assert status.logs.enabled and status.logs.records == 1
    assert status.upload.enabled is False and status.upload.backlog_records == 1
    assert status.upload.backlog_age_s is not None


async def test_status_shows_the_upload_collector_without_its_credentials(
    idle: Callable[..., Any],
) -> None:
    client = await idle(upload={"url": "http://ops:secret@127.0.0.1:9/ingest"})
    upload = (await (await client.get("/status")).json())["upload"]
    assert upload["enabled"] is True and upload["url"] == "http://127.0.0.1:9/ingest"


async def test_status_says_when_the_model_is_still_loading(idle: Callable[..., Any]) -> None:
    client = await idle()
    status = await (await client.get("/status")).json()
    assert (status["ready"], status["state"]) == (False, "loading")
    assert status["reason"] == "model is loading"


async def test_with_a_token_the_page_stays_open_by_default(idle: Callable[..., Any]) -> None:
    client = await idle(auth_token="secret")
    for path in (*PAGE_FILES, "/stats", "/status"):
        assert (await client.get(path)).status == 200, path
    # The records themselves (prompts, answers) stay behind the token.
    assert (await client.get("/logs")).status == 401


async def test_dashboard_access_token_puts_its_data_behind_the_token(
    idle: Callable[..., Any],
) -> None:
    client = await idle(auth_token="secret", dashboard_access="token")
    for path in ("/stats", "/status"):
        refused = await client.get(path)
        assert refused.status == 401
        assert (await refused.json())["error"]["type"] == "authentication_error"
        given = await client.get(path, headers={"Authorization": "Bearer secret"})
        assert given.status == 200
    # The page is code without data: a browser loads it, and it asks for the token.
    for path in PAGE_FILES:
        assert (await client.get(path)).status == 200


async def test_stats_without_the_inference_log_is_a_404(idle: Callable[..., Any]) -> None:
    client = await idle(logs={"enabled": False})
    response = await client.get("/stats")
    assert response.status == 404
    status = await (await client.get("/status")).json()
    assert status["logs"]["enabled"] is False


async def test_logs_read_by_time_range_and_page_down(client: Any) -> None:
    for n in range(3):
        await complete(client, f"page {n}")
    everything = (await (await client.get("/logs")).json())["data"]
    newest, middle, oldest = everything
    page = await (await client.get("/logs", params={"limit": "1", "start": oldest["time"]})).json()
    assert [r["id"] for r in page["data"]] == [newest["id"]] and page["has_more"]
    rest = await client.get("/logs", params={"start": oldest["time"], "before": newest["id"]})
    assert [r["id"] for r in (await rest.json())["data"]] == [middle["id"], oldest["id"]]
    until = await client.get("/logs", params={"end": middle["time"]})
    assert [r["id"] for r in (await until.json())["data"]] == [oldest["id"]]
    for param in ("start", "end"):
        refused = await client.get("/logs", params={param: "yesterday"})
        assert refused.status == 400
        assert (await refused.json())["error"]["param"] == param
