"""The chart series read from the store's rollups: right counts, right percentiles, durable."""

from __future__ import annotations

import math
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from logbook_helpers import append_all, make_record

from edge_agent.logbook import DB_FILENAME, LogStore
from edge_agent.logbook.rollup import HOUR_MS, MINUTE_MS, QUARTER_MS, RELATIVE_ERROR

NOW = int(time.time() * 1000)


def timed(when: int, ttft: float | None, tps: float | None, **extra: Any) -> dict[str, Any]:
    metrics = {
        "ttft": ttft,
        "tps": tps,
        "prompt_tokens": 5,
        "completion_tokens": 7,
        "elapsed_s": 0.5,
    }
    return make_record(time=when, metrics=metrics, **extra)


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


@pytest.fixture
def store(tmp_path: Path) -> Any:
    opened = LogStore(tmp_path / DB_FILENAME, sync="normal")
    yield opened
    opened.close()


async def test_percentiles_per_bucket_are_within_the_stated_error(store: LogStore) -> None:
    rng = random.Random(7)
    minute = NOW - NOW % MINUTE_MS - 5 * MINUTE_MS
    values: dict[int, list[float]] = {}
    records = []
    for i in range(300):
        when = minute + (i % 3) * MINUTE_MS + rng.randrange(MINUTE_MS)
        ttft = rng.lognormvariate(math.log(0.05), 0.6)
        values.setdefault(when - when % MINUTE_MS, []).append(ttft)
        records.append(timed(when, ttft, 40 + rng.random() * 60))
    await append_all(store, records)

    series = await store.series(now_ms=NOW, window_ms=HOUR_MS, step_ms=MINUTE_MS)

    assert [p.time for p in series.ttft] == sorted(values)
    for point in series.ttft:
        exact = values[point.time]
        assert point.count == len(exact)
        for q, got in ((0.5, point.p50), (0.95, point.p95)):
            assert got == pytest.approx(nearest_rank(exact, q), rel=RELATIVE_ERROR + 1e-9)


async def test_requests_are_counted_by_status_and_endpoint(store: LogStore) -> None:
    when = NOW - 30_000
    await append_all(
        store,
        [
            timed(when, 0.1, 50.0),
            timed(when, 0.1, 50.0, endpoint="chat/completions"),
            timed(when, None, None, status="error", error="boom"),
            timed(when, 0.2, 20.0, status="cancelled"),
        ],
    )
    series = await store.series(now_ms=NOW, window_ms=15 * MINUTE_MS, step_ms=MINUTE_MS)
    [point] = series.requests
    assert point.total == 4
    assert point.by_status == {"ok": 2, "error": 1, "cancelled": 1}
    assert point.by_endpoint == {"completions": 3, "chat/completions": 1}
    assert (point.prompt_tokens, point.completion_tokens) == (20, 28)
    # A request that made no token has no ttft: it is a request, not a ttft sample.
    assert [p.count for p in series.ttft] == [3]


async def test_a_wider_step_merges_buckets_and_the_window_excludes_older_ones(
    store: LogStore,
) -> None:
    hour = NOW - NOW % HOUR_MS
    await append_all(
        store,
        [
            timed(hour - 1 * HOUR_MS + 60_000, 0.1, 10.0),
            timed(hour - 1 * HOUR_MS + 120_000, 0.3, 30.0),
            timed(hour - 30 * HOUR_MS, 0.2, 20.0),  # outside a 24 h window
        ],
    )
    day = await store.series(now_ms=NOW, window_ms=24 * HOUR_MS, step_ms=HOUR_MS)
    assert [(p.time, p.count) for p in day.tps] == [(hour - HOUR_MS, 2)]
    assert day.start <= hour - 23 * HOUR_MS and day.end > NOW
    week = await store.series(now_ms=NOW, window_ms=7 * 24 * HOUR_MS, step_ms=HOUR_MS)
    assert sum(p.count for p in week.tps) == 3


