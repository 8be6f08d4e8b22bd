"""systemd's notify protocol over ``NOTIFY_SOCKET``: readiness, status and the watchdog.

A datagram per message, no extra package. Everything is a no-op outside systemd.
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
    # A leading '@' names a socket in the abstract namespace.
    return "\0" + path[1:] if path.startswith("@") else path


def notify(message: str) -> bool:
    """Send one notification (``READY=1``, ``STATUS=...``); False when not under systemd."""
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)  # a datagram to a local socket never waits long
            sock.sendto(message.encode(), address)
        return True
    except OSError as exc:
        log.warning("sd_notify_failed", message=message, error=str(exc))
        return False


def ready(status: str = "serving") -> bool:
    return notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")


def stopping(status: str = "stopping") -> bool:
    return notify(f"STOPPING=1\nSTATUS={status}")


def reloading() -> bool:
    # systemd 253+ wants the monotonic time with RELOADING=1 (Type=notify-reload).
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def watchdog_interval() -> float | None:
    """Seconds between pings systemd expects, or None when the watchdog is off for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6
    except ValueError:
        return None


class WatchdogPinger:
    """Pings ``WATCHDOG=1`` from the event loop at half the interval.

    The pings come from the loop itself on purpose: a wedged loop stops pinging, and
    systemd restarts the daemon.
    """

    def __init__(self, interval_s: float | None = None) -> None:
        self.interval_s = interval_s if interval_s is not None else watchdog_interval()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval_s and self._task is None:
            self._task = asyncio.create_task(self._run(), name="sd-watchdog")

    async def _run(self) -> None:
        assert self.interval_s
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(self.interval_s / 2)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
