"""The engine process dies; the daemon does not (issue: the box keeps serving whatever its CPU).

Real daemon, real model, real signals: SIGKILL and SIGSEGV sent to the llama.cpp engine
process in the middle of four streams, a hung engine (SIGSTOP), and a configuration
whose engine crashes for real on its first decode.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Daemon

pytestmark = pytest.mark.slow

NO_END = {"2": -100, "0": -100}  # end-of-text suppressed: streams run until cut off


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def engine_info(daemon: Daemon) -> dict[str, Any]:
    _, body = get_json(f"{daemon.url}/models")
    info: dict[str, Any] = body["models"][0]["engine"]
    return info


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError("condition not met")


def local_records(daemon: Daemon) -> list[dict[str, Any]]:
    _, body = get_json(f"{daemon.url}/logs?limit=1000")
    records: list[dict[str, Any]] = body["data"]
    return records


class HealthWatch:
    """Polls /healthz and /readyz from a thread for as long as a test runs."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self.health: list[int] = []
        self.readiness: list[tuple[int, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.health.append(get_json(f"{self._daemon.url}/healthz")[0])
            except OSError:
                self.health.append(0)
            self.readiness.append(get_json(f"{self._daemon.url}/readyz"))
            time.sleep(0.02)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def stream(session: aiohttp.ClientSession, url: str, prompt: str) -> list[dict[str, Any]]:
    """Every data event of one streamed completion, [DONE] as {"done": True}."""
    body = {
        "prompt": prompt,
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
        "logit_bias": NO_END,
    }
    events: list[dict[str, Any]] = []
    async with session.post(f"{url}/infer/openai/v1/completions", json=body) as response:
        assert response.status == 200
        async for line in response.content:
            text = line.decode().strip()
            if not text.startswith("data: "):
                continue
            payload = text.removeprefix("data: ")
            events.append({"done": True} if payload == "[DONE]" else json.loads(payload))
    return events


async def streams_cut_by(daemon: Daemon, cut: Callable[[int], None]) -> list[list[dict[str, Any]]]:
    """Four streams; once each has tokens, ``cut(engine_pid)``; what each client received."""
    pid = engine_info(daemon)["pid"]
    async with aiohttp.ClientSession() as session:
        tasks = [
            asyncio.create_task(stream(session, daemon.url, f"Story number {i}:")) for i in range(4)
        ]
        # Cut once all four are admitted and have had time to stream some tokens.
        deadline = time.monotonic() + 60
        while "edge_agent_requests_in_flight 4.0" not in _metrics(daemon):
            assert time.monotonic() < deadline, "the four streams never ran together"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        cut(pid)
        return await asyncio.wait_for(asyncio.gather(*tasks), 60)


def _metrics(daemon: Daemon) -> str:
    with urllib.request.urlopen(f"{daemon.url}/metrics", timeout=10) as response:
        return str(response.read().decode())


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSEGV])
def test_a_dead_engine_ends_every_stream_with_an_error_and_the_daemon_heals(
    start_daemon: Callable[..., Daemon], signum: signal.Signals
) -> None:
    daemon = start_daemon()
    before = {r["id"] for r in local_records(daemon)}
    old_pid = engine_info(daemon)["pid"]
    with HealthWatch(daemon) as watch:
        results = asyncio.run(streams_cut_by(daemon, lambda pid: os.kill(pid, signum)))
        wait_for(lambda: get_json(f"{daemon.url}/readyz")[0] == 200)
        reply = json.loads(
            urllib.request.urlopen(
                urllib.request.Request(
                    f"{daemon.url}/infer/openai/v1/completions",
                    data=json.dumps({"prompt": "Hello", "max_tokens": 4}).encode(),
                    headers={"Content-Type": "application/json"},
                ),
                timeout=60,
            ).read()
        )
    assert reply["usage"]["completion_tokens"] > 0, "the next request is served"
    for events in results:
        tokens = [e for e in events if "choices" in e]
        errors = [e["error"] for e in events if "error" in e]
        assert tokens, "the stream was under way when the engine died"
        assert len(errors) == 1 and errors[0]["code"] == "engine_restarted"
        assert signum.name in errors[0]["message"]
        assert events[-1] == {"done": True}, "an error frame, then [DONE]"
    assert set(watch.health) == {200}, "the HTTP port never stopped answering"
    restarting = [body for status, body in watch.readiness if status == 503]
    assert restarting and all(b["status"] == "restarting" for b in restarting)
    assert signum.name in restarting[0]["reason"]
    new = [r for r in local_records(daemon) if r["id"] not in before]
    cut = [r for r in new if r["status"] == "error"]
    assert len(cut) == 4, "each request cut off has its record"
    assert all(signum.name in r["error"] for r in cut)
    info = engine_info(daemon)
    assert info["pid"] != old_pid and info["restarts"] == 1
    assert f'edge_agent_engine_restarts_total{{reason="{signum.name}"}} 1.0' in _metrics(daemon)