async def test_steps_the_rollups_cannot_give_are_refused(store: LogStore) -> None:
    with pytest.raises(ValueError, match="step"):
        await store.series(now_ms=NOW, window_ms=HOUR_MS, step_ms=30_000)
    # Minute buckets are kept for two days only: beyond, steps are whole quarter hours.
    with pytest.raises(ValueError, match="step"):
        await store.series(now_ms=NOW, window_ms=3 * 24 * HOUR_MS, step_ms=5 * MINUTE_MS)
    week = await store.series(now_ms=NOW, window_ms=7 * 24 * HOUR_MS, step_ms=15 * MINUTE_MS)
    assert week.step_ms == 15 * MINUTE_MS


async def test_series_survive_a_restart(tmp_path: Path) -> None:
    first = LogStore(tmp_path / DB_FILENAME, sync="normal")
    await append_all(first, [timed(NOW - 1000, 0.1, 50.0) for _ in range(5)])
    first.close()
    second = LogStore(tmp_path / DB_FILENAME, sync="normal")
    try:
        series = await second.series(now_ms=NOW, window_ms=HOUR_MS, step_ms=MINUTE_MS)
        assert [p.count for p in series.ttft] == [5]
    finally:
        second.close()


async def test_a_log_from_before_the_rollups_is_counted_when_opened(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    first = LogStore(path, sync="normal")
    await append_all(first, [timed(NOW - 1000, 0.1, 50.0) for _ in range(4)])
    first.close()
    # What an older version left: records, no rollup tables, schema version 0.
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "DROP TABLE rollup_requests; DROP TABLE rollup_latency; PRAGMA user_version = 0;"
        )
    second = LogStore(path, sync="normal")
    try:
        series = await second.series(now_ms=NOW, window_ms=HOUR_MS, step_ms=MINUTE_MS)
        assert [p.count for p in series.ttft] == [4]
        assert [p.total for p in series.requests] == [4]
    finally:
        second.close()


async def test_the_charts_keep_history_the_storage_cap_dropped(tmp_path: Path) -> None:
    store = LogStore(tmp_path / DB_FILENAME, max_bytes=256 * 1024, sync="normal")
    try:
        await append_all(store, [timed(NOW - 1000, 0.1, 50.0, n=i) for i in range(400)])
        assert store.stats().dropped_total > 0
        series = await store.series(now_ms=NOW, window_ms=HOUR_MS, step_ms=MINUTE_MS)
        assert sum(p.total for p in series.requests) == 400
    finally:
        store.close()


async def test_old_buckets_age_out_by_their_retention(store: LogStore) -> None:
    # A record three days old (a box whose clock or uplink was off): its minute rows go
    # with the first commit of the minute, its quarter-hour and hour rows (kept eight
    # days) stay.
    await append_all(store, [timed(NOW - 3 * 24 * HOUR_MS, 0.1, 50.0), timed(NOW, 0.1, 50.0)])
    week = 7 * 24 * HOUR_MS
    with sqlite3.connect(store.path) as conn:
        spans = conn.execute(
            "SELECT DISTINCT span FROM rollup_latency WHERE start < ?", (NOW - 2 * 24 * HOUR_MS,)
        ).fetchall()
    assert sorted(spans) == [(QUARTER_MS,), (HOUR_MS,)]
    series = await store.series(now_ms=NOW, window_ms=week, step_ms=HOUR_MS)
    assert sum(p.count for p in series.ttft) == 2


async def test_reads_by_time_range_page_down_with_before(store: LogStore) -> None:
    records = [timed(NOW - 10_000 + i * 1000, 0.1, 50.0, n=i) for i in range(10)]
    await append_all(store, records, group=1)
    in_range, has_more = await store.read(limit=3, start_ms=NOW - 8000, end_ms=NOW - 2000)
    assert [r["in"]["n"] for r in in_range] == [7, 6, 5] and has_more
    rest, has_more = await store.read(
        limit=10, start_ms=NOW - 8000, end_ms=NOW - 2000, before=in_range[-1]["id"]
    )
    assert [r["in"]["n"] for r in rest] == [4, 3, 2] and not has_more
