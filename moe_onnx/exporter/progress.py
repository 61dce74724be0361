"""Progress of writing an export's weights: tensors and bytes done, rate and ETA, on stderr.

Weights are read, converted and written one tensor at a time by ``onnx_ir.save``, which calls
``callback(tensor, info)`` just before it writes each external tensor; the line is redrawn in
place (carriage return) at most every ``interval`` seconds and ends with a summary line.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

import onnx_ir as ir


def enabled(progress: bool | None, stream: TextIO | None = None) -> bool:
    """``progress`` as given, or (None) whether the stream, stderr by default, is a terminal."""
    if progress is not None:
        return progress
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def external_tensors(model: ir.Model, size_threshold_bytes: int) -> list[ir.TensorProtocol]:
    """The initializers that ``ir.save`` writes to external data (the same rule as onnx_ir's)."""
    return [
        v.const_value
        for graph in model.graphs()
        for v in graph.initializers.values()
        if v.const_value is not None and v.const_value.nbytes > size_threshold_bytes
    ]


class WeightProgress:
    """A callback for ``onnx_ir.save``: counts tensors and bytes written and draws one line."""

    def __init__(self, total_tensors: int, total_bytes: int, stream: TextIO | None = None,
                 interval: float = 0.2, clock=time.monotonic):
        self.total_tensors, self.total_bytes = total_tensors, total_bytes
        self.tensors = self.bytes = 0  # written so far
        self._stream = stream or sys.stderr
        self._interval, self._clock = interval, clock
        self._start = clock()
        self._last_draw: float | None = None
        self._calls = 0
        self._pending = 0  # bytes of the tensor being written now
        self._width = 0  # of the line on screen

    def __call__(self, tensor: ir.TensorProtocol, info=None) -> None:
        """Called before ``tensor`` is written: the one before it is complete."""
        self._complete_pending()
        self._calls += 1
        self._pending = tensor.nbytes
        now = self._clock()
        if self._last_draw is None or now - self._last_draw >= self._interval:
            self._draw(self._line(now), end="")
            self._last_draw = now

    def finish(self) -> None:
        """All tensors are written: the summary line."""
        self._complete_pending()
        elapsed = max(self._clock() - self._start, 1e-9)
        self._draw(f"wrote weights: {self.tensors} tensors, {_bytes(self.bytes)} in {elapsed:.1f} s "
                   f"({self.bytes / elapsed / 1e6:.0f} MB/s)", end="\n")

    def abort(self) -> None:
        """The write failed: end the line so that an error message starts on its own line."""
        if self._width:
            self._stream.write("\n")
            self._stream.flush()
            self._width = 0

    def _complete_pending(self) -> None:
        self.tensors, self.bytes, self._pending = self._calls, self.bytes + self._pending, 0

    def _line(self, now: float) -> str:
        elapsed = now - self._start
        rate = self.bytes / elapsed if elapsed > 0 else 0.0
        line = (f"writing weights: {self.tensors}/{self.total_tensors} tensors, "
                f"{_bytes(self.bytes)}/{_bytes(self.total_bytes)}")
        if rate > 0:
            eta = (self.total_bytes - self.bytes) / rate
            line += f", {rate / 1e6:.0f} MB/s, ETA {_duration(eta)}"
        return line

    def _draw(self, line: str, end: str) -> None:
        pad = " " * max(self._width - len(line), 0)  # wipe the rest of a longer previous line
        self._stream.write(f"\r{line}{pad}{end}")
        self._stream.flush()
        self._width = 0 if end else len(line)


@contextmanager
def weight_progress(model: ir.Model, show: bool, size_threshold_bytes: int,
                    stream: TextIO | None = None) -> Iterator[WeightProgress | None]:
    """The callback to pass to ``ir.save`` (None when not shown); the summary line on success."""
    if not show:
        yield None
        return
    tensors = external_tensors(model, size_threshold_bytes)
    bar = WeightProgress(len(tensors), sum(t.nbytes for t in tensors), stream)
    try:
        yield bar
    except BaseException:
        bar.abort()
        raise
    bar.finish()


def _bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
