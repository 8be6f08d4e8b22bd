"""The systemd side without systemd: the unit verifies, notify and watchdog over a real socket,
SIGTERM drains a stream to the end, SIGHUP reloads settings live."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import Settings
from tests.conftest import REPO, Daemon
from tests.install.notify_socket import NotifySocket

pytestmark = pytest.mark.slow
UNIT = REPO / "systemd" / "edge-agent.service"
SERVICE = [
    "Type=notify",
    "NotifyAccess=main",
    "WatchdogSec=30",
    "Restart=on-failure",
    "StateDirectory=edge-agent",
    "ConfigurationDirectory=edge-agent",
    "User=edge-agent",
    "ExecStart=/opt/edge-agent/bin/edge-agent serve --config /etc/edge-agent/config.toml"
    " --state-dir /var/lib/edge-agent",
    "ExecReload=/bin/kill -HUP $MAINPID",
    "Environment=PYTHONUNBUFFERED=1",
]
HARDENING = [
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "RestrictNamespaces=yes",
    "LockPersonality=yes",
    "RestrictRealtime=yes",
    "MemoryDenyWriteExecute=no",
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    "CapabilityBoundingSet=",
    "SystemCallFilter=@system-service",
    "DevicePolicy=closed",
    "DeviceAllow=char-nvidia* rw",  # CUDA's device nodes, whatever the driver names them
]


def test_the_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: install Debian's systemd package"
    # verify wants ExecStart to exist: point it at this checkout's edge-agent.
    unit = tmp_path / "edge-agent.service"
    edge_agent = Path(sys.executable).with_name("edge-agent")
    unit.write_text(UNIT.read_text().replace("/opt/edge-agent/bin/edge-agent", str(edge_agent)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    # verify exits 0 on an unknown or misspelt directive, only saying it ignores it.
    assert "ignoring" not in result.stderr, result.stderr


def test_the_unit_is_notify_with_watchdog_and_hardening() -> None:
    lines = set(UNIT.read_text().splitlines())
    missing = [directive for directive in [*SERVICE, *HARDENING] if directive not in lines]
    assert missing == []


def test_the_unit_waits_past_the_shutdown_grace_before_sigkill() -> None:
    match = re.search(r"^TimeoutStopSec=(\d+)$", UNIT.read_text(), re.MULTILINE)
    assert match, "TimeoutStopSec= in seconds"
    assert int(match.group(1)) > Settings().shutdown_grace_s + 5


def readyz(url: str) -> int:
    """The readiness status, or 0 while nothing listens yet."""
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except urllib.error.URLError:
        return 0


def stream(url: str, max_tokens: int, headers: dict[str, str] | None = None) -> Any:
    body = {
        "prompt": "Tell me a long story.",
        "max_tokens": max_tokens,
        "stream": True,
        "logit_bias": {"0": -100, "1": -100, "2": -100},  # runs to max_tokens
    }
    request = urllib.request.Request(
        f"{url}/infer/openai/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    return urllib.request.urlopen(request, timeout=120)


def test_ready_only_after_readyz_and_watchdog_pings_during_generation(
    start_daemon: Any, tmp_path: Path
) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000"}
        daemon: Daemon = start_daemon(env=env, ready=False)
        polls: list[tuple[float, int]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not polls or polls[-1][1] != 200):
            polls.append((time.monotonic(), readyz(daemon.url)))
            time.sleep(0.01)
        ready_at = notify.wait_for("READY=1")
        assert any(status != 200 for _, status in polls), "it started out not ready"
        # READY=1 comes only once /readyz says 200: no poll after it saw anything else.
        assert all(status == 200 for at, status in polls if at > ready_at)
        with stream(daemon.url, 150) as response:
            started = time.monotonic()
            response.read()
            finished = time.monotonic()
        pings = [at for at, m in notify.messages if m == "WATCHDOG=1" and started <= at <= finished]
        assert finished - started > 0.6, "the generation must outlast a few watchdog periods"
        assert len(pings) >= int((finished - started) / 0.2) - 1
        assert all(b - a < 0.4 for a, b in itertools.pairwise(pings))
    finally:
        notify.close()


def test_sigterm_lets_a_stream_finish_and_its_record_land(
    start_daemon: Any, tmp_path: Path
) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        daemon: Daemon = start_daemon(env={"NOTIFY_SOCKET": notify.address})
        with stream(daemon.url, 120) as response:
            response.readline()  # the stream is under way
            daemon.process.send_signal(signal.SIGTERM)
            notify.wait_for("STOPPING=1", timeout=10)
            assert readyz(daemon.url) == 503  # readiness drops while it drains
            body = response.read().decode()
        events = [e for e in body.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2].removeprefix("data: "))
        assert last["usage"]["completion_tokens"] == 120
        assert daemon.process.wait(timeout=30) == 0
    finally:
        notify.close()
    logs = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "logs", "--state-dir", str(daemon.state_dir)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    records = [json.loads(line) for line in logs.stdout.splitlines()]
    assert [r["status"] for r in records] == ["ok"]
    assert json.loads(records[0]["out"]["json"])["usage"]["completion_tokens"] == 120


def test_sighup_reloads_the_token_without_a_restart(start_daemon: Any, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("request_timeout_s = 600\n")
    daemon: Daemon = start_daemon("--config", str(config))
    pid = daemon.process.pid
    with stream(daemon.url, 2) as response:
        assert response.status == 200
    config.write_text('request_timeout_s = 600\nauth_token = "s3cret"\n')
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    status = 200
    while time.monotonic() < deadline and status == 200:
        try:
            with stream(daemon.url, 2) as response:
                status = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        time.sleep(0.1)
    assert status == 401
    with stream(daemon.url, 2, {"Authorization": "Bearer s3cret"}) as response:
        assert response.status == 200
    assert daemon.process.pid == pid and daemon.process.poll() is None