def test_a_new_request_while_the_engine_restarts_is_a_503_naming_the_restart(
    start_daemon: Callable[..., Daemon],
) -> None:
    # A long backoff holds the restart window open long enough to send a request into it.
    daemon = start_daemon(env={"EDGE_AGENT_ENGINE__RESTART_BACKOFF_S": "3"})
    os.kill(engine_info(daemon)["pid"], signal.SIGKILL)
    wait_for(lambda: get_json(f"{daemon.url}/readyz")[0] == 503)
    request = urllib.request.Request(
        f"{daemon.url}/infer/openai/v1/chat/completions",
        data=json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 503
    assert refused.value.headers["Retry-After"]
    error = json.loads(refused.value.read())["error"]
    assert error["code"] == "engine_restarting" and "SIGKILL" in error["message"]
    wait_for(lambda: get_json(f"{daemon.url}/readyz")[0] == 200)
    # The new engine embeds too: its embedding context is made afresh on first use.
    embed = urllib.request.Request(
        f"{daemon.url}/infer/openai/v1/embeddings",
        data=json.dumps({"input": ["after the restart"]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(embed, timeout=60) as response:
        assert len(json.loads(response.read())["data"][0]["embedding"]) > 0


def test_a_hung_engine_is_killed_and_restarted(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(env={"EDGE_AGENT_ENGINE__STALL_S": "2"})
    results = asyncio.run(streams_cut_by(daemon, lambda pid: os.kill(pid, signal.SIGSTOP)))
    for events in results:
        errors = [e["error"] for e in events if "error" in e]
        assert len(errors) == 1 and "stalled" in errors[0]["message"]
    wait_for(lambda: get_json(f"{daemon.url}/readyz")[0] == 200)
    assert 'edge_agent_engine_restarts_total{reason="stalled"} 1.0' in _metrics(daemon)


def test_the_fallback_is_taken_when_the_first_configuration_crashes_its_probe(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    cache = tmp_path / "probes.json"
    env = {"EDGE_AGENT_ENGINE_FAULT": "segv:repack", "EDGE_AGENT_ENGINE__PROBE_CACHE": str(cache)}
    daemon = start_daemon(env=env)
    info = engine_info(daemon)
    assert info["configuration"] == "no_repack"
    assert "repack crashed: SIGSEGV" in info["reason"]
    verdicts = json.loads(cache.read_text())
    (verdict,) = verdicts.values()
    outcomes = {p["config"]: p["outcome"] for p in verdict["probes"]}
    assert outcomes == {"repack": "crashed", "no_repack": "passed"}
    daemon.stop()
    log = daemon.log_path.read_text()
    assert '"event": "engine_configuration"' in log and "no_repack" in log
    # A restart reads the verdict instead of crashing a probe again.
    again = start_daemon(env=env)
    assert engine_info(again)["configuration"] == "no_repack"
    lines = [json.loads(x) for x in again.log_path.read_text().splitlines() if x.startswith("{")]
    chosen = [x for x in lines if x.get("event") == "engine_configuration"]
    assert chosen and chosen[-1]["cached"] is True


def test_a_configuration_that_keeps_crashing_while_serving_is_dropped_for_the_next(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    env = {
        "EDGE_AGENT_ENGINE__PROBE_CACHE": str(tmp_path / "probes.json"),
        "EDGE_AGENT_ENGINE__CRASHES_BEFORE_FALLBACK": "2",
    }
    daemon = start_daemon(env=env)
    assert engine_info(daemon)["configuration"] == "repack"
    for restarts in (1, 2):
        os.kill(engine_info(daemon)["pid"], signal.SIGSEGV)
        wait_for(lambda n=restarts: engine_info(daemon)["restarts"] == n)  # type: ignore[misc]
        wait_for(lambda: get_json(f"{daemon.url}/readyz")[0] == 200)
    info = engine_info(daemon)
    assert info["configuration"] == "no_repack"
    assert "repack crashed 2 times" in info["reason"]


def test_kills_from_outside_restart_the_engine_but_keep_its_configuration(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """kill -9 by an operator or the OOM killer says nothing against llama.cpp's kernels."""
    env = {
        "EDGE_AGENT_ENGINE__PROBE_CACHE": str(tmp_path / "probes.json"),
        "EDGE_AGENT_ENGINE__CRASHES_BEFORE_FALLBACK": "2",
    }
    daemon = start_daemon(env=env)
    assert engine_info(daemon)["configuration"] == "repack"
    for restarts in (1, 2, 3):
        os.kill(engine_info(daemon)["pid"], signal.SIGKILL)
        wait_for(lambda n=restarts: engine_info(daemon)["restarts"] == n)  # type: ignore[misc]
        wait_for(lambda: get_json(f"{daemon.url}/readyz")[0] == 200)
    assert engine_info(daemon)["configuration"] == "repack"
    request = urllib.request.Request(
        f"{daemon.url}/infer/openai/v1/completions",
        data=json.dumps({"prompt": "Hi", "max_tokens": 2, "logit_bias": NO_END}).encode(),
        headers={"Content-Type": "application/json"},
    )
    reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
    assert reply["usage"]["completion_tokens"] == 2
