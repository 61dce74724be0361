"""Stop strings over streamed text: the one implementation, used by ``Session.generate`` and the
server's batches.

A stop string may arrive split over several tokens. While streaming, the last
``len(longest stop) - 1`` characters are held back (as vLLM does): a stop string that completes
later starts no earlier than that, so no part of one is ever sent.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopStrings:
    """Takes text deltas, returns the part that is safe to send; ``stopped`` once a stop string
    appeared, and then ``text`` ends just before it."""

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(s for s in stops if s)
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # everything seen so far, cut at the first stop string
        self.stopped = False
        self._sent = 0  # characters of ``text`` already returned

    def push(self, delta: str) -> str:
        """Add ``delta`` (ignored once stopped); return the newly safe text."""
        if self.stopped or not delta:
            return ""
        start = max(0, len(self.text) - self.holdback)  # a new stop must end inside ``delta``
        self.text += delta
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.text, self.stopped = self.text[:min(found)], True
            return self._release(len(self.text))
        return self._release(len(self.text) - self.holdback)

    def finish(self) -> str:
        """The text held back, when the stream ends without a stop string."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self._sent:
            return ""
        piece, self._sent = self.text[self._sent:end], end
        return piece
