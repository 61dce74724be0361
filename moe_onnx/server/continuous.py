"""Continuous batching: requests join the running batch between decode steps and leave it as soon
as they end, so no request waits for another's completion.

Legend: B rows decoding, T the batch's cached positions (its longest row's), V vocabulary.

Each turn of the decode thread:

1. admits waiting jobs while fewer than ``max_batch`` rows decode or prefill;
2. prefills at most ``prefill_chunk`` prompt tokens of the admitted jobs, oldest first, each job
   alone on its own cache: a long prompt takes several turns, so the running rows wait at most
   one chunk per token. A job starts from the cache of the longest prefix it shares with an
   earlier prompt (:mod:`moe_onnx.server.prefix_cache`; all of its prompt but the last token at
   most, whose logits pick its first token) and prefills only the rest. A job whose prompt is done
   leaves its prompt's cache there, picks its first token and joins the batch
   (:mod:`moe_onnx.server.kv_rows`: left-padded to the longest row);
3. runs one decode step of every row: its last token at its own position (its own count of
   tokens), the mask hiding each row's left padding;
4. retires the rows that ended (EOS, a stop string, their limit) or were cancelled, slicing them
   out of the cache, and keeps each one's conversation so far (prompt and answer) in the prefix
   cache: a next turn reuses the answer too.

Every row samples with its own generator, seeded as ``Session.generate`` seeds its own, and picks
with the same :func:`~moe_onnx.runtime.sampling.sample`: greedy and seeded answers are those of
the request alone, whatever shares its steps. :attr:`ContinuousScheduler.compositions` records
the rows (job numbers) of each decode step whenever they change; ``stats`` counts the prefixes
reused (``prefix_hits``, ``prefix_tokens_reused``) and the bytes the prefix cache holds.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from moe_onnx.runtime.cache import KVCache
from moe_onnx.runtime.sampling import SamplingConfig, sample
from moe_onnx.server import kv_rows
from moe_onnx.server.batching import Failure, Job, Row, SchedulerBase
from moe_onnx.server.prefix_cache import PrefixCache

log = logging.getLogger(__name__)

COMPOSITIONS_KEPT = 1000


@dataclass(eq=False)
class _Slot:
    """One job's row: its events, its sampling, and where it stands in the cache."""

    row: Row
    sampling: SamplingConfig
    rng: np.random.Generator
    length: int = 0  # this row's positions in the cache
    next_id: int = 0  # its last token, fed at the next step

    @property
    def job(self) -> Job:
        return self.row.job

    @property
    def ended(self) -> bool:
        return self.row.done or self.job.cancelled

    def take(self, logits_V: np.ndarray) -> bool:
        """Pick this row's next token from its logits and send it; whether it was sent."""
        self.next_id = int(sample(logits_V[None], self.sampling, self.rng)[0])
        if self.ended:
            return False
        self.row.push(self.next_id)
        return True


@dataclass(eq=False)
class _Prefill:
    slot: _Slot
    cache: KVCache | None = None  # made at the first chunk: empty, or a cached prefix
    done: int = 0  # prompt tokens in ``cache``


