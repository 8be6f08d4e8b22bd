"""LogStore: durable on return, ordered reads, group commit, corruption, cap, disk full."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import structlog
from logbook_helpers import append_all, make_record
from prometheus_client import CollectorRegistry

from edge_agent.config import LogSettings
from edge_agent.logbook import DB_FILENAME, LogbookCollector, LogStore, new_record_id

REPO = Path(__file__).resolve().parents[2]


def test_record_ids_are_uuidv7_and_strictly_increasing() -> None:
    ids = [new_record_id() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    parsed = uuid.UUID(ids[0])
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122


async def test_appended_records_are_found_after_reopen(tmp_path: Path) -> None:
    records = [make_record(n) for n in range(50)]
    first = LogStore.from_settings(tmp_path, LogSettings())
    await append_all(first, records)
    first.close()

    second = LogStore.from_settings(tmp_path, LogSettings())
    try:
        found, has_more = await second.read(limit=1000)
        assert [r["id"] for r in found] == [r["id"] for r in reversed(records)]
        assert found[0] == records[-1]  # the record comes back exactly as appended
        assert has_more is False
        assert second.stats().records == 50
        assert second.stats().pending == 50
    finally:
        second.close()


@pytest.mark.parametrize("sync", ["full", "normal"])
def test_record_survives_kill_9_right_after_append_returns(tmp_path: Path, sync: str) -> None:
    # Both settings promise this; only "full" also promises it across a power loss.
    script = textwrap.dedent(
        f"""
        import asyncio, json, sys, time
        from prometheus_client import CollectorRegistry
        from edge_agent.logbook import LogStore, new_record_id

        async def main():
            store = LogStore({str(tmp_path / DB_FILENAME)!r}, sync={sync!r})
            ids = [new_record_id() for _ in range(30)]
            await asyncio.gather(*(store.append({{"id": i, "time": 1, "status": "ok"}})
                                   for i in ids))
            print(json.dumps(ids), flush=True)
            time.sleep(60)  # killed here, store never closed

        asyncio.run(main())
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=REPO, text=True
    )
    try:
        assert proc.stdout is not None
        ids = json.loads(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    reopened = LogStore(tmp_path / DB_FILENAME)
    try:
        assert reopened.stats().records == 30
    finally:
        reopened.close()
    import asyncio

    async def read_back() -> list[str]:
        store = LogStore(tmp_path / DB_FILENAME)
        try:
            found, _ = await store.read(limit=100)
            return [r["id"] for r in found]
        finally:
            store.close()

    assert sorted(asyncio.run(read_back())) == sorted(ids)


async def test_read_is_newest_first_with_exclusive_since_and_has_more(store: LogStore) -> None:
    records = [make_record(n) for n in range(10)]
    await append_all(store, records)
    ids = [r["id"] for r in records]

    page, has_more = await store.read(limit=3)
    assert [r["id"] for r in page] == ids[::-1][:3]
    assert has_more is True

    newer, has_more = await store.read(limit=100, since=ids[6])
    assert [r["id"] for r in newer] == [ids[9], ids[8], ids[7]]
    assert has_more is False

    _, has_more = await store.read(limit=2, since=ids[6])
    assert has_more is True

    with pytest.raises(ValueError):
        await store.read(limit=0)


async def test_read_limit_is_capped_at_1000(store: LogStore) -> None:
    await append_all(store, [make_record(n, size=10) for n in range(1005)], group=200)
    page, has_more = await store.read(limit=5000)
    assert len(page) == 1000
    assert has_more is True


async def test_concurrent_appends_share_commits(store: LogStore) -> None:
    await append_all(store, [make_record(n) for n in range(400)], group=400)
    stats = store.stats()
    assert stats.appended_total == 400
    # Every caller waited for a commit, yet far fewer than one fsync'd commit each.
    assert stats.commits < 200


async def test_an_id_appended_twice_is_stored_once(store: LogStore) -> None:
    record = make_record()
    await store.append(record)
    await store.append(record)
    found, _ = await store.read()
    assert [r["id"] for r in found] == [record["id"]]


async def test_record_without_id_gets_one(store: LogStore) -> None:
    await store.append({"status": "ok", "path": Path("/x")})  # a non-JSON value too
    found, _ = await store.read()
    assert uuid.UUID(found[0]["id"]).version == 7
    assert found[0]["path"] == "/x"


async def test_corrupt_database_is_moved_aside_and_a_fresh_one_works(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    garbage = b"this is not a database, it was damaged by a bad sd card\n" * 200
    path.write_bytes(garbage)

    with structlog.testing.capture_logs() as logs:
        store = LogStore(path)
    try:
        events = [e for e in logs if e["event"] == "logbook.corrupt_database_moved_aside"]
        assert len(events) == 1
        aside = _moved_aside(tmp_path)
        assert list(aside.values()) == [garbage]
        assert events[0]["moved_to"] == next(iter(aside))

        record = make_record()
        await store.append(record)
        found, _ = await store.read()
        assert [r["id"] for r in found] == [record["id"]]
        assert store.stats().append_failures == 0
    finally:
        store.close()


def _moved_aside(directory: Path) -> dict[str, bytes]:
    return {
        str(p): p.read_bytes()
        for p in directory.iterdir()
        if p.name.startswith(f"{DB_FILENAME}.corrupt-") and not p.name.endswith("-wal")
    }


async def test_cap_drops_oldest_first_counts_them_and_bounds_the_file(tmp_path: Path) -> None:
    cap = 256 * 1024
    group = 20
    # A ~2 KiB record takes at most one 4 KiB page: a group is at most this much on disk.
    group_disk_bytes = group * 4096
    registry = CollectorRegistry()
    path = tmp_path / DB_FILENAME
    store = LogStore(path, max_bytes=cap)
    registry.register(LogbookCollector(store))
    records = [make_record(n, size=2000) for n in range(600)]
    try:
        for start in range(0, len(records), group):
            await append_all(store, records[start : start + group], group=group)
            assert path.stat().st_size <= cap + group_disk_bytes
            # The WAL holds at most the transaction in flight on top.
            assert store.disk_bytes() <= cap + 2 * group_disk_bytes

        kept, _ = await store.read(limit=1000)
        kept_ids = [r["id"] for r in reversed(kept)]
        all_ids = [r["id"] for r in records]
        assert 0 < len(kept_ids) < len(all_ids)
        assert kept_ids == all_ids[-len(kept_ids) :]  # the newest survive, oldest went first

        dropped = len(all_ids) - len(kept_ids)
        stats = store.stats()
        assert stats.dropped_total == dropped
        assert stats.dropped_unreported == dropped
        assert registry.get_sample_value("edge_agent_logbook_dropped_records_total") == dropped
        assert registry.get_sample_value("edge_agent_logbook_records") == len(kept_ids)
    finally:
        store.close()

    # The count is persisted: a restart still knows what was lost and still has to report it.
    reopened = LogStore(path, max_bytes=cap)
    try:
        assert reopened.stats().dropped_total == dropped
        assert reopened.stats().dropped_unreported == dropped
    finally:
        reopened.close()


def test_disk_full_append_does_not_raise_and_is_counted(tmp_path: Path) -> None:
    # RLIMIT_FSIZE makes writes past the limit fail with EFBIG, like a full disk would.
    script = textwrap.dedent(
        f"""
        import asyncio, json, resource, signal
        from prometheus_client import CollectorRegistry
        from edge_agent.logbook import LogStore

        async def main():
            store = LogStore({str(tmp_path / DB_FILENAME)!r})
            await store.append({{"id": "before", "time": 1}})
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (128 * 1024, hard))
            raised = None
            try:
                for n in range(100):
                    await store.append({{"id": f"big-{{n:03d}}", "time": 2, "in": "x" * 4000}})
            except BaseException as exc:
                raised = repr(exc)
            failed = store.stats().append_failures
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            await store.append({{"id": "after", "time": 3}})
            found, _ = await store.read(limit=1000)
            store.close()
            print(json.dumps({{"raised": raised, "failed": failed,
                              "failed_end": store.stats().append_failures,
                              "ids": [r["id"] for r in found]}}))

        asyncio.run(main())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, cwd=REPO, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["raised"] is None
    assert report["failed"] > 0
    assert "append_failed" in result.stdout + result.stderr  # logged, once per interval
    ids = report["ids"]
    assert "before" in ids
    # Writes work again once space is back; only the failed appends were lost.
    assert "after" in ids
    assert report["failed_end"] == report["failed"]
    assert len([i for i in ids if i.startswith("big-")]) == 100 - report["failed"]


async def test_append_after_close_is_counted_not_raised(tmp_path: Path) -> None:
    store = LogStore(tmp_path / DB_FILENAME)
    store.close()
    await store.append(make_record())
    assert store.stats().append_failures == 1


def test_a_store_registers_no_metrics_of_its_own(tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    a = LogStore(tmp_path / "a" / DB_FILENAME)
    b = LogStore(tmp_path / "b" / DB_FILENAME)
    try:
        assert REGISTRY.get_sample_value("edge_agent_logbook_records") is None
    finally:
        a.close()
        b.close()
    assert os.path.exists(tmp_path / "a" / DB_FILENAME)


def test_two_collectors_read_their_own_stores(tmp_path: Path) -> None:
    a = LogStore(tmp_path / "a" / DB_FILENAME)
    b = LogStore(tmp_path / "b" / DB_FILENAME, max_bytes=1234567)
    first, second = CollectorRegistry(), CollectorRegistry()
    try:
        first.register(LogbookCollector(a))
        second.register(LogbookCollector(b))
        assert first.get_sample_value("edge_agent_logbook_max_bytes") == a.max_bytes
        assert second.get_sample_value("edge_agent_logbook_max_bytes") == 1234567
        assert first.get_sample_value("edge_agent_logbook_uploaded_records_total") == 0
    finally:
        a.close()
        b.close()


async def test_parked_records_can_be_requeued(store: LogStore) -> None:
    await append_all(store, [make_record(n) for n in range(6)])
    batch = await store.pending_batch(max_records=4, max_bytes=1 << 20)
    assert await store.park([r.seq for r in batch.records], "b-1") == 4
    assert (store.stats().pending, store.stats().parked_records) == (2, 4)
    assert store.stats().parked_batches == 1

    assert await store.requeue_parked() == 4
    assert (store.stats().pending, store.stats().parked_records) == (6, 0)
    again = await store.pending_batch(max_records=10, max_bytes=1 << 20)
    assert [r.seq for r in again.records][:4] == [r.seq for r in batch.records]


async def test_the_backlog_age_starts_with_the_first_pending_record(tmp_path: Path) -> None:
    store = LogStore.from_settings(tmp_path, LogSettings())
    try:
        first, second = make_record(0), make_record(1, time=make_record()["time"] + 5)
        await append_all(store, [first])
        await append_all(store, [second])
        assert store.stats().oldest_pending_ms == first["time"]
    finally:
        store.close()
