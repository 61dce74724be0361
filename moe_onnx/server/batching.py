"""Jobs, their rows' events, and the whole-batch scheduler; :mod:`moe_onnx.server.continuous`
holds the continuous one, which shares the queue here (:class:`SchedulerBase`).

Whole batches (:class:`Scheduler`: ``--batching whole``, and static-cache exports, whose
preallocated buffers are not merged): requests that arrive together decode together. One decode
thread per model takes the oldest waiting request and every other waiting one that can share its
batch (same sampling, see :attr:`Sampling.key`; the longest prompt plus the largest
``max_tokens`` inside the context), up to ``max_batch``, and runs one left-padded batched
``Session.generate`` for them. Each row then has its own limit, stop strings and cancellation
here (:class:`Row`); the batch ends when every row has. A request that arrives while a batch
runs waits for the next one (no joining a running batch). At most ``max_batch + max_queue``
requests are in at once (decoding or waiting); the next is refused at once (:class:`QueueFull`).

Nothing here knows HTTP or asyncio: a :class:`Job` reports to ``sink``, called on the decode
thread with :class:`Delta`, then one :class:`Finish` or :class:`Failure`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from moe_onnx.runtime.stops import StopStrings
from moe_onnx.runtime.tokenizer import StreamDecoder

# continuous: requests join and leave the running batch between decode steps; whole: a request
# waits for the running batch to end (what static-cache exports get either way)
BATCHING = ("continuous", "whole")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def key(self, job_id: int) -> tuple:
        """Jobs with equal keys may share a batch. Greedy rows ignore the sampling fields; a
        seeded job runs alone, so its tokens are those of ``Session.generate`` with its seed (one
        generator serves a whole batch)."""
        if self.greedy:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", job_id)
        return ("sampled", self.temperature, self.top_k, self.top_p)


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop" (EOS or a stop string) or "length"
    completion_tokens: int
    ids: list[int]


@dataclass(frozen=True)
class Failure:
    message: str
    status: int = 500


@dataclass(eq=False)
class Job:
    """One request: prompt ids, its limits, and where its events go."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    sink: Callable[[Delta | Finish | Failure], None]
    cancelled: bool = field(default=False, init=False)
    number: int = field(default=0, init=False)  # the scheduler's count of submitted jobs, from 1

    @property
    def key(self) -> tuple:
        return self.sampling.key(id(self))


class QueueFull(Exception):
    """``max_batch + max_queue`` requests are in already."""


class Closed(Exception):
    """The scheduler is shutting down."""


class Row:
    """One job's row in a running batch: counts its tokens, decodes its text, and sends only what
    no stop string can still claim (:class:`~moe_onnx.runtime.stops.StopStrings`)."""

    def __init__(self, job: Job, tokenizer, eos_ids: tuple[int, ...]):
        self.job, self.eos_ids = job, eos_ids
        self.decoder = StreamDecoder(tokenizer) if tokenizer else None
        self.stops = StopStrings(job.stop)
        self.ids: list[int] = []
        self.done = False

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        if token_id in self.eos_ids:
            return self.finish("stop")
        self._add(self.decoder.push(token_id) if self.decoder else "")
        if not self.done and len(self.ids) >= self.job.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if reason == "length" and self.decoder:
            self._add(self.decoder.flush())
        if self.done:  # a stop string in the flushed text
            return
        self.done = True
        self._send(self.stops.finish())
        self.job.sink(Finish(reason, len(self.ids), self.ids))

    def _add(self, delta: str) -> None:
        self._send(self.stops.push(delta))
        if self.stops.stopped and not self.done:
            self.done = True
            self.job.sink(Finish("stop", len(self.ids), self.ids))

    def _send(self, text: str) -> None:
        if text:
            self.job.sink(Delta(text))


