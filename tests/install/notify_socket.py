"""The receiving end of NOTIFY_SOCKET, as systemd binds it, for the sd_notify tests."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


class NotifySocket:
    """A Unix datagram socket that records every message with its arrival time.

    It reads on its own thread, so it keeps recording while a test blocks the event loop.
    """

    def __init__(self, path: Path | str) -> None:
        self.address = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # '@name' is the abstract namespace: the name with a leading NUL, no file.
        self.sock.bind("\0" + self.address[1:] if self.address.startswith("@") else self.address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def texts(self) -> list[str]:
        return [message for _, message in self.messages]

    def times_of(self, text: str) -> list[float]:
        return [at for at, message in self.messages if message == text]

    def wait_for(self, line: str, timeout: float = 60) -> float:
        """When a message holding ``line`` arrived, waiting for it up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, message in list(self.messages):
                if line in message.splitlines():
                    return at
            time.sleep(0.02)
        raise TimeoutError(f"no {line!r} in {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
