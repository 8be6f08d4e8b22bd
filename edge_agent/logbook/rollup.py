"""Per-minute, quarter-hour and hour rollups of the inference log, and the series read from them.

Why rollups: the charts ask for the median and p95 of ttft and tps per time bucket over
up to seven days. Scanning a million records for that costs about half a second even
through a covering index; the rollup holds at most one row per (bucket, value bin), so a
7-day series reads a few thousand rows whatever the traffic was.

Percentiles come from log-scale histograms (bin ``round(log(x) / log(GAMMA))``, the value
of a bin ``GAMMA ** bin``): mergeable across buckets, and within ``RELATIVE_ERROR`` of the
true value. A series reads the coarsest rollup its step allows (``span_for``): the rows
read grow with the buckets drawn, not with the requests made. The rollup lives in the
store's own file and transaction, so it is exactly as durable as the records, and it is
kept for its own retention (``RETENTION_MS``), not subject to the records' storage cap:
the charts still cover days whose records the cap has already dropped.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

MINUTE_MS: Final = 60_000
QUARTER_MS: Final = 900_000
HOUR_MS: Final = 3_600_000
# Bucket width: how long its buckets are kept. Minutes serve windows up to 48 h (and
# the bucket the window's start falls in); the coarser ones a week and a day more.
RETENTION_MS: Final = {MINUTE_MS: 49 * HOUR_MS, QUARTER_MS: 8 * 86_400_000, HOUR_MS: 8 * 86_400_000}
SPANS: Final = tuple(RETENTION_MS)
MINUTE_WINDOW_MS: Final = 48 * HOUR_MS

GAMMA: Final = 1.04
RELATIVE_ERROR: Final = math.sqrt(GAMMA) - 1  # a bin spans GAMMA**(b -/+ 0.5)
_LOG_GAMMA: Final = math.log(GAMMA)
# Values at or below this (a ttft of zero) share the lowest bin instead of log(0).
_FLOOR: Final = 1e-6

TTFT: Final = 0
TPS: Final = 1
SCHEMA_VERSION: Final = 1

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS rollup_requests (
    span              INTEGER NOT NULL,  -- bucket width, ms: a minute or an hour
    start             INTEGER NOT NULL,  -- bucket start, epoch ms
    endpoint          TEXT    NOT NULL,
    status            TEXT    NOT NULL,
    n                 INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (span, start, endpoint, status)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollup_latency (
    span   INTEGER NOT NULL,
    start  INTEGER NOT NULL,
    metric INTEGER NOT NULL,  -- 0 ttft, 1 tps
    bin    INTEGER NOT NULL,
    n      INTEGER NOT NULL,
    PRIMARY KEY (span, start, metric, bin)
) WITHOUT ROWID;
"""

_ADD_REQUESTS: Final = (
    "INSERT INTO rollup_requests VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT DO UPDATE SET n = n + excluded.n,"
    " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
    " completion_tokens = completion_tokens + excluded.completion_tokens"
)
_ADD_LATENCY: Final = (
    "INSERT INTO rollup_latency VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET n = n + excluded.n"
)


def value_bin(value: float) -> int:
    """The histogram bin of a positive value."""
    return round(math.log(max(value, _FLOOR)) / _LOG_GAMMA)


def bin_value(index: int) -> float:
    """The value a bin stands for (its geometric centre)."""
    return GAMMA**index


@dataclass(frozen=True, slots=True)
class Sample:
    """What the rollup keeps of one record."""

    time: int
    endpoint: str
    status: str
    ttft: float | None
    tps: float | None
    prompt_tokens: int
    completion_tokens: int


