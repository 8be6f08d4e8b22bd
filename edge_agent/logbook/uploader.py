"""Ships the local inference log to the collector in gzip'd JSON-lines batches, at least once.

Delivery rules (per batch, oldest pending records first):

- 2xx: the records are marked uploaded (only now), the dropped count it carried is settled.
- 5xx, 408, 429, network errors and timeouts: retried with capped exponential backoff
  and full jitter; a ``Retry-After`` (seconds or HTTP date) is honoured instead, even
  beyond ``max_backoff_s`` (up to an hour, against absurd values).
- 401, 403, 404, 405, 407: the collector's address or credentials are wrong, not the
  batch; parking would quietly set aside every record until someone noticed, so these
  retry too (at the capped backoff) and log an error each time.
- 413: the batch is split in halves, down to single records; a single record the
  collector still refuses is parked.
- any other 4xx: the batch is parked (kept on disk, a loud error, a metric) and newer
  batches go on.

All state lives in the store's SQLite file, so a restart resumes where it stopped;
all database work goes through the store's writer thread, never the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import enum
import gzip
import hashlib
import random
import time
from dataclasses import dataclass, replace
from datetime import UTC
from typing import TYPE_CHECKING, Final

import aiohttp
import structlog

from edge_agent.logbook.store import StoredRecord

if TYPE_CHECKING:
    from edge_agent.config import UploadSettings
    from edge_agent.logbook.store import LogStore

log = structlog.get_logger("edge_agent.logbook.uploader")

_RETRY_STATUSES: Final = frozenset({408, 429})
# Wrong URL or credentials: a fault of the setup, not of this batch.
_SETUP_STATUSES: Final = frozenset({401, 403, 404, 405, 407})
DEFAULT_MAX_BATCH_BYTES: Final = 8 * 1024 * 1024
_MAX_RETRY_AFTER_S: Final = 3600.0
# After a 413 shrank batches, this many successes in a row before trying twice the size.
_GROW_AFTER_SUCCESSES: Final = 8


class _Outcome(enum.Enum):
    DELIVERED = "delivered"
    PARKED = "parked"
    RETRY = "retry"


@dataclass(frozen=True, slots=True)
class UploadStats:
    """Uploader counters since this process started (backlog figures live in the store)."""

    successes: int = 0
    failures: int = 0
    uploaded_records: int = 0
    parked_batches: int = 0
    last_success_unix: float | None = None
    last_error: str | None = None


class Uploader:
    """Background task that drains the store's backlog to ``settings.url``."""

    def __init__(
        self,
        store: LogStore,
        settings: UploadSettings,
        box_name: str,
        *,
        base_backoff_s: float = 0.5,
        request_timeout_s: float = 30.0,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        stop_timeout_s: float = 5.0,
    ) -> None:
        """``max_batch_bytes`` bounds one request's uncompressed size (beyond the settings)."""
        self._store = store
        self._settings = settings
        self._box = box_name
        self._base_backoff = base_backoff_s
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._max_batch_bytes = max_batch_bytes
        self._stop_timeout = stop_timeout_s
        # Shrinks after a 413 so the next batches fit; grows back after successes.
        self._batch_limit = settings.batch_records
        self._successes_at_limit = 0
        self._stats = UploadStats()
        self._attempt = 0
        self._retry_after: float | None = None
        # (seq, monotonic time first seen) of the oldest pending record, for batch age.
        self._head: tuple[int, float] | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()

    def stats(self) -> UploadStats:
        return self._stats

    async def start(self) -> None:
        """Start the background task; without ``upload.url`` records just stay local."""
        if self._task is not None:
            return
        if not self._settings.url:
            log.info("logbook.upload_disabled", reason="no upload.url configured")
            return
        self._stopping.clear()
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        self._store.add_append_listener(self._wake.set)
        self._task = asyncio.create_task(self._run(), name="logbook-uploader")

    async def stop(self) -> None:
        """Let an in-flight request finish (briefly), then stop. Unsent records stay pending."""
        task = self._task
        if task is None:
            return
        self._stopping.set()
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), self._stop_timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._store.remove_append_listener(self._wake.set)
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._task = None

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                outcome = await self._step()
            except Exception as exc:  # a bug or a closed store must not kill uploads for good
                log.exception("logbook.upload_loop_error", error=str(exc))
                outcome = _Outcome.RETRY
            if outcome is _Outcome.RETRY:
                await self._backoff()
            elif outcome is not None:
                self._attempt = 0

    async def _step(self) -> _Outcome | None:
        # Cleared before reading, so an append that lands after the read still wakes us.
        self._wake.clear()
        batch = await self._store.pending_batch(self._batch_limit, self._max_batch_bytes)
        if not batch.records:
            await self._wait(None)
            return None
        if not batch.full and not self._aged(batch.records[0]):
            await self._wait(self._settings.batch_age_s)
            return None  # read again: the batch is full or old enough now
        return await self._deliver(batch.records)

    def _aged(self, head: StoredRecord) -> bool:
        """Has the oldest pending record waited ``batch_age_s``?

        Judged by its own timestamp, and by how long this uploader has watched it, so a
        record stamped by a clock that later stepped back still leaves on time.
        """
        now = time.monotonic()
        if self._head is None or self._head[0] != head.seq:
            self._head = (head.seq, now)
        watched = now - self._head[1]
        age = time.time() - head.time / 1000
        return max(age, watched) >= self._settings.batch_age_s

    async def _wait(self, seconds: float | None) -> None:
        """Sleep ``seconds`` or until stop; with None, until any new append.

        With a time given, appends end the wait early only once a full batch is waiting.
        """
        deadline = None if seconds is None else time.monotonic() + seconds
        while not self._stopping.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return
            self._wake.clear()
            if deadline is None or self._store.stats().pending >= self._batch_limit:
                return

    async def _backoff(self) -> None:
        cap = self._settings.max_backoff_s
        if self._retry_after is not None:
            # The collector's own word beats our backoff cap; only absurd values are bounded.
            delay = min(self._retry_after, _MAX_RETRY_AFTER_S)
        else:
            delay = random.uniform(0, min(cap, self._base_backoff * 2**self._attempt))
        self._retry_after = None
        self._attempt = min(self._attempt + 1, 62)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    # ------------------------------------------------------------------ one batch

    async def _deliver(self, records: list[StoredRecord]) -> _Outcome:
        batch_id = batch_id_for(records)
        dropped = self._store.stats().dropped_unreported
        status, retry_after, detail = await self._post(records, batch_id, dropped)
        if status is not None and 200 <= status < 300:
            await self._store.mark_uploaded([r.seq for r in records], dropped)
            self._stats = replace(
                self._stats,
                successes=self._stats.successes + 1,
                uploaded_records=self._stats.uploaded_records + len(records),
                last_success_unix=time.time(),
            )
            self._successes_at_limit += 1
            if self._successes_at_limit >= _GROW_AFTER_SUCCESSES:
                self._batch_limit = min(self._settings.batch_records, self._batch_limit * 2)
                self._successes_at_limit = 0
            return _Outcome.DELIVERED
        self._stats = replace(
            self._stats, failures=self._stats.failures + 1, last_error=f"{status}: {detail}"
        )
        if status == 413:
            return await self._split(records, batch_id)
        if status is None or status >= 500 or status in _RETRY_STATUSES:
            self._retry_after = retry_after
            log.warning(
                "logbook.upload_retry",
                batch_id=batch_id,
                status=status,
                error=detail,
                attempt=self._attempt + 1,
                retry_after=retry_after,
                records=len(records),
            )
            return _Outcome.RETRY
        if status in _SETUP_STATUSES:
            # Back off at the cap: nothing will change until someone fixes the setup.
            self._attempt = 62
            log.error(
                "logbook.upload_rejected_setup",
                batch_id=batch_id,
                status=status,
                error=detail,
                url=self._settings.url,
                hint="check upload.url and upload.token; records are kept and retried",
            )
            return _Outcome.RETRY
        await self._park(records, batch_id, f"collector answered {status}: {detail}")
        return _Outcome.PARKED

    async def _split(self, records: list[StoredRecord], batch_id: str) -> _Outcome:
        if len(records) == 1:
            await self._park(records, batch_id, "collector refuses this single record as too large")
            return _Outcome.PARKED
        half = len(records) // 2
        self._batch_limit = max(1, min(self._batch_limit, half))
        self._successes_at_limit = 0
        log.info("logbook.upload_split", batch_id=batch_id, records=len(records), into=half)
        for part in (records[:half], records[half:]):
            outcome = await self._deliver(part)
            if outcome is _Outcome.RETRY:
                return outcome
        return _Outcome.DELIVERED

    async def _park(self, records: list[StoredRecord], batch_id: str, reason: str) -> None:
        parked = await self._store.park([r.seq for r in records], batch_id)
        self._stats = replace(self._stats, parked_batches=self._stats.parked_batches + 1)
        log.error(
            "logbook.batch_parked",
            batch_id=batch_id,
            records=parked,
            first_id=records[0].id,
            last_id=records[-1].id,
            reason=reason,
            action="records kept on disk and no longer sent; newer batches continue",
        )

    async def _post(
        self, records: list[StoredRecord], batch_id: str, dropped: int
    ) -> tuple[int | None, float | None, str]:
        """POST one batch: (status or None for a network error, Retry-After seconds, detail)."""
        assert self._session is not None and self._settings.url is not None
        lines = "".join(record.body + "\n" for record in records).encode()
        # Compression of a multi-megabyte batch would stall the event loop.
        body = await asyncio.to_thread(gzip.compress, lines, 6, mtime=0)
        headers = {
            "Content-Type": "application/x-ndjson",
            "Content-Encoding": "gzip",
            "X-Edge-Batch-Id": batch_id,
            "X-Edge-Box": self._box,
            "X-Edge-Dropped": str(dropped),
            "X-Edge-Record-Count": str(len(records)),
        }
        if self._settings.token:
            headers["Authorization"] = f"Bearer {self._settings.token}"
        try:
            async with self._session.post(self._settings.url, data=body, headers=headers) as resp:
                text = "" if resp.status < 300 else (await resp.text(errors="replace"))[:300]
                return resp.status, parse_retry_after(resp.headers.get("Retry-After")), text
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return None, None, f"{type(exc).__name__}: {exc}"


def batch_id_for(records: list[StoredRecord]) -> str:
    """Same records, same id: a retried batch is recognisable, even after a restart."""
    digest = hashlib.blake2b(digest_size=16)
    for record in records:
        digest.update(record.id.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
