"""The receiving end of NOTIFY_SOCKET, as systemd binds it, for the sd_notify tests."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

_MARK = "edge-agent-test-flush="


class NotifySocket:
    """A Unix datagram socket that records every message with its arrival time.

    It reads on its own thread, so it keeps recording while a test blocks the event loop.
    Waiting is on conditions the reader signals, never on a guessed delay.
    """

    def __init__(self, path: Path | str) -> None:
        self.address = str(path)
        # '@name' is the abstract namespace: the name with a leading NUL, no file.
        self._bound = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self._bound)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._arrived = threading.Condition()
        self._marks = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            with self._arrived:
                self.messages.append((time.monotonic(), data.decode()))
                self._arrived.notify_all()

    def texts(self) -> list[str]:
        return [message for _, message in self.messages if not message.startswith(_MARK)]

    def times_of(self, text: str) -> list[float]:
        return [at for at, message in self.messages if message == text]

    def wait_until(self, condition: Callable[[], bool], timeout: float = 60) -> None:
        """Return once ``condition`` holds, checked each time a message arrives."""
        with self._arrived:
            if not self._arrived.wait_for(condition, timeout):
                raise TimeoutError(f"condition not met; messages so far: {self.messages}")

    def wait_for(self, line: str, timeout: float = 60) -> float:
        """When a message holding ``line`` arrived, waiting for it up to ``timeout``."""

        def arrival() -> float | None:
            return next((at for at, m in self.messages if line in m.splitlines()), None)

        self.wait_until(lambda: arrival() is not None, timeout)
        found = arrival()
        assert found is not None
        return found

    def flush(self) -> None:
        """Return once every datagram sent before this call has been read.

        A datagram socket delivers in order: when a marker sent now has arrived, so
        has everything before it.
        """
        mark = f"{_MARK}{next(self._marks)}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(mark.encode(), self._bound)
        self.wait_for(mark, timeout=10)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
