"""Helpers for the logbook tests: real SQLite files, real HTTP on loopback."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from edge_agent.config import UploadSettings
from edge_agent.logbook import LogStore, new_record_id

BOX = "box-1"


def make_record(n: int = 0, size: int = 200, **extra: Any) -> dict[str, Any]:
    """A CONTRACT section 6 record with a body of roughly ``size`` bytes."""
    record: dict[str, Any] = {
        "id": new_record_id(),
        "time": int(time.time() * 1000),
        "pipeline": "edge-llm",
        "model": {"name": "tiny", "version": "v1", "sha": "0" * 64},
        "endpoint": "completions",
        "in": {"prompt": "x" * size, "n": n},
        "out": {"json": json.dumps({"choices": [{"text": "ok"}]})},
        "params": {"max_tokens": 8},
        "metrics": {
            "ttft": 0.01,
            "tps": 50.0,
            "prompt_tokens": 3,
            "completion_tokens": 1,
            "elapsed_s": 0.02,
        },
        "status": "ok",
    }
    record.update(extra)
    return record


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def serve(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def wait_for(predicate: Callable[[], bool], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def collected(out_dir: Path, box: str = BOX) -> list[dict[str, Any]]:
    """Every record the collector wrote for ``box``, in file order (days in order)."""
    records: list[dict[str, Any]] = []
    for path in sorted((out_dir / box).glob("*.jsonl")) if (out_dir / box).exists() else []:
        records.extend(json.loads(line) for line in path.read_text().splitlines() if line)
    return records


def decode_batch(raw: bytes) -> list[dict[str, Any]]:
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def upload_settings(port: int, **overrides: Any) -> UploadSettings:
    values: dict[str, Any] = {
        "url": f"http://127.0.0.1:{port}/v1/logs",
        "batch_records": 50,
        "batch_age_s": 0.05,
        "max_backoff_s": 0.2,
    }
    values.update(overrides)
    return UploadSettings(**values)


async def append_all(store: LogStore, records: list[dict[str, Any]], group: int = 20) -> None:
    """Append concurrently in groups, as simultaneous requests would."""
    for start in range(0, len(records), group):
        await asyncio.gather(*(store.append(r) for r in records[start : start + group]))
