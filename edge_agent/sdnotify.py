"""systemd's notify protocol over ``NOTIFY_SOCKET``: readiness, status and the watchdog.

A datagram per message, no extra package. Everything is a no-op outside systemd, so the
daemon calls these unconditionally.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time

import structlog

log = structlog.get_logger(__name__)


def _address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    # A leading '@' names a socket in the abstract namespace (a leading NUL byte).
    return "\0" + path[1:] if path.startswith("@") else path


def notify(state: str) -> bool:
    """Send one notification (``READY=1``, ``STATUS=...``); False when not under systemd."""
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never block the event loop: a full socket buffer drops this message instead
            # (the next watchdog ping or status makes up for it).
            sock.setblocking(False)
            sock.sendto(state.encode(), address)
        return True
    except OSError as exc:
        log.warning("sd_notify_failed", state=state, error=str(exc))
        return False


def ready(status: str = "serving") -> bool:
    """The service is up: with Type=notify, systemd considers the start done only now."""
    return notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")


def stopping(status: str = "stopping", extend_timeout_s: float | None = None) -> bool:
    """Shutdown began. ``extend_timeout_s``: ask systemd to wait at least that long from
    now before SIGKILL (systemd 236+), for a grace period longer than TimeoutStopSec=."""
    message = f"STOPPING=1\nSTATUS={status}"
    if extend_timeout_s is not None:
        message += f"\nEXTEND_TIMEOUT_USEC={int(extend_timeout_s * 1e6)}"
    return notify(message)


def reloading() -> bool:
    """A SIGHUP reload began; send ``ready()`` when it is done."""
    # systemd 253+ wants the monotonic time with RELOADING=1 (and ignores it otherwise).
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def watchdog_interval() -> float | None:
    """Seconds within which systemd expects a ping, or None when the watchdog is off for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    # WATCHDOG_PID names the process systemd watches; a child that inherited the
    # environment (a vLLM worker) must not ping on its parent's behalf.
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        seconds = int(usec) / 1e6
    except ValueError:
        return None
    return seconds if seconds > 0 else None


async def watchdog_task(interval_s: float | None = None) -> None:
    """Ping ``WATCHDOG=1`` every half interval, forever; returns at once when there is no watchdog.

    It runs on the event loop on purpose: if the loop is wedged (a blocking call in a
    handler), the pings stop and systemd restarts the daemon.
    """
    interval = interval_s if interval_s is not None else watchdog_interval()
    if not interval or not _address():
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval / 2)


class WatchdogPinger:
    """Owns the ``watchdog_task`` for the serve loop: ``start()`` after the loop runs,
    ``await stop()`` on shutdown."""

    def __init__(self, interval_s: float | None = None) -> None:
        self.interval_s = interval_s if interval_s is not None else watchdog_interval()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval_s and self._task is None:
            self._task = asyncio.create_task(watchdog_task(self.interval_s), name="sd-watchdog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