def sample_of(record: Mapping[str, Any], when: int) -> Sample:
    """The rollup's view of a record; fields a foreign record lacks count as unknown or none."""
    metrics = record.get("metrics")
    m: Mapping[str, Any] = metrics if isinstance(metrics, Mapping) else {}
    return Sample(
        time=when,
        endpoint=str(record.get("endpoint") or "unknown"),
        status=str(record.get("status") or "unknown"),
        ttft=_number(m.get("ttft")),
        tps=_number(m.get("tps")),
        prompt_tokens=_count(m.get("prompt_tokens")),
        completion_tokens=_count(m.get("completion_tokens")),
    )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def add(conn: sqlite3.Connection, samples: Iterable[Sample]) -> None:
    """Count samples into both spans; runs inside the caller's transaction."""
    requests: dict[tuple[int, int, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    latency: dict[tuple[int, int, int, int], int] = defaultdict(int)
    for s in samples:
        for span in SPANS:
            start = s.time - s.time % span
            totals = requests[(span, start, s.endpoint, s.status)]
            totals[0] += 1
            totals[1] += s.prompt_tokens
            totals[2] += s.completion_tokens
            for metric, value in ((TTFT, s.ttft), (TPS, s.tps)):
                if value is not None:
                    latency[(span, start, metric, value_bin(value))] += 1
    conn.executemany(_ADD_REQUESTS, [(*key, *totals) for key, totals in requests.items()])
    conn.executemany(_ADD_LATENCY, [(*key, n) for key, n in latency.items()])


def prune(conn: sqlite3.Connection, now_ms: int) -> None:
    """Drop buckets past their retention; runs inside the caller's transaction."""
    for table in ("rollup_requests", "rollup_latency"):
        for span, keep in RETENTION_MS.items():
            conn.execute(f"DELETE FROM {table} WHERE span = ? AND start < ?", (span, now_ms - keep))


def migrate(conn: sqlite3.Connection) -> int:
    """Create the rollup tables; a log from before them is counted in once. Returns records read."""
    conn.executescript(SCHEMA)
    if conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        batch: list[Sample] = []
        # SQLite pulls the fields out (one parse per body), so Python never reads whole bodies.
        cursor = conn.execute(
            "SELECT time, json_extract(body, '$.endpoint', '$.status', '$.metrics')"
            " FROM records WHERE json_valid(body) ORDER BY seq"
        )
        for when, fields in cursor.fetchall():
            endpoint, status, metrics = json.loads(fields)
            record = {"endpoint": endpoint, "status": status, "metrics": metrics}
            batch.append(sample_of(record, int(when)))
        add(conn, batch)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return len(batch)


# --------------------------------------------------------------------------- reading


@dataclass(slots=True)
class LatencyPoint:
    """One bucket of a ttft or tps series."""

    time: int
    count: int
    p50: float
    p95: float


@dataclass(slots=True)
class RequestPoint:
    """One bucket of the request series: counts by status and endpoint, tokens."""

    time: int
    total: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    by_endpoint: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class Series:
    """What ``GET /stats`` draws: only buckets that hold requests are listed."""

    start: int
    end: int
    step_ms: int
    ttft: list[LatencyPoint]
    tps: list[LatencyPoint]
    requests: list[RequestPoint]


def span_for(window_ms: int, step_ms: int) -> int:
    """The rollup a series reads: the coarsest one that fits the step and still holds the window."""
    for span in sorted(SPANS, reverse=True):
        if step_ms % span == 0 and window_ms + step_ms <= RETENTION_MS[span]:
            return span
    raise ValueError(
        "step: a whole number of minutes, and of quarter hours for windows over "
        f"{MINUTE_WINDOW_MS // HOUR_MS} h"
    )


def read_series(conn: sqlite3.Connection, *, now_ms: int, window_ms: int, step_ms: int) -> Series:
    """Buckets of ``step_ms`` aligned to the epoch, covering the last ``window_ms``."""
    span = span_for(window_ms, step_ms)
    start = (now_ms - window_ms) - (now_ms - window_ms) % step_ms
    end = now_ms - now_ms % step_ms + step_ms
    window = (span, start, end)

    histograms: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    # Buckets as wide as the rollup's are its rows, in key order: nothing to merge or sort.
    latency = (
        "SELECT start, metric, bin, n FROM rollup_latency"
        " WHERE span = ?2 AND start >= ?3 AND start < ?4 ORDER BY span, start, metric, bin"
        if step_ms == span
        else "SELECT start - start % ?1, metric, bin, sum(n) FROM rollup_latency"
        " WHERE span = ?2 AND start >= ?3 AND start < ?4 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    )
    for bucket, metric, index, n in conn.execute(latency, (step_ms, *window)):
        histograms[(int(bucket), int(metric))].append((int(index), int(n)))
    series: dict[int, list[LatencyPoint]] = {TTFT: [], TPS: []}
    for (bucket, metric), bins in histograms.items():
        count = sum(n for _, n in bins)
        series[metric].append(
            LatencyPoint(
                bucket, count, _percentile(bins, count, 0.5), _percentile(bins, count, 0.95)
            )
        )

    points: dict[int, RequestPoint] = {}
    for bucket, endpoint, status, n, prompt, completion in conn.execute(
        "SELECT start - start % ?1, endpoint, status, sum(n), sum(prompt_tokens),"
        " sum(completion_tokens) FROM rollup_requests"
        " WHERE span = ?2 AND start >= ?3 AND start < ?4 GROUP BY 1, 2, 3 ORDER BY 1",
        (step_ms, *window),
    ):
        point = points.setdefault(int(bucket), RequestPoint(int(bucket)))
        point.total += n
        point.by_status[status] = point.by_status.get(status, 0) + n
        point.by_endpoint[endpoint] = point.by_endpoint.get(endpoint, 0) + n
        point.prompt_tokens += prompt
        point.completion_tokens += completion
    return Series(
        start=start,
        end=end,
        step_ms=step_ms,
        ttft=sorted(series[TTFT], key=lambda p: p.time),
        tps=sorted(series[TPS], key=lambda p: p.time),
        requests=list(points.values()),
    )


def _percentile(bins: list[tuple[int, int]], count: int, q: float) -> float:
    """Nearest-rank percentile over (bin, n) pairs sorted by bin."""
    rank = max(1, math.ceil(q * count))
    seen = 0
    for index, n in bins:
        seen += n
        if seen >= rank:
            return round(bin_value(index), 6)
    return round(bin_value(bins[-1][0]), 6)
