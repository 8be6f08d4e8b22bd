"""The local inference log: one SQLite file, written by one thread, durable on return.

Durability: WAL with ``synchronous=FULL`` fsyncs the WAL on every commit, so a record
is on disk when :meth:`LogStore.append` returns and a ``kill -9`` (or power loss on
honest hardware) loses nothing that was acknowledged.

Throughput: all SQLite work runs on one dedicated writer thread fed by a queue.
Appends that queue up while a commit (and its fsync) is in progress are committed
together in the next transaction (group commit), so N concurrent requests pay about
one fsync between them while each still waits for its own commit.

The one way an acknowledged-looking append can lose its record is a failed write
(disk full, I/O error): ``append`` never raises into the request path, it counts the
failure (``edge_agent_logbook_append_failures_total``), logs it and returns.

Record states: ``pending`` (not yet delivered), ``parked`` (the collector rejected its
batch for good; kept for a human), ``uploaded`` (delivered, kept for ``GET /logs``
until the storage cap needs the room).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import queue
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import structlog

from edge_agent.logbook import rollup

if TYPE_CHECKING:
    from edge_agent.config import LogSettings

log = structlog.get_logger("edge_agent.logbook")

DB_FILENAME: Final = "logbook.db"
MAX_READ_LIMIT: Final = 1000
DEFAULT_MAX_BYTES: Final = 1024**3

PENDING: Final = 0
PARKED: Final = 1
UPLOADED: Final = 2

# SQLite result codes (low byte) that mean "this file is damaged", not "try again".
_CORRUPTION_CODES: Final = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
# A failure log line at most this often while writes keep failing (disk full floods).
_FAILURE_LOG_INTERVAL_S: Final = 10.0

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS records (
    seq   INTEGER PRIMARY KEY AUTOINCREMENT,
    id    TEXT    NOT NULL UNIQUE,
    time  INTEGER NOT NULL,
    state INTEGER NOT NULL DEFAULT 0,
    batch TEXT,
    size  INTEGER NOT NULL,
    body  TEXT    NOT NULL
);
-- Covering index: backlog scans, per-state counts and cap accounting never touch bodies.
CREATE INDEX IF NOT EXISTS records_state ON records (state, seq, size);
-- Reads by time range (GET /logs?start=&end=).
CREATE INDEX IF NOT EXISTS records_time ON records (time);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

T = TypeVar("T")


# --------------------------------------------------------------------------- record ids

_id_lock = threading.Lock()
_id_last_ms = 0
_id_counter = 0


def new_record_id() -> str:
    """A UUIDv7 string: 48-bit Unix milliseconds first, so ids sort by creation time.

    Within one millisecond the 12-bit ``rand_a`` field is a counter started at a random
    point below half its range (RFC 9562, method 1), so ids from one process are
    strictly increasing even when many are made in the same millisecond.
    """
    global _id_last_ms, _id_counter
    with _id_lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms > _id_last_ms:
            _id_last_ms = now_ms
            _id_counter = secrets.randbits(11)
        else:
            # Same millisecond, or the clock stepped back: keep counting on the last one.
            _id_counter += 1
            if _id_counter > 0xFFF:
                _id_last_ms += 1
                _id_counter = secrets.randbits(11)
        ms, counter = _id_last_ms, _id_counter
    value = (
        (ms & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76
        | counter << 64
        | 0b10 << 62
        | secrets.randbits(62)
    )
    return str(uuid.UUID(int=value))


# --------------------------------------------------------------------------- data types


@dataclass(frozen=True, slots=True)
class LogbookStats:
    """A snapshot of the store, cheap to take (no SQLite access): what metrics read."""

    records: int = 0
    pending: int = 0
    parked_records: int = 0
    parked_batches: int = 0
    record_bytes: int = 0
    appended_total: int = 0
    # Append transactions; appended_total / commits is the group-commit factor.
    commits: int = 0
    append_failures: int = 0
    # Records the storage cap deleted before they were delivered; persisted.
    dropped_total: int = 0
    # The part of dropped_total no collector has acknowledged yet; persisted.
    dropped_unreported: int = 0
    oldest_pending_ms: int | None = None
    max_bytes: int = 0
    disk_bytes: int = 0


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One record as the uploader ships it: the exact JSON text that was stored."""

    seq: int
    id: str
    time: int
    body: str


