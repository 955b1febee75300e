"""Stop strings over a stream of text pieces."""

from __future__ import annotations


class StopMatcher:
    """Releases streamed text, holding back just enough to cut it at the first stop string.

    A stop string may arrive split across pieces, so the tail that could still begin one is
    held until the next piece decides it.
    """

    def __init__(self, stops: list[str]):
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Adds a piece; returns the text now safe to release (up to a stop string, if found)."""
        if self.stopped:
            return ""
        self._pending += piece
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            released, self._pending = self._pending[:cut], ""
            return released
        keep = min(self._hold, len(self._pending))
        split = len(self._pending) - keep
        released, self._pending = self._pending[:split], self._pending[split:]
        return released

    def flush(self) -> str:
        """The held-back tail, once the stream has ended without a stop string."""
        released, self._pending = ("" if self.stopped else self._pending), ""
        return released
