"""Reference collector: receives upload batches, dedupes on record id, writes daily JSON lines.

``edge-agent collect --listen HOST:PORT --out DIR`` accepts ``POST`` on any path with a
gzip'd (or plain) JSON-lines body as the uploader sends it, and writes each new record
to ``DIR/<box>/<YYYY-MM-DD>.jsonl`` (UTC day of the record's ``time``). Seen ids live in
``DIR/seen.db`` so a restarted collector still drops a batch it already stored.

Order of work per batch: the new lines are appended and fsynced first, the ids are
committed after. A crash between the two can only make the next retry write a line
twice (at-least-once), never lose one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
import os
import re
import sqlite3
import zlib
from pathlib import Path
from typing import Any, Final

import structlog
from aiohttp import web

log = structlog.get_logger("edge_agent.logbook.collector")

SEEN_DB: Final = "seen.db"
_BOX_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_MAX_BODY: Final = 64 * 1024 * 1024


class BadBatch(Exception):
    """The batch can never be stored as sent (the uploader parks it on the 400)."""


class CollectorSink:
    """The collector's storage: seen ids in SQLite, records in per-box daily files."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        # Used from worker threads, one at a time (the app holds a lock around it).
        self._conn = sqlite3.connect(
            out_dir / SEEN_DB, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(
            """
            CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, box TEXT NOT NULL) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, box TEXT NOT NULL,
                                                dropped INTEGER NOT NULL) WITHOUT ROWID;
            """
        )

    def ingest(self, box: str, batch_id: str, dropped: int, lines: list[bytes]) -> dict[str, Any]:
        """Store the new records of one batch; returns counts for the response."""
        parsed = [_parse_line(line) for line in lines if line.strip()]
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            fresh: list[tuple[str, str, bytes]] = []
            batch_ids: set[str] = set()
            for record_id, day, line in parsed:
                if record_id in batch_ids:
                    continue
                batch_ids.add(record_id)
                if conn.execute("SELECT 1 FROM seen WHERE id = ?", (record_id,)).fetchone():
                    continue
                fresh.append((record_id, day, line))
            self._write(box, fresh)
            conn.executemany(
                "INSERT OR IGNORE INTO seen (id, box) VALUES (?, ?)",
                [(record_id, box) for record_id, _, _ in fresh],
            )
            # A retried batch (same id) must not count its drops twice.
            if batch_id:
                conn.execute(
                    "INSERT OR IGNORE INTO batches (id, box, dropped) VALUES (?, ?, ?)",
                    (batch_id, box, dropped),
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return {
            "box": box,
            "batch_id": batch_id,
            "records": len(parsed),
            "accepted": len(fresh),
            "duplicates": len(parsed) - len(fresh),
            "dropped_total": self.dropped_total(box),
        }

    def dropped_total(self, box: str) -> int:
        """Records the box reported as dropped by its storage cap, over all batches."""
        row = self._conn.execute(
            "SELECT coalesce(sum(dropped), 0) FROM batches WHERE box = ?", (box,)
        ).fetchone()
        return int(row[0])

    def close(self) -> None:
        self._conn.close()

    def _write(self, box: str, fresh: list[tuple[str, str, bytes]]) -> None:
        if not fresh:
            return
        box_dir = self.out_dir / box
        created = not box_dir.exists()
        box_dir.mkdir(exist_ok=True)
        by_day: dict[str, list[bytes]] = {}
        for _, day, line in fresh:
            by_day.setdefault(day, []).append(line)
        for day, day_lines in by_day.items():
            path = box_dir / f"{day}.jsonl"
            new_file = not path.exists()
            with path.open("ab") as handle:
                handle.write(b"".join(line + b"\n" for line in day_lines))
                handle.flush()
                os.fsync(handle.fileno())
            if new_file:
                _fsync_dir(box_dir)
        if created:
            _fsync_dir(self.out_dir)


def _parse_line(line: bytes) -> tuple[str, str, bytes]:
    line = line.strip()
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise BadBatch(f"a line is not JSON: {exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get("id"), str) or not record["id"]:
        raise BadBatch("every line must be a JSON object with a string id")
    when = record.get("time")
    if isinstance(when, int) and not isinstance(when, bool):
        day = dt.datetime.fromtimestamp(when / 1000, dt.UTC).date().isoformat()
    else:
        day = dt.datetime.now(dt.UTC).date().isoformat()
    return record["id"], day, line


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _decode_body(raw: bytes) -> bytes:
    # aiohttp may already have undone Content-Encoding; sniff the gzip magic either way.
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise BadBatch(f"body is not valid gzip: {exc}") from None
    return raw


SINK_KEY: Final = web.AppKey("logbook_sink", CollectorSink)
_LOCK_KEY: Final = web.AppKey("logbook_lock", asyncio.Lock)


async def _ingest(request: web.Request) -> web.Response:
    box = request.headers.get("X-Edge-Box", "unknown")
    if not _BOX_RE.match(box):
        return web.json_response({"error": f"bad X-Edge-Box: {box!r}"}, status=400)
    batch_id = request.headers.get("X-Edge-Batch-Id", "")
    try:
        dropped = max(0, int(request.headers.get("X-Edge-Dropped", "0")))
    except ValueError:
        return web.json_response({"error": "X-Edge-Dropped must be an integer"}, status=400)
    sink = request.app[SINK_KEY]
    try:
        body = _decode_body(await request.read())
        async with request.app[_LOCK_KEY]:
            result = await asyncio.to_thread(sink.ingest, box, batch_id, dropped, body.split(b"\n"))
    except BadBatch as exc:
        log.warning("collector.bad_batch", box=box, batch_id=batch_id, error=str(exc))
        return web.json_response({"error": str(exc)}, status=400)
    log.info("collector.batch", **result, dropped=dropped)
    return web.json_response(result)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_collector_app(
    out_dir: str | os.PathLike[str], *, client_max_size: int = DEFAULT_MAX_BODY
) -> web.Application:
    """The collector as an aiohttp app (POST batches to any path; GET /healthz)."""
    app = web.Application(client_max_size=client_max_size)
    app[SINK_KEY] = CollectorSink(Path(out_dir))
    app[_LOCK_KEY] = asyncio.Lock()

    async def _close(app: web.Application) -> None:
        app[SINK_KEY].close()

    app.on_cleanup.append(_close)
    app.router.add_get("/healthz", _healthz)
    app.router.add_post("/{tail:.*}", _ingest)
    return app


def run_collector(host: str, port: int, out_dir: str | os.PathLike[str]) -> None:
    """Serve the collector until interrupted."""
    log.info("collector.start", listen=f"{host}:{port}", out=str(out_dir))
    web.run_app(create_collector_app(out_dir), host=host, port=port, print=None)