class SchedulerBase:
    """The queue of one session's jobs and its decode thread (``_loop``, a subclass's)."""

    def __init__(self, session, max_batch: int = 8, max_queue: int = 64):
        self.session, self.max_batch, self.max_queue = session, max_batch, max_queue
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._submitted = 0
        self.running = 0
        self.stats = {"batches": 0, "rows": 0, "tokens": 0, "largest_batch": 0}

    # -- the request side -------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``, or refuse it at once: at most ``max_batch`` decode and ``max_queue``
        wait beyond a full batch."""
        with self._cv:
            if self._closed:
                raise Closed()
            if self.running + len(self._waiting) >= self.max_batch + self.max_queue:
                raise QueueFull()
            self._submitted += 1
            job.number = self._submitted
            self._waiting.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """The client left: drop the job if it waits; a running row stops at its next token."""
        job.cancelled = True
        with self._cv:
            if job in self._waiting:
                self._waiting.remove(job)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- the decode thread ------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="moe-onnx-decode", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Refuse new jobs, fail the waiting ones, end the running batch at its next token."""
        with self._cv:
            self._closed = True
            left, self._waiting = list(self._waiting), deque()
            self._cv.notify_all()
        for job in left:
            job.sink(Failure("the server is shutting down", 503))
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        raise NotImplementedError


class Scheduler(SchedulerBase):
    """Runs the jobs of one session in whole batches on one decode thread."""

    def __init__(self, session, max_batch: int = 8, max_queue: int = 64, gather_s: float = 0.005):
        super().__init__(session, max_batch, max_queue)
        self.gather_s = gather_s

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._decode(batch)
            except Exception as err:  # noqa: BLE001 - one bad batch must not end the thread
                log.exception("moe-onnx serve: a batch of %d failed", len(batch))
                for job in batch:
                    job.sink(Failure(f"generation failed: {type(err).__name__}: {err}"))
            finally:
                with self._cv:
                    self.running = 0

    def _next_batch(self) -> list[Job] | None:
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return None
                full = len(self._waiting) >= self.max_batch
            if not full and self.gather_s:  # let requests sent at the same moment arrive
                time.sleep(self.gather_s)
            with self._cv:
                batch = [] if self._closed else self._compatible()
                if batch or self._closed:
                    self.running = len(batch)
                    return batch or None

    def _compatible(self) -> list[Job]:
        """The oldest waiting job and those that may share its batch, in arrival order."""
        if not self._waiting:
            return []
        head = self._waiting[0]
        batch, longest, most = [], 0, 0
        for job in list(self._waiting):
            if len(batch) == self.max_batch:
                break
            fits = (max(longest, len(job.prompt_ids)) + max(most, job.max_tokens)
                    <= self.session.info.max_positions)
            if job.key == head.key and fits:
                batch.append(job)
                longest, most = max(longest, len(job.prompt_ids)), max(most, job.max_tokens)
        for job in batch:
            self._waiting.remove(job)
        return batch

    def _decode(self, batch: list[Job]) -> None:
        s = batch[0].sampling
        generation = self.session.generate(
            [job.prompt_ids for job in batch], max_new_tokens=max(job.max_tokens for job in batch),
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed, stream=True)
        rows = [Row(job, self.session.tokenizer, self.session.info.eos_ids) for job in batch]
        self._count(len(rows))
        tokens = iter(generation)
        try:  # closing the generator ends the runtime's loop: no step after the last live row
            for token in tokens:
                row = rows[token.row]
                if self._closed:
                    raise Closed()
                if not row.done and row.job.cancelled:
                    row.done = True
                elif not row.done:
                    row.push(token.id)
                    self.stats["tokens"] += 1
                if all(r.done for r in rows):
                    break
        except Closed:
            for row in rows:
                if not row.done:
                    row.job.sink(Failure("the server is shutting down", 503))
            return
        finally:
            tokens.close()
        for row in rows:
            if not row.done:  # the runtime stopped on its own: every row has reached its limit
                row.finish("length")

    def _count(self, size: int) -> None:
        self.stats["batches"] += 1
        self.stats["rows"] += size
        self.stats["largest_batch"] = max(self.stats["largest_batch"], size)