@dataclass(frozen=True, slots=True)
class PendingBatch:
    """The oldest pending records, up to a count and a byte budget."""

    records: list[StoredRecord]
    # True when the count or byte budget was reached (send now, do not wait for age).
    full: bool


@dataclass(slots=True)
class _Row:
    id: str
    time: int
    body: str
    size: int
    sample: rollup.Sample


@dataclass(slots=True)
class _Job:
    # Exactly one of row / call is set.
    row: _Row | None
    call: Callable[[sqlite3.Connection], Any] | None
    future: concurrent.futures.Future[Any]


_STOP: Final = object()


class LogStoreError(Exception):
    """The store cannot be opened at all (not corruption: that is handled by starting fresh)."""


# --------------------------------------------------------------------------- the store


class LogStore:
    """Durable, capped inference log in ``<state_dir>/logbook.db``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_group: int = 1024,
        sync: Literal["full", "normal"] = "full",
    ) -> None:
        """Open (or create) the store; a damaged file is moved aside and a fresh one started."""
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._sync = sync
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LogStoreError(f"cannot create directory {self.path.parent}: {exc}") from exc
        self._max_group = max_group
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._stats = LogbookStats(max_bytes=max_bytes)
        self._closed = False
        self._close_lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._failures_unlogged = 0
        self._last_failure_log = 0.0
        self._page_size = 4096
        self._data_budget = max_bytes
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        self._conn: sqlite3.Connection | None = None
        # Chart queries read on a connection of their own: they never hold up the writer.
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        self._pruned_minute = 0
        self._thread = threading.Thread(
            target=self._run, name=f"logbook-writer:{self.path.name}", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._open_error is not None:
            self._thread.join()
            raise LogStoreError(
                f"cannot open the inference log at {self.path}: {self._open_error}"
            ) from self._open_error

    @classmethod
    def from_settings(
        cls,
        state_dir: str | os.PathLike[str],
        settings: LogSettings,
    ) -> LogStore:
        """The daemon's store: ``<state_dir>/logbook.db`` capped at ``settings.max_bytes``."""
        return cls(
            Path(state_dir) / DB_FILENAME,
            max_bytes=settings.max_bytes,
            sync=settings.sync,
        )

    # ------------------------------------------------------------------ public API

    async def append(self, record: Mapping[str, Any]) -> None:
        """Store one record; returns once it is committed and fsynced. Never raises.

        A record without an ``id`` gets one from :func:`new_record_id`.
        """
        try:
            row = _make_row(record)
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            if self._closed:
                raise LogStoreError("the inference log is closed")
            self._queue.put(_Job(row=row, call=None, future=future))
        except Exception as exc:  # a bad record or a closed store must not fail a request
            self._note_failure(1, exc)
            return
        # The writer resolves this future only after COMMIT (or counts a failure); a
        # cancelled caller does not cancel the write, the record still lands.
        await asyncio.shield(asyncio.wrap_future(future))
        for listener in self._listeners:
            listener()

    async def read(
        self,
        limit: int = 100,
        since: str | None = None,
        *,
        before: str | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """Newest first, records with ``id > since`` (exclusive), at most ``limit`` (<= 1000).

        ``before`` bounds the ids from above (exclusive: the next page down), ``start_ms``
        and ``end_ms`` the records' ``time`` (``start <= time < end``).
        Returns ``(records, has_more)``; ``has_more`` says more such records exist.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        limit = min(limit, MAX_READ_LIMIT)
        return await self._call(
            lambda conn: read_records(
                conn, limit, since, before=before, start_ms=start_ms, end_ms=end_ms
            )
        )

    async def series(self, *, now_ms: int, window_ms: int, step_ms: int) -> rollup.Series:
        """ttft, tps and request counts per ``step_ms`` bucket over the last ``window_ms``.

        Raises ``ValueError`` for a step the rollups cannot give (see :func:`rollup.span_for`).
        """
        rollup.span_for(window_ms, step_ms)
        if self._closed:
            raise LogStoreError("the inference log is closed")
        return await asyncio.to_thread(
            self._read,
            lambda conn: rollup.read_series(
                conn, now_ms=now_ms, window_ms=window_ms, step_ms=step_ms
            ),
        )

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._reader_lock:
            if self._reader is None:
                self._reader = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False
                )
                self._reader.execute("PRAGMA query_only=1")
                self._reader.execute("PRAGMA busy_timeout=5000")
            # One read transaction: the series' two queries see the same commit.
            self._reader.execute("BEGIN")
            try:
                return fn(self._reader)
            finally:
                self._reader.execute("COMMIT")

    def stats(self) -> LogbookStats:
        """A snapshot for metrics; includes the bytes on disk right now."""
        return replace(self._stats, disk_bytes=self.disk_bytes())

    def disk_bytes(self) -> int:
        """Database plus WAL file sizes."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except OSError:
                pass
        return total

    def add_append_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the appender's event loop) after each committed append."""
        self._listeners.append(callback)

    def remove_append_listener(self, callback: Callable[[], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    async def pending_batch(self, max_records: int, max_bytes: int) -> PendingBatch:
        """The oldest pending records (by append order) within a count and byte budget."""
        return await self._call(lambda conn: _pending_batch(conn, max_records, max_bytes))

    async def mark_uploaded(self, seqs: Sequence[int], dropped_reported: int = 0) -> None:
        """A collector answered 2xx: these records and ``dropped_reported`` drops are delivered."""
        await self._call(lambda conn: self._mark_uploaded(conn, seqs, dropped_reported))

    async def park(self, seqs: Sequence[int], batch_id: str) -> int:
        """A collector rejected this batch for good: keep its records, stop sending them."""
        return await self._call(lambda conn: self._park(conn, seqs, batch_id))

    async def requeue_parked(self) -> int:
        """Put every parked record back in the upload queue (after the collector is fixed)."""
        return await self._call(self._requeue_parked)

    def close(self) -> None:
        """Commit what is queued, then close the database. Safe to call twice."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    async def aclose(self) -> None:
        """:meth:`close` without blocking the event loop while the queue drains."""
        await asyncio.to_thread(self.close)

    # ------------------------------------------------------------------ writer thread

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise LogStoreError("the inference log is closed")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put(_Job(row=None, call=fn, future=future))
        return await asyncio.wrap_future(future)

    def _run(self) -> None:
        try:
            self._conn = self._open_or_replace()
        except BaseException as exc:
            self._open_error = exc
            self._ready.set()
            return
        self._ready.set()
        stopping = False
        while not stopping:
            jobs: list[_Job] = []
            item = self._queue.get()
            while True:
                if item is _STOP:
                    stopping = True
                    break
                assert isinstance(item, _Job)
                jobs.append(item)
                if len(jobs) >= self._max_group:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._process_safely(jobs)
        # Jobs queued after the stop marker (a racing append) still get committed.
        leftovers: list[_Job] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Job):
                leftovers.append(item)
        self._process_safely(leftovers)
        try:
            self._conn.close()
        except sqlite3.Error:
            pass

    def _process_safely(self, jobs: list[_Job]) -> None:
        """Never let the writer thread die: a dead writer would hang every request."""
        try:
            self._process(jobs)
        except Exception as exc:
            log.exception("logbook.writer_error", error=str(exc))
            if self._conn is not None:
                _rollback(self._conn)
            for job in jobs:
                future = job.future
                if future.done():
                    continue
                if future.running() or future.set_running_or_notify_cancel():
                    if job.row is not None:
                        self._note_failure(1, exc)
                        future.set_result(None)
                    else:
                        future.set_exception(exc)

    def _process(self, jobs: list[_Job]) -> None:
        """Run jobs in arrival order; consecutive appends share one transaction."""
        group: list[_Job] = []
        for job in jobs:
            if job.row is not None:
                group.append(job)
                continue
            if group:
                self._commit_appends(group)
                group = []
            self._run_call(job)
        if group:
            self._commit_appends(group)

    def _run_call(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        assert job.call is not None and self._conn is not None
        try:
            result = job.call(self._conn)
        except BaseException as exc:
            _rollback(self._conn)
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)

    def _commit_appends(self, group: list[_Job]) -> None:
        conn = self._conn
        assert conn is not None
        rows = [job.row for job in group if job.row is not None]
        try:
            conn.execute("BEGIN IMMEDIATE")
            incoming = sum(row.size for row in rows)
            held = self._stats.record_bytes
            evicted = self._evict(conn, incoming, held)
            inserted: list[_Row] = []
            for row in rows:
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO records (id, time, state, size, body)"
                    " VALUES (?, ?, 0, ?, ?)",
                    (row.id, row.time, row.size, row.body),
                )
                if cursor.rowcount == 1:  # an id appended twice is stored once
                    inserted.append(row)
            rollup.add(conn, [row.sample for row in inserted])
            self._prune_rollup(conn)
            # The estimate above can be short (page overhead): settle the cap exactly.
            held += sum(row.size for row in inserted) - evicted.bytes
            evicted = _merge_evictions(evicted, self._evict(conn, 0, held))
            if evicted.dropped:
                _bump_meta(conn, "dropped_total", evicted.dropped)
                _bump_meta(conn, "dropped_unreported", evicted.dropped)
            conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            _rollback(conn)
            self._note_failure(len(rows), exc)
        else:
            self._apply_append(conn, inserted, evicted)
        for job in group:
            if job.future.set_running_or_notify_cancel():
                job.future.set_result(None)

    def _prune_rollup(self, conn: sqlite3.Connection) -> None:
        # Once a minute at most: the rollup's oldest buckets age out by the clock.
        minute = time.time_ns() // 1_000_000 // rollup.MINUTE_MS
        if minute != self._pruned_minute:
            self._pruned_minute = minute
            rollup.prune(conn, minute * rollup.MINUTE_MS)

    # ------------------------------------------------------------------ cap

    def _used_bytes(self, conn: sqlite3.Connection) -> int:
        """Bytes of the database file that hold data (its pages minus free pages)."""
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages - free) * self._page_size

    def _evict(self, conn: sqlite3.Connection, incoming: int, logical: int) -> _Evicted:
        """Delete oldest records until used pages plus ``incoming`` fit under the cap.

        Measured in real pages, not record sizes, so index and page overhead count too.
        ``logical`` (record bytes now in the table) gives the pages-per-record-byte ratio
        that turns the page excess into how many record bytes to delete; deleting a
        prefix frees pages only as they empty, hence the loop.
        """
        evicted = _Evicted()
        while True:
            used = self._used_bytes(conn)
            held = max(1, logical - evicted.bytes)
            # Pages per record byte (records smaller than a page can leave half of it empty).
            ratio = min(4.0, max(1.0, used / held)) if logical > evicted.bytes else 1.0
            excess = used + int(incoming * ratio) - self._data_budget
            if excess <= 0:
                return evicted
            want = int(excess / ratio) + self._page_size
            freed = 0
            last_seq: int | None = None
            # Materialised (fetchall): no statement may stay open across the DELETE.
            oldest = conn.execute(
                "SELECT seq, size, state FROM records ORDER BY seq LIMIT 512"
            ).fetchall()
            for seq, size, state in oldest:
                last_seq = seq
                freed += size
                evicted.count += 1
                evicted.bytes += size
                evicted.by_state[state] = evicted.by_state.get(state, 0) + 1
                if freed >= want:
                    break
            if last_seq is None:
                return evicted  # nothing left to delete; the cap is below the schema's size
            conn.execute("DELETE FROM records WHERE seq <= ?", (last_seq,))

    # ------------------------------------------------------------------ uploader calls

    def _mark_uploaded(
        self, conn: sqlite3.Connection, seqs: Sequence[int], dropped_reported: int
    ) -> None:
        conn.execute("BEGIN IMMEDIATE")
        changed = _update_states(conn, seqs, "state = 2", "state = 0")
        if dropped_reported:
            conn.execute(
                "UPDATE meta SET value = max(0, value - ?) WHERE key = 'dropped_unreported'",
                (dropped_reported,),
            )
        conn.execute("COMMIT")
        unreported = max(0, self._stats.dropped_unreported - dropped_reported)
        self._stats = replace(
            self._stats,
            pending=self._stats.pending - changed,
            dropped_unreported=unreported,
            oldest_pending_ms=_oldest_pending(conn),
        )

    def _park(self, conn: sqlite3.Connection, seqs: Sequence[int], batch_id: str) -> int:
        conn.execute("BEGIN IMMEDIATE")
        changed = 0
        for chunk in _chunks(seqs, 500):
            marks = ",".join("?" * len(chunk))
            cursor = conn.execute(
                f"UPDATE records SET state = 1, batch = ? WHERE state = 0 AND seq IN ({marks})",
                (batch_id, *chunk),
            )
            changed += cursor.rowcount
        conn.execute("COMMIT")
        self._stats = replace(
            self._stats,
            pending=self._stats.pending - changed,
            parked_records=self._stats.parked_records + changed,
            parked_batches=self._stats.parked_batches + (1 if changed else 0),
            oldest_pending_ms=_oldest_pending(conn),
        )
        return changed

    def _requeue_parked(self, conn: sqlite3.Connection) -> int:
        conn.execute("BEGIN IMMEDIATE")
        changed = conn.execute(
            "UPDATE records SET state = 0, batch = NULL WHERE state = 1"
        ).rowcount
        conn.execute("COMMIT")
        self._stats = replace(
            self._stats,
            pending=self._stats.pending + changed,
            parked_records=0,
            parked_batches=0,
            oldest_pending_ms=_oldest_pending(conn),
        )
        return changed

    # ------------------------------------------------------------------ bookkeeping

    def _apply_append(
        self, conn: sqlite3.Connection, inserted: list[_Row], evicted: _Evicted
    ) -> None:
        s = self._stats
        evicted_pending = evicted.by_state.get(PENDING, 0)
        evicted_parked = evicted.by_state.get(PARKED, 0)
        oldest = s.oldest_pending_ms
        if evicted_pending or evicted_parked:
            oldest = _oldest_pending(conn)
            parked_batches = _parked_batches(conn)
        else:
            parked_batches = s.parked_batches
            if oldest is None and inserted:
                oldest = inserted[0].time
        self._stats = replace(
            s,
            records=s.records + len(inserted) - evicted.count,
            pending=s.pending + len(inserted) - evicted_pending,
            parked_records=s.parked_records - evicted_parked,
            parked_batches=parked_batches,
            record_bytes=s.record_bytes + sum(r.size for r in inserted) - evicted.bytes,
            appended_total=s.appended_total + len(inserted),
            commits=s.commits + 1,
            dropped_total=s.dropped_total + evicted.dropped,
            dropped_unreported=s.dropped_unreported + evicted.dropped,
            oldest_pending_ms=oldest,
        )
        if evicted.dropped:
            log.warning(
                "logbook.cap_dropped_records",
                dropped=evicted.dropped,
                dropped_total=self._stats.dropped_total,
                max_bytes=self.max_bytes,
            )

    def _note_failure(self, count: int, exc: BaseException) -> None:
        """Count a lost append; log it, at most once per interval while failures persist."""
        self._stats = replace(self._stats, append_failures=self._stats.append_failures + count)
        self._failures_unlogged += count
        now = time.monotonic()
        if self._last_failure_log and now - self._last_failure_log < _FAILURE_LOG_INTERVAL_S:
            return
        log.error(
            "logbook.append_failed",
            error=f"{type(exc).__name__}: {exc}",
            lost_records=self._failures_unlogged,
            append_failures_total=self._stats.append_failures,
            path=str(self.path),
            hint="records are being lost: check free disk space on the state directory",
        )
        self._failures_unlogged = 0
        self._last_failure_log = now

    # ------------------------------------------------------------------ open

    def _open_or_replace(self) -> sqlite3.Connection:
        try:
            return self._open()
        except sqlite3.DatabaseError as exc:
            if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) not in _CORRUPTION_CODES:
                raise
            moved_to = _move_aside(self.path)
            log.error(
                "logbook.corrupt_database_moved_aside",
                path=str(self.path),
                moved_to=str(moved_to),
                error=str(exc),
                action="started a fresh inference log; the old file is kept for inspection",
            )
            return self._open()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LogStoreError(f"cannot switch {self.path} to WAL mode (got {mode})")
            # FULL fsyncs the WAL at each commit; NORMAL leaves committed pages to the OS,
            # which a kill -9 of this process cannot lose (logs.sync in the settings).
            conn.execute(f"PRAGMA synchronous={self._sync.upper()}")
            # Another process (the `logs` command) may read while we write.
            conn.execute("PRAGMA busy_timeout=5000")
            self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
            # Keep the WAL small relative to the cap: checkpoint often, truncate after.
            wal_pages = max(16, min(1000, self.max_bytes // self._page_size // 32))
            conn.execute(f"PRAGMA wal_autocheckpoint={wal_pages}")
            conn.execute(f"PRAGMA journal_size_limit={wal_pages * self._page_size}")
            # The cap covers the WAL too: the database gets what the resting WAL leaves.
            self._data_budget = max(
                self.max_bytes - wal_pages * self._page_size, self.max_bytes // 2
            )
            conn.executescript(_SCHEMA)
            started = time.monotonic()
            counted = rollup.migrate(conn)
            if counted:
                log.info(
                    "logbook.rollup_built",
                    records=counted,
                    seconds=round(time.monotonic() - started, 2),
                )
            for key in ("dropped_total", "dropped_unreported"):
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, 0)", (key,))
            self._stats = self._load_stats(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _load_stats(self, conn: sqlite3.Connection) -> LogbookStats:
        counts: dict[int, tuple[int, int]] = {}
        for state, count, size in conn.execute(
            "SELECT state, count(*), coalesce(sum(size), 0) FROM records GROUP BY state"
        ):
            counts[int(state)] = (int(count), int(size))
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        return LogbookStats(
            records=sum(c for c, _ in counts.values()),
            pending=counts.get(PENDING, (0, 0))[0],
            parked_records=counts.get(PARKED, (0, 0))[0],
            parked_batches=_parked_batches(conn),
            record_bytes=sum(s for _, s in counts.values()),
            dropped_total=int(meta.get("dropped_total", 0)),
            dropped_unreported=int(meta.get("dropped_unreported", 0)),
            oldest_pending_ms=_oldest_pending(conn),
            max_bytes=self.max_bytes,
        )


# --------------------------------------------------------------------------- helpers


@dataclass(slots=True)
class _Evicted:
    count: int = 0
    bytes: int = 0
    by_state: dict[int, int] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        """Evicted records that no collector had acknowledged: those are lost."""
        return self.count - self.by_state.get(UPLOADED, 0)


def _merge_evictions(a: _Evicted, b: _Evicted) -> _Evicted:
    states = dict(a.by_state)
    for state, count in b.by_state.items():
        states[state] = states.get(state, 0) + count
    return _Evicted(count=a.count + b.count, bytes=a.bytes + b.bytes, by_state=states)


def _make_row(record: Mapping[str, Any]) -> _Row:
    record_id = record.get("id")
    if not isinstance(record_id, str) or not record_id:
        record = {"id": new_record_id(), **record}
        record_id = record["id"]
    when = record.get("time")
    if not isinstance(when, int) or isinstance(when, bool):
        when = time.time_ns() // 1_000_000
    # default=str: a stray non-JSON value (a Path, a datetime) must not cost the record.
    body = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
    sample = rollup.sample_of(record, when)
    return _Row(id=record_id, time=when, body=body, size=len(body.encode()), sample=sample)


def read_records(
    conn: sqlite3.Connection,
    limit: int,
    since: str | None,
    *,
    before: str | None = None,
    start_ms: int | None = None,
    end_ms: int | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    """The ``GET /logs`` query, shared by the store and the read-only ``logs`` command."""
    bounds = [
        (clause, value)
        for clause, value in (
            ("id > ?", since),
            ("id < ?", before),
            ("time >= ?", start_ms),
            ("time < ?", end_ms),
        )
        if value is not None
    ]
    where = " AND ".join(clause for clause, _ in bounds) or "1"
    cursor = conn.execute(
        f"SELECT body FROM records WHERE {where} ORDER BY id DESC LIMIT ?",
        (*(value for _, value in bounds), limit + 1),
    )
    bodies = [row[0] for row in cursor.fetchall()]
    return [json.loads(body) for body in bodies[:limit]], len(bodies) > limit


def _pending_batch(conn: sqlite3.Connection, max_records: int, max_bytes: int) -> PendingBatch:
    records: list[StoredRecord] = []
    total = 0
    full = False
    rows = conn.execute(
        "SELECT seq, id, time, size, body FROM records WHERE state = 0 ORDER BY seq LIMIT ?",
        (max_records,),
    ).fetchall()
    for seq, record_id, when, size, body in rows:
        if records and total + size > max_bytes:
            full = True
            break
        records.append(StoredRecord(seq=seq, id=record_id, time=when, body=body))
        total += size
    return PendingBatch(records=records, full=full or len(records) >= max_records)


def _update_states(
    conn: sqlite3.Connection, seqs: Sequence[int], assignment: str, condition: str
) -> int:
    changed = 0
    for chunk in _chunks(seqs, 500):
        marks = ",".join("?" * len(chunk))
        changed += conn.execute(
            f"UPDATE records SET {assignment} WHERE {condition} AND seq IN ({marks})", chunk
        ).rowcount
    return changed


def _chunks(items: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _oldest_pending(conn: sqlite3.Connection) -> int | None:
    row = conn.execute("SELECT time FROM records WHERE state = 0 ORDER BY seq LIMIT 1").fetchone()
    return None if row is None else int(row[0])


def _parked_batches(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT count(DISTINCT batch) FROM records WHERE state = 1").fetchone()
    return int(row[0])


def _bump_meta(conn: sqlite3.Connection, key: str, amount: int) -> None:
    conn.execute("UPDATE meta SET value = value + ? WHERE key = ?", (amount, key))


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the transaction is already gone (SQLite rolls back on some I/O errors)


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    path.rename(target)
    # The WAL belongs to the damaged file; the shared-memory index is rebuilt on open.
    wal = Path(f"{path}-wal")
    if wal.exists():
        wal.rename(Path(f"{target}-wal"))
    shm = Path(f"{path}-shm")
    if shm.exists():
        shm.unlink()
    return target
