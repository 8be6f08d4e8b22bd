"""Soak benchmark: hours of mixed load on loopback, nothing lost, nothing growing.

    .venv/bin/python bench/soak.py                 # 30 minutes
    .venv/bin/python bench/soak.py --minutes 2     # the quick run

Starts the reference collector and a daemon that uploads to it (both on loopback),
then runs client tasks that loop over a weighted mix: streaming and non-streaming chat
and completions, ``n`` > 1, ``json_schema``, streams cancelled mid-way, clients that
read slowly, bad requests, and now and then a burst past the queue into 429. The
collector is stopped for a stretch of every ten minutes (the first quarter to half of a
short run) and started again. Bounded by ``--minutes`` and ``--max-requests``.

Prints, per minute: requests by status, p50/p99 ttft and per-stream tps, RSS (daemon
plus engine process), open file descriptors, threads and the SQLite files' size. At the
end, the reconciliation: every request the clients sent carries a unique ``user`` tag,
and each must have exactly one record on the box and, once the collector is back and
the backlog drained, exactly one at the collector. Writes bench/out/soak.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
CHAT = "/infer/openai/v1/chat/completions"
COMPLETIONS = "/infer/openai/v1/completions"
TAG = re.compile(r"soak-\d+")
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "year": {"type": "integer"}},
    "required": ["city", "year"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Minute:
    minute: int
    statuses: dict[str, int]
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    tps_p50: float | None
    rss_mib: float
    fds: int
    threads: int
    sqlite_mib: float


@dataclass
class Soak:
    seconds: float
    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    ttft: list[float] = field(default_factory=list)
    tps: list[float] = field(default_factory=list)
    minutes: list[Minute] = field(default_factory=list)


class Processes:
    """The collector and the daemon, on loopback, in a temporary directory."""

    def __init__(self, root: Path, workers: int) -> None:
        self.root = root
        self.collector_port, self.port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.collected = root / "collected"
        self.state = root / "state"
        self.collector: subprocess.Popen[bytes] | None = None
        env = {
            **os.environ,
            "EDGE_AGENT_LOG_FORMAT": "json",
            "EDGE_AGENT_UPLOAD__URL": f"http://127.0.0.1:{self.collector_port}/ingest",
            "EDGE_AGENT_UPLOAD__BATCH_AGE_S": "1",
            "EDGE_AGENT_UPLOAD__MAX_BACKOFF_S": "2",
            # A small queue, so a burst of a few dozen requests meets 429s.
            "EDGE_AGENT_MAX_QUEUE": str(workers),
            "EDGE_AGENT_HTTP__STREAM_STALL_S": "5",
        }
        self._log = (root / "daemon.log").open("ab")
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), "--state-dir", str(self.state)],
            env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.start_collector()

    def start_collector(self) -> None:
        self.collector = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "collect", "--listen",
             f"127.0.0.1:{self.collector_port}", "--out", str(self.collected)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop_collector(self) -> None:
        if self.collector is not None:
            self.collector.terminate()
            self.collector.wait(timeout=30)
            self.collector = None

    def sample(self) -> tuple[float, int, int, float]:
        """RSS (MiB), open fds and threads of the daemon and its engine; SQLite MiB."""
        rss = fds = threads = 0
        daemon = psutil.Process(self.daemon.pid)
        for process in [daemon, *daemon.children(recursive=True)]:
            try:
                rss += process.memory_info().rss
                fds += process.num_fds()
                threads += process.num_threads()
            except psutil.NoSuchProcess:
                continue
        size = sum(p.stat().st_size for p in self.state.glob("logbook.db*"))
        return rss / 2**20, fds, threads, size / 2**20

    def stop(self) -> None:
        self.daemon.terminate()
        self.daemon.wait(timeout=60)
        self.stop_collector()
        self._log.close()


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{url}/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError("daemon not ready")


class Load:
    """The clients: each request tagged, each outcome counted."""

    def __init__(self, session: aiohttp.ClientSession, url: str, soak: Soak) -> None:
        self.session, self.url, self.soak = session, url, soak
        self.rng = random.Random(20261204)
        self.minute: Counter[str] = Counter()
        self.minute_ttft: list[float] = []
        self.minute_tps: list[float] = []
        self.refused: set[asyncio.Task[Any] | None] = set()  # tasks that just got a 429

    def tag(self) -> str:
        self.soak.sent += 1
        return f"soak-{self.soak.sent}"

    def count(self, status: int | str, usage: dict[str, Any] | None = None) -> None:
        key = str(status)
        if key == "429":
            self.refused.add(asyncio.current_task())
        self.soak.statuses[key] += 1
        self.minute[key] += 1
        if usage and usage.get("ttft") is not None:
            self.soak.ttft.append(usage["ttft"])
            self.minute_ttft.append(usage["ttft"])
        if usage and usage.get("tps") is not None:
            self.soak.tps.append(usage["tps"])
            self.minute_tps.append(usage["tps"])

    async def one(self) -> None:
        kind = self.rng.choices(
            ["chat", "chat_stream", "completion", "completion_stream", "n2", "schema",
             "cancel", "slow", "bad"],
            weights=[14, 20, 10, 14, 8, 6, 10, 8, 10],
        )[0]  # fmt: skip
        user = self.tag()
        chat = {"messages": [{"role": "user", "content": "Tell me about the sea."}]}
        if kind == "bad":
            await self.bad(user)
        elif kind == "schema":
            fmt = {"type": "json_schema", "json_schema": {"name": "fact", "schema": SCHEMA}}
            await self.plain(CHAT, {**chat, "max_tokens": 48, "response_format": fmt}, user)
        elif kind == "n2":
            await self.plain(COMPLETIONS, {"prompt": "Once upon", "max_tokens": 16, "n": 2}, user)
        elif kind in ("chat", "completion"):
            path, body = (CHAT, chat) if kind == "chat" else (COMPLETIONS, {"prompt": "Hello"})
            await self.plain(path, {**body, "max_tokens": 24}, user)
        else:
            body = {**chat, "max_tokens": 32, "stream": True}
            path = CHAT
            if kind == "completion_stream":
                path, body = COMPLETIONS, {"prompt": "Hello", "max_tokens": 32, "stream": True}
            await self.stream(path, body, user, cancel_after=3 if kind == "cancel" else None,
                              slow=kind == "slow")  # fmt: skip

    async def plain(self, path: str, body: dict[str, Any], user: str) -> None:
        async with self.session.post(self.url + path, json={**body, "user": user}) as response:
            answer = await response.json(content_type=None)
            self.count(response.status, answer.get("usage") if response.status == 200 else None)

    async def stream(
        self, path: str, body: dict[str, Any], user: str, *, cancel_after: int | None, slow: bool
    ) -> None:
        async with self.session.post(self.url + path, json={**body, "user": user}) as response:
            if response.status != 200:
                await response.read()
                self.count(response.status)
                return
            usage, events = None, 0
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                events += 1
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                if cancel_after is not None and events >= cancel_after:
                    response.close()  # the client goes away mid-stream
                    self.count("cancelled")
                    return
                if slow:
                    await asyncio.sleep(0.05)  # a client that reads slowly
            self.count(200, usage)

    async def bad(self, user: str) -> None:
        bodies = [
            (b'{"user": "%s", "prompt": "hi", "temperature": NaN}', "application/json"),
            (b'{"user": "%s", "prompt": "a", "prompt": "b"}', "application/json"),
            (b'{"user": "%s", "prompt": "hi"}', "text/plain"),
            (b'{"user": "%s", "messages": []}', "application/json"),
        ]
        raw, content_type = self.rng.choice(bodies)
        path = COMPLETIONS if b"messages" not in raw else CHAT
        async with self.session.post(
            self.url + path, data=raw % user.encode(), headers={"Content-Type": content_type}
        ) as response:
            await response.read()
            self.count(response.status)

    async def burst(self, size: int) -> None:
        await asyncio.gather(*(self.safe() for _ in range(size)))

    async def safe(self) -> None:
        try:
            await self.one()
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.count(f"client_error:{type(exc).__name__}")
        if asyncio.current_task() in self.refused:
            self.refused.discard(asyncio.current_task())
            await asyncio.sleep(1)  # as a client honouring Retry-After would


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def box_records(state: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(f"file:{state / 'logbook.db'}?mode=ro", uri=True) as conn:
        return [json.loads(row[0]) for row in conn.execute("SELECT body FROM records")]


def collected_records(directory: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted(directory.glob("*/*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]


def tags_of(records: list[dict[str, Any]]) -> Counter[str]:
    found: Counter[str] = Counter()
    for record in records:
        body = record.get("in")
        text = body if isinstance(body, str) else json.dumps(body)
        match = TAG.search(text)
        if match:
            found[match.group(0)] += 1
    return found


def reconcile(sent: int, found: Counter[str]) -> dict[str, int]:
    expected = {f"soak-{i}" for i in range(1, sent + 1)}
    return {
        "sent": sent,
        "lost": len(expected - set(found)),
        "duplicated": sum(1 for tag in expected if found.get(tag, 0) > 1),
        "unknown": len(set(found) - expected),
    }


async def run(minutes: float, max_requests: int, workers: int) -> dict[str, Any]:
    soak = Soak(seconds=minutes * 60)
    with tempfile.TemporaryDirectory(prefix="edge-soak-") as tmp:
        procs = Processes(Path(tmp), workers)
        timeout = aiohttp.ClientTimeout(total=120)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await wait_ready(session, procs.url)
            load = Load(session, procs.url, soak)
            started = time.monotonic()
            end = started + soak.seconds
            stop = asyncio.Event()

            async def client() -> None:
                while not stop.is_set() and time.monotonic() < end and soak.sent < max_requests:
                    await load.safe()

            async def bursts() -> None:
                while time.monotonic() < end and soak.sent < max_requests:
                    try:
                        await asyncio.wait_for(stop.wait(), 20)
                        return
                    except TimeoutError:
                        await load.burst(3 * workers)  # finished, never cut: all are counted

            async def collector_outages() -> None:
                # Down from a quarter to half of each ten minutes (of the run, if shorter).
                period = min(600.0, soak.seconds)
                while time.monotonic() < end:
                    phase = (time.monotonic() - started) % period
                    if period * 0.25 <= phase < period * 0.5:
                        if procs.collector is not None:
                            procs.stop_collector()
                            print(f"  [{time.monotonic() - started:6.0f} s] collector down")
                    elif procs.collector is None:
                        procs.start_collector()
                        print(f"  [{time.monotonic() - started:6.0f} s] collector up")
                    await asyncio.sleep(1)

            async def per_minute() -> None:
                minute = 0
                while time.monotonic() < end:
                    await asyncio.sleep(min(60.0, max(0.0, end - time.monotonic())))
                    minute += 1
                    rss, fds, threads, sqlite_mib = procs.sample()
                    row = Minute(
                        minute=minute,
                        statuses=dict(load.minute),
                        ttft_p50_ms=_ms(percentile(load.minute_ttft, 0.5)),
                        ttft_p99_ms=_ms(percentile(load.minute_ttft, 0.99)),
                        tps_p50=percentile(load.minute_tps, 0.5),
                        rss_mib=rss,
                        fds=fds,
                        threads=threads,
                        sqlite_mib=sqlite_mib,
                    )
                    soak.minutes.append(row)
                    print(minute_line(row), flush=True)
                    load.minute, load.minute_ttft, load.minute_tps = Counter(), [], []

            print(header(), flush=True)
            tasks = [asyncio.create_task(client()) for _ in range(workers)]
            burster = asyncio.create_task(bursts())
            extra = [asyncio.create_task(t()) for t in (collector_outages, per_minute)]
            await asyncio.gather(*tasks)
            stop.set()
            await burster
            for task in extra:
                task.cancel()
            await asyncio.gather(*extra, return_exceptions=True)
            if procs.collector is None:
                procs.start_collector()
            # A cancelled stream's record lands just after its client left: wait for all.
            deadline = time.monotonic() + 30
            while True:
                on_box = tags_of(box_records(procs.state))
                if len(on_box) >= soak.sent or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            box = reconcile(soak.sent, on_box)
            # The backlog drains once the collector is back: wait for every tag, bounded.
            deadline = time.monotonic() + 120
            while True:
                rows = collected_records(procs.collected)
                at_collector = tags_of(rows)
                if len(at_collector) >= len(on_box) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1)
            collector = reconcile(soak.sent, at_collector)
            collector["lines"] = len(rows)
            collector["unique_ids"] = len({row["id"] for row in rows})
        procs.stop()
    return {
        "minutes": minutes,
        "workers": workers,
        "sent": soak.sent,
        "statuses": dict(soak.statuses),
        "ttft_p50_ms": _ms(percentile(soak.ttft, 0.5)),
        "ttft_p99_ms": _ms(percentile(soak.ttft, 0.99)),
        "tps_p50": percentile(soak.tps, 0.5),
        "per_minute": [asdict(m) for m in soak.minutes],
        "box": box,
        "collector": collector,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _f(value: float | None, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


def header() -> str:
    return (
        "| min | requests by status | ttft p50 ms | ttft p99 ms | tps p50 | RSS MiB | fds "
        "| threads | SQLite MiB |\n|---|---|---|---|---|---|---|---|---|"
    )


def minute_line(m: Minute) -> str:
    statuses = " ".join(f"{k}:{v}" for k, v in sorted(m.statuses.items()))
    return (
        f"| {m.minute} | {statuses} | {_f(m.ttft_p50_ms)} | {_f(m.ttft_p99_ms)} | "
        f"{_f(m.tps_p50, '.1f')} | {m.rss_mib:.0f} | {m.fds} | {m.threads} | "
        f"{m.sqlite_mib:.2f} |"
    )


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["per_minute"]
    if not rows:
        return
    minutes = [r["minute"] for r in rows]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    axes[0].plot(minutes, [r["rss_mib"] for r in rows], marker="o")
    axes[0].set_title("RSS, daemon + engine (MiB)")
    axes[1].plot(minutes, [r["fds"] for r in rows], marker="o", label="fds")
    axes[1].plot(minutes, [r["threads"] for r in rows], marker="o", label="threads")
    axes[1].set_title("open fds and threads")
    axes[1].legend()
    axes[2].plot(minutes, [r["sqlite_mib"] for r in rows], marker="o")
    axes[2].set_title("SQLite files (MiB)")
    for axis in axes:
        axis.set_xlabel("minute")
        axis.set_ylim(bottom=0)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=6, help="concurrent client loops")
    args = parser.parse_args()
    result = asyncio.run(run(args.minutes, args.max_requests, args.workers))
    statuses = " ".join(f"{k}:{v}" for k, v in sorted(result["statuses"].items()))
    print(f"\nrequests: {result['sent']} sent; by status: {statuses}")
    fives = sum(v for k, v in result["statuses"].items() if k.startswith("5"))
    print(f"5xx: {fives}")
    print(
        f"ttft p50 {_f(result['ttft_p50_ms'])} ms, p99 {_f(result['ttft_p99_ms'])} ms; "
        f"per-stream tps p50 {_f(result['tps_p50'], '.1f')}"
    )
    for name in ("box", "collector"):
        print(f"reconciliation at the {name}: {result[name]}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "soak.json").write_text(json.dumps(result, indent=2))
    plot(result, OUT / "soak.png")
    ok = (
        fives == 0
        and result["box"]["lost"] == result["box"]["duplicated"] == 0
        and result["collector"]["lost"] == result["collector"]["duplicated"] == 0
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
