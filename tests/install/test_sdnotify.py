"""sd_notify against a real Unix datagram socket: messages arrive, and the watchdog pings
follow the event loop: steady while it is free, silent while it is blocked."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Iterator

import pytest

from edge_agent import sdnotify
from tests.install.notify_socket import NotifySocket

INTERVAL_S = 0.2  # WATCHDOG_USEC=200000: a ping every 0.1 s


@pytest.fixture
def notify_socket(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[NotifySocket]:
    # A short directory: a Unix socket path must fit in 108 bytes.
    receiver = NotifySocket(tmp_path_factory.mktemp("sd") / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield receiver
    finally:
        receiver.close()


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False


def test_ready_status_reloading_and_stopping_arrive(notify_socket: NotifySocket) -> None:
    assert sdnotify.ready("serving m on llamacpp")
    assert sdnotify.status("loading")
    assert sdnotify.reloading()
    assert sdnotify.stopping("draining 2 sequences", extend_timeout_s=40)
    notify_socket.flush()
    ready, status, reloading, stopping = (m.splitlines() for m in notify_socket.texts())
    assert ready == ["READY=1", "STATUS=serving m on llamacpp", f"MAINPID={os.getpid()}"]
    assert status == ["STATUS=loading"]
    assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
    assert stopping == ["STOPPING=1", "STATUS=draining 2 sequences", "EXTEND_TIMEOUT_USEC=40000000"]


def test_an_abstract_socket_name_works(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"@edge-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    receiver = NotifySocket(name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        assert sdnotify.ready()
        assert receiver.wait_for("READY=1", timeout=5)
    finally:
        receiver.close()


def test_a_socket_that_is_gone_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path_factory.mktemp("sd") / "gone"))
    assert sdnotify.notify("READY=1") is False


def test_the_watchdog_is_off_without_watchdog_usec_or_for_another_pid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 30.0
    # A child that inherited its parent's environment must not ping for it.
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None


async def test_watchdog_task_returns_at_once_without_a_watchdog(
    notify_socket: NotifySocket,
) -> None:
    await asyncio.wait_for(sdnotify.watchdog_task(), timeout=1)
    notify_socket.flush()
    assert notify_socket.texts() == []


async def test_watchdog_pings_every_half_interval_while_the_loop_is_free(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", str(int(INTERVAL_S * 1e6)))
    pinger = sdnotify.WatchdogPinger()
    pinger.start()
    await asyncio.sleep(1.0)
    await pinger.stop()
    notify_socket.flush()
    pings = notify_socket.times_of("WATCHDOG=1")
    # One at start, then one per 0.1 s.
    assert 8 <= len(pings) <= 12, pings
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert all(gap < INTERVAL_S for gap in gaps), gaps  # systemd never sees a missed interval
    assert sum(gaps) / len(gaps) == pytest.approx(INTERVAL_S / 2, abs=0.03)
    stopped_with = len(pings)
    await asyncio.sleep(0.3)
    notify_socket.flush()
    assert len(notify_socket.times_of("WATCHDOG=1")) == stopped_with, "stop() ends the pings"


async def test_watchdog_pings_stop_while_the_loop_is_blocked(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", str(int(INTERVAL_S * 1e6)))
    pinger = sdnotify.WatchdogPinger()
    pinger.start()
    # A few pings while the loop is free, however busy the machine is.
    await asyncio.to_thread(
        notify_socket.wait_until, lambda: len(notify_socket.times_of("WATCHDOG=1")) >= 3
    )
    blocked_at = time.monotonic()
    # A handler doing blocking work on the loop: the daemon is wedged (on purpose here).
    time.sleep(1.0)  # noqa: ASYNC251
    unblocked_at = time.monotonic()
    # The loop is free again: pings resume.
    await asyncio.to_thread(
        notify_socket.wait_until,
        lambda: any(at > unblocked_at for at in notify_socket.times_of("WATCHDOG=1")),
    )
    await pinger.stop()
    notify_socket.flush()
    pings = notify_socket.times_of("WATCHDOG=1")
    assert [at for at in pings if blocked_at + 0.05 < at < unblocked_at] == []
    assert any(at < blocked_at for at in pings) and any(at > unblocked_at for at in pings)
    # The gap systemd sees is far past WatchdogSec=: it would restart the daemon.
    assert max(b - a for a, b in itertools.pairwise(pings)) > 4 * INTERVAL_S
