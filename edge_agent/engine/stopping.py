"""Stop strings: cut the text at the first stop sequence, holding back what might start one."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feeds text deltas; releases text that can no longer be part of a stop sequence."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""
        self.matched: str | None = None

    def feed(self, delta: str) -> str:
        """Text safe to send now; after a match, ``matched`` is set and nothing more is sent."""
        if not self._stops:
            return delta
        if self.matched is not None:
            return ""
        text = self._held + delta
        cut = -1
        for stop in self._stops:
            at = text.find(stop)
            if at != -1 and (cut == -1 or at < cut):
                cut, self.matched = at, stop
        if cut != -1:
            self._held = ""
            return text[:cut]
        hold = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """What is still held back when the sequence ends without a match."""
        held, self._held = self._held, ""
        return held
