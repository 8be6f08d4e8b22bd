"""The reference collector over real HTTP, and the `logs` / `collect` commands."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import aiohttp
import pytest
from logbook_helpers import BOX, append_all, collected, free_port, make_record, serve

from edge_agent.logbook import LogStore
from edge_agent.logbook.cli import add_logbook_commands, parse_listen
from edge_agent.logbook.collector import SINK_KEY, create_collector_app


def ndjson_gz(records: list[dict[str, object]]) -> bytes:
    return gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in records))


async def post(port: int, body: bytes, **headers: str) -> tuple[int, dict[str, object]]:
    base = {"Content-Encoding": "gzip", "Content-Type": "application/x-ndjson", "X-Edge-Box": BOX}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/v1/logs", data=body, headers={**base, **headers}
        ) as resp,
    ):
        return resp.status, await resp.json()


def jsonl_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.jsonl"))


async def test_collector_dedupes_across_a_restart(tmp_path: Path) -> None:
    records = [make_record(n) for n in range(5)]
    body = ndjson_gz(records)
    port = free_port()

    runner = await serve(create_collector_app(tmp_path), port)
    status, first = await post(port, body, **{"X-Edge-Batch-Id": "b1", "X-Edge-Dropped": "3"})
    await runner.cleanup()
    assert status == 200
    assert first["accepted"] == 5

    app = create_collector_app(tmp_path)
    runner = await serve(app, port)
    try:
        status, again = await post(port, body, **{"X-Edge-Batch-Id": "b1", "X-Edge-Dropped": "3"})
        assert status == 200
        assert (again["accepted"], again["duplicates"]) == (0, 5)
        assert app[SINK_KEY].dropped_total(BOX) == 3  # the retried batch's drops count once
    finally:
        await runner.cleanup()
    assert [r["id"] for r in collected(tmp_path)] == [r["id"] for r in records]


async def test_collector_writes_one_file_per_box_and_utc_day(tmp_path: Path) -> None:
    day1 = make_record(0, time=1_700_000_000_000)  # 2023-11-14 UTC
    day2 = make_record(1, time=1_700_100_000_000)  # 2023-11-16 UTC
    other = make_record(2, time=1_700_000_000_000)
    port = free_port()
    runner = await serve(create_collector_app(tmp_path), port)
    try:
        assert (await post(port, ndjson_gz([day1, day2, day1])))[0] == 200
        assert (await post(port, ndjson_gz([other]), **{"X-Edge-Box": "box-2"}))[0] == 200
    finally:
        await runner.cleanup()
    assert jsonl_files(tmp_path) == [
        f"{BOX}/2023-11-14.jsonl",
        f"{BOX}/2023-11-16.jsonl",
        "box-2/2023-11-14.jsonl",
    ]
    assert [r["id"] for r in collected(tmp_path)] == [day1["id"], day2["id"]]


async def test_collector_rejects_lines_without_an_id(tmp_path: Path) -> None:
    port = free_port()
    runner = await serve(create_collector_app(tmp_path), port)
    try:
        status, answer = await post(port, ndjson_gz([{"no": "id"}]))
        assert status == 400
        assert "id" in str(answer["error"])
        status, _ = await post(port, gzip.compress(b"{not json\n"))
        assert status == 400
        status, _ = await post(port, ndjson_gz([make_record()]), **{"X-Edge-Box": "../etc"})
        assert status == 400
    finally:
        await runner.cleanup()
    assert jsonl_files(tmp_path) == []


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="edge-agent")
    add_logbook_commands(root.add_subparsers(dest="command", required=True))
    return root


async def test_logs_command_prints_newest_first_json_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = LogStore(tmp_path / "logbook.db")
    records = [make_record(n) for n in range(5)]
    await append_all(store, records)
    try:
        # Read while the store is open, as against a running daemon.
        args = parser().parse_args(["logs", "--state-dir", str(tmp_path), "--limit", "3"])
        assert args.func(args) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [json.loads(line)["id"] for line in lines] == [r["id"] for r in records[::-1][:3]]

        since = records[2]["id"]
        args = parser().parse_args(["logs", "--state-dir", str(tmp_path), "--since", since])
        assert args.func(args) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [json.loads(line)["id"] for line in lines] == [records[4]["id"], records[3]["id"]]
    finally:
        await store.aclose()


def test_logs_command_fails_clearly_without_a_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parser().parse_args(["logs", "--state-dir", str(tmp_path)])
    assert args.func(args) == 1
    assert "no inference log" in capsys.readouterr().err
    assert not (tmp_path / "logbook.db").exists()  # reading never creates a store


def test_collect_command_parses_listen_and_out() -> None:
    args = parser().parse_args(["collect", "--listen", "127.0.0.1:9000", "--out", "/tmp/x"])
    assert args.out == Path("/tmp/x")
    assert callable(args.func)
    assert parse_listen(args.listen) == ("127.0.0.1", 9000)
    assert parse_listen("[::1]:8090") == ("::1", 8090)
    with pytest.raises(ValueError):
        parse_listen("nohost")
