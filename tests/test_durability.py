"""No inference record is lost: kill -9, a collector down and then up (CONTRACT.md section 6);
and a disk that fills up costs records, never inference."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Daemon, free_port

pytestmark = pytest.mark.slow


def completion(daemon: Daemon, prompt: str, **extra: Any) -> dict[str, Any]:
    body = json.dumps({"prompt": prompt, "max_tokens": 1, "temperature": 0, **extra}).encode()
    request = urllib.request.Request(
        f"{daemon.url}/infer/openai/v1/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def local_logs(daemon: Daemon, limit: int = 1000) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{daemon.url}/logs?limit={limit}", timeout=10) as response:
        records: list[dict[str, Any]] = json.loads(response.read())["data"]
        return records


class Collector:
    """The reference collector, `edge-agent collect`, as a real process on loopback."""

    def __init__(self, out: Path, port: int) -> None:
        self.out = out
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "collect",
             "--listen", f"127.0.0.1:{self.port}", "--out", str(self.out)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def records(self) -> list[dict[str, Any]]:
        lines = []
        for path in sorted(self.out.glob("*/*.jsonl")):
            lines += [json.loads(line) for line in path.read_text().splitlines() if line]
        return lines

    def wait_for(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.records()
            if len(records) >= count:
                return records
            time.sleep(0.2)
        raise TimeoutError(f"collector has {len(self.records())} of {count} records")


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    instance = Collector(tmp_path / "collected", free_port())
    yield instance
    instance.stop()


def upload_env(collector: Collector) -> dict[str, str]:
    return {
        "EDGE_AGENT_UPLOAD__URL": f"http://127.0.0.1:{collector.port}/ingest",
        "EDGE_AGENT_UPLOAD__BATCH_AGE_S": "0.2",
        "EDGE_AGENT_UPLOAD__MAX_BACKOFF_S": "1",
    }


def test_kill_9_right_after_a_response_loses_no_record(
    start_daemon: Any, collector: Collector, tmp_path: Path
) -> None:
    first = start_daemon(env=upload_env(collector))  # the collector is not up yet
    answers = [completion(first, f"Record number {i}") for i in range(5)]
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.wait()
    # Same state directory, new process.
    second = Daemon(first.state_dir, env={**os.environ, **upload_env(collector)})
    try:
        second.wait_ready()
        stored = local_logs(second)
        assert len(stored) == 5
        stored_outputs = {json.loads(r["out"]["json"])["id"] for r in stored}
        assert stored_outputs == {a["id"] for a in answers}
        collector.start()
        uploaded = collector.wait_for(5)
        assert {r["id"] for r in uploaded} == {r["id"] for r in stored}
    finally:
        second.stop()


def test_collector_down_for_200_requests_then_up_gets_each_once_in_order(
    start_daemon: Any, collector: Collector
) -> None:
    daemon = start_daemon(env=upload_env(collector))
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda i: completion(daemon, f"Request {i}"), range(200)))
    assert collector.records() == []
    collector.start()
    uploaded = collector.wait_for(200)
    time.sleep(1)  # anything sent twice would show up now
    uploaded = collector.records()
    ids = [r["id"] for r in uploaded]
    assert len(ids) == 200 == len(set(ids))
    assert ids == sorted(ids), "records arrive in the order of their ids"
    assert all(r["status"] == "ok" and r["endpoint"] == "completions" for r in uploaded)


def metric(daemon: Daemon, name: str) -> float:
    with urllib.request.urlopen(f"{daemon.url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise KeyError(name)


def test_a_full_disk_keeps_inference_serving_and_counts_the_lost_records(
    start_daemon: Any,
) -> None:
    # RLIMIT_FSIZE makes every write that grows a file past 256 KiB fail (EFBIG), as a
    # full disk fails with ENOSPC: the log store's files are the ones that grow.
    def small_disk() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))

    daemon = start_daemon(preexec_fn=small_disk)
    first = completion(daemon, "The first record fits.")
    # An unknown field is ignored for generation and kept in the log: 6 KB more per record.
    answers = [completion(daemon, f"Record {i}", note="x" * 6000) for i in range(80)]
    assert all(a["choices"][0]["finish_reason"] in {"stop", "length"} for a in answers)
    assert daemon.process.poll() is None, "the daemon is alive"
    failures = metric(daemon, "edge_agent_logbook_append_failures_total")
    assert failures > 0, "the limit was reached and the lost records are counted"
    stored = local_logs(daemon)
    assert json.loads(stored[-1]["out"]["json"])["id"] == first["id"], "earlier records kept"
    assert len(stored) + failures == 81
    assert "logbook.append_failed" in daemon.log_path.read_text()
    after = completion(daemon, "Still serving.")
    assert after["usage"]["completion_tokens"] == 1
