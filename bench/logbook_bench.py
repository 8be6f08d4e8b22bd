"""What durable inference logging costs: added latency per request and sustained appends/s.

    .venv/bin/python bench/logbook_bench.py [--dir DIR] [--seconds 3] [--size 2000]

Latency: the same simulated request (build a completion response, serialise it) with
logging off and on, interleaved so drift hits both alike; "added" is on minus off.
Throughput: N concurrent appenders for a few seconds each; group commit should make
records/s grow with N while every append still waits for its own fsync'd commit.
Backlog replay: a store holding ``--backlog`` pending records (days of an uplink
outage) drained by the real uploader into the reference collector (``edge-agent
collect``, a separate process on loopback); every record is counted at the other end.
Run it on the box's real state disk: fsync cost is the whole story.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from edge_agent.config import UploadSettings
from edge_agent.logbook import LogStore, Uploader, new_record_id


def make_request_record(size: int) -> dict[str, Any]:
    response = {
        "id": "cmpl-" + "0" * 32,
        "object": "text_completion",
        "created": int(time.time()),
        "model": "bench",
        "choices": [{"index": 0, "text": "y" * size, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 27, "completion_tokens": 100, "total_tokens": 127},
    }
    return {
        "id": new_record_id(),
        "time": int(time.time() * 1000),
        "pipeline": "edge-llm",
        "model": {"name": "bench", "version": "1", "sha": "0" * 64},
        "endpoint": "completions",
        "in": {"prompt": "x" * 200, "max_tokens": 100},
        "out": {"json": json.dumps(response)},
        "params": {"max_tokens": 100, "temperature": 0.0},
        "metrics": {"ttft": 0.02, "tps": 90.0, "prompt_tokens": 27, "completion_tokens": 100},
        "status": "ok",
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latency(store: LogStore, requests: int, size: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"off": [], "on": []}
    for n in range(requests * 2):
        mode = "on" if n % 2 else "off"
        start = time.perf_counter()
        record = make_request_record(size)  # the request's own work, both modes
        if mode == "on":
            await store.append(record)
        samples[mode].append(time.perf_counter() - start)
    return samples


async def throughput(
    store: LogStore, appenders: int, seconds: float, size: int
) -> tuple[float, float]:
    before = store.stats()
    stop = time.perf_counter() + seconds

    async def appender() -> None:
        while time.perf_counter() < stop:
            await store.append(make_request_record(size))

    start = time.perf_counter()
    await asyncio.gather(*(appender() for _ in range(appenders)))
    elapsed = time.perf_counter() - start
    after = store.stats()
    appended = after.appended_total - before.appended_total
    commits = max(1, after.commits - before.commits)
    return appended / elapsed, appended / commits


async def replay(directory: Path, backlog: int, size: int) -> None:
    """Fill a store with ``backlog`` pending records, then time the upload of all of them."""
    store = LogStore(directory / "logbook.db")
    started = time.perf_counter()
    per_appender = -(-backlog // 64)

    async def fill(first: int) -> None:
        for _ in range(first, min(first + per_appender, backlog)):
            await store.append(make_request_record(size))

    await asyncio.gather(*(fill(a * per_appender) for a in range(64)))
    filled = time.perf_counter() - started
    stats = store.stats()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = directory / "collected"
    collector = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge_agent.cli", "collect",
        "--listen", f"127.0.0.1:{port}", "--out", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/ingest"
    uploader = Uploader(store, UploadSettings(url=url, batch_age_s=0.1), "bench-box")
    try:
        async with aiohttp.ClientSession() as session:
            while True:  # until the collector listens
                try:
                    async with session.get(f"http://127.0.0.1:{port}/"):
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
        started = time.perf_counter()
        await uploader.start()
        while True:  # the backlog figure is read off the store, as /metrics does
            if store.stats().pending == 0:
                break
            await asyncio.sleep(0.05)
        drained = time.perf_counter() - started
    finally:
        await uploader.stop()
        collector.terminate()
        await collector.wait()
        await store.aclose()
    received = sum(1 for path in out.glob("*/*.jsonl") for line in path.open("rb") if line.strip())
    mib = stats.record_bytes / 2**20
    print(
        f"backlog replay: {backlog} records ({mib:.0f} MiB) written in {filled:.1f} s, "
        f"uploaded in {drained:.1f} s = {backlog / drained:.0f} records/s "
        f"({mib / drained:.1f} MiB/s); the collector stored {received} records"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="state dir (default: a temp dir)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per concurrency level")
    parser.add_argument("--size", type=int, default=2000, help="completion text bytes")
    parser.add_argument("--requests", type=int, default=1000, help="latency samples per mode")
    parser.add_argument("--appenders", default="1,4,16,64,256")
    parser.add_argument("--backlog", type=int, default=50_000, help="records to replay")
    args = parser.parse_args()

    # Both durability settings in one run (logs.sync): full fsyncs every commit group,
    # normal leaves committed pages to the OS (safe from kill -9, not from power loss).
    for sync in ("full", "normal"):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            store = LogStore(Path(tmp) / "logbook.db", sync=sync)
            try:
                await report(store, sync, args)
            finally:
                await store.aclose()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        await replay(Path(tmp), args.backlog, args.size)


async def report(store: LogStore, sync: str, args: argparse.Namespace) -> None:
    await latency(store, 50, args.size)  # warm up
    samples = await latency(store, args.requests, args.size)
    off, on = samples["off"], samples["on"]
    ms = 1000.0
    print(
        f"logs.sync = {sync}: record ~{len(json.dumps(make_request_record(args.size)))} bytes, "
        f"{args.requests} requests per mode, one appender"
    )
    print(f"{'':12}{'median ms':>12}{'p99 ms':>12}")
    print(f"{'logging off':12}{statistics.median(off) * ms:12.3f}{pct(off, 0.99) * ms:12.3f}")
    print(f"{'logging on':12}{statistics.median(on) * ms:12.3f}{pct(on, 0.99) * ms:12.3f}")
    print(
        f"{'added':12}{(statistics.median(on) - statistics.median(off)) * ms:12.3f}"
        f"{(pct(on, 0.99) - pct(off, 0.99)) * ms:12.3f}"
    )
    print()
    print(f"{'appenders':>10}{'records/s':>12}{'per commit':>12}")
    for appenders in (int(a) for a in args.appenders.split(",")):
        rate, per_commit = await throughput(store, appenders, args.seconds, args.size)
        print(f"{appenders:>10}{rate:12.0f}{per_commit:12.1f}")
    print()


if __name__ == "__main__":
    asyncio.run(main())
