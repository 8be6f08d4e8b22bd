"""Uploader against a real collector on loopback: outages, retries, splits, parking, drops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from logbook_helpers import (
    BOX,
    append_all,
    collected,
    decode_batch,
    free_port,
    make_record,
    serve,
    upload_settings,
    wait_for,
)
from prometheus_client import CollectorRegistry

from edge_agent.logbook import LogbookCollector, LogStore, Uploader
from edge_agent.logbook.collector import SINK_KEY, create_collector_app
from edge_agent.logbook.uploader import parse_retry_after

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def uploader_for(store: LogStore, port: int, **settings: Any) -> Uploader:
    return Uploader(
        store,
        upload_settings(port, **settings),
        BOX,
        base_backoff_s=0.01,
        request_timeout_s=5.0,
        stop_timeout_s=1.0,
    )


async def test_collector_down_then_up_gets_every_record_once_in_id_order(
    store: LogStore, tmp_path: Path
) -> None:
    port = free_port()
    uploader = uploader_for(store, port)
    await uploader.start()
    runner: web.AppRunner | None = None
    try:
        records = [make_record(n) for n in range(200)]
        await append_all(store, records)
        await wait_for(lambda: uploader.stats().failures >= 3)
        assert store.stats().pending == 200  # nothing is marked sent while the collector is down

        out = tmp_path / "collected"
        runner = await serve(create_collector_app(out), port)
        await wait_for(lambda: len(collected(out)) >= 200 and store.stats().pending == 0)
        await asyncio.sleep(0.2)  # any stray resend would land by now

        got = [r["id"] for r in collected(out)]
        assert got == [r["id"] for r in records]  # exactly once, in id order
        assert got == sorted(got)
        assert collected(out)[0] == records[0]
        assert uploader.stats().uploaded_records == 200
    finally:
        await uploader.stop()
        if runner is not None:
            await runner.cleanup()


async def test_answer_lost_after_store_is_resent_and_deduped(
    store: LogStore, tmp_path: Path
) -> None:
    """The collector stored the batch but the box saw a 500: the resend must not duplicate."""
    out = tmp_path / "collected"
    app = create_collector_app(out)
    calls = 0

    @web.middleware
    async def lose_first_answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        response = await handler(request)
        if calls == 1:
            return web.Response(status=500, text="proxy lost the answer")
        return response

    app.middlewares.append(lose_first_answer)
    port = free_port()
    runner = await serve(app, port)
    uploader = uploader_for(store, port)
    try:
        records = [make_record(n) for n in range(30)]
        await append_all(store, records)
        await uploader.start()
        await wait_for(lambda: store.stats().pending == 0)
        assert calls >= 2
        assert [r["id"] for r in collected(out)] == [r["id"] for r in records]
    finally:
        await uploader.stop()
        await runner.cleanup()


async def test_500_429_413_and_a_poisoned_batch_lose_only_the_parked_batch(
    tmp_path: Path,
) -> None:
    registry = CollectorRegistry()
    store = LogStore(tmp_path / "state" / "logbook.db")
    out = tmp_path / "collected"
    app = create_collector_app(out)
    records = [make_record(n) for n in range(100)]
    poison = records[57]["id"]
    seen: list[tuple[float, int, int]] = []  # (time, status, records in the request)

    @web.middleware
    async def misbehave(request: web.Request, handler: Handler) -> web.StreamResponse:
        batch = decode_batch(await request.read())
        status = 200
        response: web.StreamResponse
        if len(seen) == 0:
            status, response = 500, web.Response(status=500, text="boom")
        elif len(seen) == 1:
            status = 429
            response = web.Response(status=429, headers={"Retry-After": "1"}, text="slow down")
        elif len(batch) > 10:
            status, response = 413, web.Response(status=413, text="too large")
        elif any(r["id"] == poison for r in batch):
            status, response = 400, web.Response(status=400, text="schema violation")
        else:
            response = await handler(request)
        seen.append((time.monotonic(), status, len(batch)))
        return response

    app.middlewares.append(misbehave)
    port = free_port()
    runner = await serve(app, port)
    uploader = uploader_for(store, port, batch_records=20)
    registry.register(LogbookCollector(store, uploader))
    try:
        await append_all(store, records)
        await uploader.start()
        await wait_for(lambda: store.stats().pending == 0)
        await asyncio.sleep(0.2)

        statuses = [status for _, status, _ in seen]
        assert statuses[:3] == [500, 429, 413]
        assert seen[2][0] - seen[1][0] >= 0.95  # Retry-After: 1 was honoured
        assert 400 in statuses
        assert all(size <= 10 for _, status, size in seen if status in (200, 400))

        stored = [r["id"] for r in collected(out)]
        parked = await parked_ids(store)
        assert poison in parked
        assert 1 <= len(parked) <= 10
        assert not set(parked) & set(stored)
        assert sorted(stored + parked) == [r["id"] for r in records]  # nothing else lost
        assert len(stored) == len(set(stored))

        assert store.stats().parked_batches == 1
        assert registry.get_sample_value("edge_agent_logbook_parked_batches") == 1
        assert registry.get_sample_value("edge_agent_logbook_parked_records") == len(parked)
        assert registry.get_sample_value("edge_agent_logbook_upload_failures_total") >= 4
        assert registry.get_sample_value("edge_agent_logbook_backlog_records") == 0
    finally:
        await uploader.stop()
        await runner.cleanup()
        await store.aclose()

    # Parked records stay on disk across a restart and are not sent again.
    reopened = LogStore(tmp_path / "state" / "logbook.db")
    try:
        assert reopened.stats().parked_records == len(parked)
        assert reopened.stats().pending == 0
    finally:
        await reopened.aclose()


async def parked_ids(store: LogStore) -> list[str]:
    def query(conn: Any) -> list[str]:
        rows = conn.execute("SELECT id FROM records WHERE state = 1 ORDER BY id").fetchall()
        return [row[0] for row in rows]

    return await store._call(query)


async def test_single_record_too_large_for_the_collector_is_parked(
    store: LogStore, tmp_path: Path
) -> None:
    app = create_collector_app(tmp_path / "collected", client_max_size=4096)
    port = free_port()
    runner = await serve(app, port)
    uploader = uploader_for(store, port)
    try:
        # Random-ish text so gzip cannot shrink it under the collector's body limit.
        big = make_record(0, size=0, blob=[str(i * 7919 % 10007) for i in range(4000)])
        small = make_record(1)
        await store.append(big)
        await store.append(small)
        await uploader.start()
        await wait_for(lambda: store.stats().pending == 0)
        assert [r["id"] for r in collected(tmp_path / "collected")] == [small["id"]]
        assert await parked_ids(store) == [big["id"]]
    finally:
        await uploader.stop()
        await runner.cleanup()


async def test_dropped_count_travels_with_the_next_batch(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    store = LogStore(tmp_path / "logbook.db", max_bytes=128 * 1024)
    out = tmp_path / "collected"
    app = create_collector_app(out)
    headers: list[int] = []

    @web.middleware
    async def record_header(request: web.Request, handler: Handler) -> web.StreamResponse:
        headers.append(int(request.headers["X-Edge-Dropped"]))
        return await handler(request)

    app.middlewares.append(record_header)
    port = free_port()
    runner = await serve(app, port)
    uploader = uploader_for(store, port, batch_records=500)
    registry.register(LogbookCollector(store, uploader))
    try:
        await append_all(store, [make_record(n, size=2000) for n in range(200)])
        dropped = store.stats().dropped_total
        assert dropped > 0
        await uploader.start()
        await wait_for(lambda: store.stats().pending == 0)
        assert headers[0] == dropped
        assert sum(headers) == dropped  # reported once, not again with later batches
        assert app[SINK_KEY].dropped_total(BOX) == dropped
        assert store.stats().dropped_unreported == 0
        assert registry.get_sample_value("edge_agent_logbook_dropped_records_total") == dropped
    finally:
        await uploader.stop()
        await runner.cleanup()
        await store.aclose()


async def test_restart_resumes_from_the_backlog(tmp_path: Path) -> None:
    path = tmp_path / "logbook.db"
    first = LogStore(path)
    records = [make_record(n) for n in range(40)]
    await append_all(first, records)
    await first.aclose()  # the daemon stopped before any upload

    out = tmp_path / "collected"
    port = free_port()
    runner = await serve(create_collector_app(out), port)
    second = LogStore(path)
    uploader = uploader_for(second, port)
    try:
        assert second.stats().pending == 40
        await uploader.start()
        await wait_for(lambda: second.stats().pending == 0)
        assert [r["id"] for r in collected(out)] == [r["id"] for r in records]
    finally:
        await uploader.stop()
        await runner.cleanup()
        await second.aclose()


async def test_small_backlog_waits_for_batch_age_then_goes(store: LogStore, tmp_path: Path) -> None:
    out = tmp_path / "collected"
    port = free_port()
    runner = await serve(create_collector_app(out), port)
    uploader = uploader_for(store, port, batch_records=100, batch_age_s=0.5)
    try:
        await uploader.start()
        started = time.monotonic()
        await store.append(make_record())
        await asyncio.sleep(0.2)
        assert collected(out) == []  # one record is not a batch yet
        await wait_for(lambda: len(collected(out)) == 1)
        assert time.monotonic() - started >= 0.45
    finally:
        await uploader.stop()
        await runner.cleanup()


async def test_bearer_token_and_batch_headers_are_sent(store: LogStore, tmp_path: Path) -> None:
    app = create_collector_app(tmp_path / "collected")
    seen: list[dict[str, str]] = []

    @web.middleware
    async def capture(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append(dict(request.headers))
        return await handler(request)

    app.middlewares.append(capture)
    port = free_port()
    runner = await serve(app, port)
    uploader = Uploader(store, upload_settings(port, token="s3cret"), BOX, base_backoff_s=0.01)
    try:
        await store.append(make_record())
        await uploader.start()
        await wait_for(lambda: store.stats().pending == 0)
        headers = seen[0]
        assert headers["Authorization"] == "Bearer s3cret"
        assert headers["Content-Encoding"] == "gzip"
        assert headers["Content-Type"] == "application/x-ndjson"
        assert headers["X-Edge-Box"] == BOX
        assert len(headers["X-Edge-Batch-Id"]) == 32
    finally:
        await uploader.stop()
        await runner.cleanup()


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = 1_700_000_000.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:30 GMT", now=now) == 10.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:00 GMT", now=now) == 0.0