class ContinuousScheduler(SchedulerBase):
    """Decodes the jobs of one session in a batch that they join and leave between steps."""

    def __init__(self, session, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 256,
                 prefix_cache_bytes: int = 0):
        super().__init__(session, max_batch, max_queue)
        self.prefill_chunk = prefill_chunk
        # A recurrent state holds a whole prefix, not a position each: a hybrid model's rows reuse none.
        recurrent = bool(getattr(getattr(session, "info", None), "state_names", ()))
        kept = prefix_cache_bytes > 0 and not recurrent
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if kept else None
        self.stats.update(prefix_hits=0, prefix_tokens_reused=0, prefix_cache_bytes=0)
        self._slots: list[_Slot] = []
        self._prefills: list[_Prefill] = []
        self._cache: KVCache | None = None
        self.compositions: deque[tuple[int, ...]] = deque(maxlen=COMPOSITIONS_KEPT)

    def _loop(self) -> None:
        while self._wait_for_work():
            try:
                self._turn()
            except Exception as err:  # noqa: BLE001 - one bad step must not end the thread
                log.exception("moe-onnx serve: a decode step of %d rows failed", len(self._slots))
                self._fail(self._slots, Failure(f"generation failed: {type(err).__name__}: {err}"))
                self._slots, self._cache = [], None
                self._set_running()
        self._fail([*self._slots, *(p.slot for p in self._prefills)],
                   Failure("the server is shutting down", 503))
        self._slots, self._prefills, self._cache = [], [], None
        self._set_running()

    def _wait_for_work(self) -> bool:
        with self._cv:
            while not (self._waiting or self._slots or self._prefills or self._closed):
                self._cv.wait()
            return not self._closed

    def _turn(self) -> None:
        self._admit()
        self._join(self._prefill())
        self._retire()
        if self._slots:
            self._decode()
            self._retire()

    def _admit(self) -> None:
        with self._cv:
            while self._waiting and len(self._slots) + len(self._prefills) < self.max_batch:
                job = self._waiting.popleft()
                s = job.sampling
                slot = _Slot(Row(job, self.session.tokenizer, self.session.info.eos_ids),
                             SamplingConfig(s.temperature, s.top_k, s.top_p), np.random.default_rng(s.seed))
                self._prefills.append(_Prefill(slot))
                self.stats["rows"] += 1
            self.running = len(self._slots) + len(self._prefills)

    def _prefill(self) -> list[_Prefill]:
        """Up to ``prefill_chunk`` prompt tokens, oldest job first; the prefills now complete."""
        budget, complete = self.prefill_chunk, []
        for p in list(self._prefills):
            if p.slot.job.cancelled:
                self._prefills.remove(p)
                continue
            if budget == 0:
                break
            try:
                if p.cache is None:
                    self._start(p)
                n = min(budget, len(p.slot.job.prompt_ids) - p.done)
                budget -= n
                logits_V = self._chunk(p, n)
                if logits_V is not None:
                    self._keep(p)
            except Exception as err:  # noqa: BLE001 - this job fails, the batch goes on
                log.exception("moe-onnx serve: a prefill of %d tokens failed", len(p.slot.job.prompt_ids))
                self._prefills.remove(p)
                self._fail([p.slot], Failure(f"generation failed: {type(err).__name__}: {err}"))
                continue
            if logits_V is not None:
                self._prefills.remove(p)
                self.stats["tokens"] += p.slot.take(logits_V)
                complete.append(p)
        return complete

    def _start(self, p: _Prefill) -> None:
        """``p``'s cache before its first chunk: the longest cached prefix of its prompt but the
        last token, or none."""
        empty = self.session.empty_cache(1)
        prompt = p.slot.job.prompt_ids
        reused, layers = self.prefix_cache.longest(prompt[:-1]) if self.prefix_cache else (0, None)
        p.cache = kv_rows.rebuilt(layers, empty) if reused else empty
        p.done = p.slot.length = reused
        self.stats["prefix_hits"] += reused > 0
        self.stats["prefix_tokens_reused"] += reused

    def _keep(self, p: _Prefill) -> None:
        # ``holds`` first: a prompt already kept whole costs no copy of a device cache
        if self.prefix_cache is not None and not self.prefix_cache.holds(p.slot.job.prompt_ids):
            self._store(p.slot.job.prompt_ids, kv_rows.on_host(p.cache))

    def _keep_ended(self, rows: list[int]) -> None:
        """The conversation so far of each of ``rows`` (its prompt and the tokens it fed), so that
        a next turn reuses the answer too; a failure here only loses the entries."""
        fed = [(b, _fed(self._slots[b])) for b in rows]
        fed = [(b, ids) for b, ids in fed if ids and not self.prefix_cache.holds(ids)]
        if not fed:
            return
        try:
            host = kv_rows.on_host(self._cache)
            for b, ids in fed:
                self._store(ids, kv_rows.row(host, b, len(ids)))
        except Exception:  # noqa: BLE001 - the cache is an optimization: the rows are done already
            log.exception("moe-onnx serve: keeping %d ended rows in the prefix cache failed", len(fed))

    def _store(self, ids: list[int], layers: kv_rows.HostLayers) -> None:
        self.prefix_cache.store(ids, layers)
        self.stats["prefix_cache_bytes"] = self.prefix_cache.bytes

    def _chunk(self, p: _Prefill, n: int) -> np.ndarray | None:
        """The next ``n`` prompt tokens of ``p`` into its cache (positions and mask go on from the
        cached ones); the last position's logits once the prompt is done."""
        start, prompt = p.done, p.slot.job.prompt_ids
        logits_11V, p.cache = self.session.forward(
            np.array([prompt[start:start + n]], np.int64), np.ones((1, start + n), np.int64),
            np.arange(start, start + n, dtype=np.int64)[None], p.cache, logits_to_keep=1)
        p.done = p.slot.length = start + n
        return logits_11V[0, -1] if p.done == len(prompt) else None

    def _join(self, prefills: list[_Prefill]) -> None:
        prefills = [p for p in prefills if not p.slot.ended]
        if not prefills:
            return
        caches = ([self._cache] if self._slots else []) + [p.cache for p in prefills]
        self._slots = [*self._slots, *(p.slot for p in prefills)]  # first: a failed join fails them too
        self._set_running()
        self._cache = kv_rows.join(caches, max(s.length for s in self._slots))

    def _retire(self) -> None:
        kept = [b for b, slot in enumerate(self._slots) if not slot.ended]
        if len(kept) == len(self._slots):
            return
        if self.prefix_cache is not None:
            self._keep_ended([b for b in range(len(self._slots)) if b not in kept])
        self._slots = [self._slots[b] for b in kept]
        self._cache = kv_rows.keep(self._cache, kept, max(s.length for s in self._slots)) if kept else None
        self._set_running()

    def _decode(self) -> None:
        slots = self._slots
        rows = tuple(s.job.number for s in slots)
        if not self.compositions or self.compositions[-1] != rows:
            self.compositions.append(rows)
        length_B = np.array([s.length for s in slots], np.int64)
        T = self._cache.length + 1
        mask_BT = (np.arange(T)[None] >= (T - 1 - length_B)[:, None]).astype(np.int64)
        ids_B1 = np.array([[s.next_id] for s in slots], np.int64)
        logits_B1V, self._cache = self.session.forward(ids_B1, mask_BT, length_B[:, None], self._cache,
                                                       logits_to_keep=1)
        self.stats["batches"] += 1  # here: decode steps
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(slots))
        for slot, logits_V in zip(slots, logits_B1V[:, -1], strict=True):
            slot.length += 1
            self.stats["tokens"] += slot.take(logits_V)

    def _fail(self, slots: list[_Slot], failure: Failure) -> None:
        for slot in slots:
            if not slot.ended:
                slot.row.done = True
                slot.job.sink(failure)

    def _set_running(self) -> None:
        with self._cv:
            self.running = len(self._slots) + len(self._prefills)


def _fed(slot: _Slot) -> list[int]:
    """The tokens in ``slot``'s cache: its prompt and those of its answer fed back (not the last
    one it picked); none where they do not add up."""
    prompt = slot.job.prompt_ids
    ids = prompt + slot.row.ids[:slot.length - len(prompt)]
    return ids if len(ids) == slot.length else []
