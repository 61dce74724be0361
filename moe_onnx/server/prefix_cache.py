"""Prompt (prefix) cache for continuous batching: the KV cache of earlier prompts (each kept when
its prefill ends, and again with its answer when its row ends), by their token ids, so that a
prompt sharing a prefix with one of them (a chat's system prompt, the conversation so far, answers
included) starts from that prefix's cache and prefills only the rest.

Legend: G kv heads, P a prompt's positions, L the positions shared with a new prompt, D head_dim
(the key's and the value's own G and D).

An entry is one prompt's cache of one row, per layer key and value ``[1, G, P, D]``, on the host
(numpy: a device cache is copied out when it is stored and back when it is reused). A lookup finds
the entry sharing the longest prefix with the new prompt, token by token, and hands out its first
L positions ``[:, :, :L]``: attention is causal, so a prefix's keys and values do not depend on
what follows it. Entries are bounded
in bytes and evicted least recently used first; a prompt inside a kept one is not kept twice, and
one that extends kept ones replaces them (a conversation's next turn supersedes its last).

A static-cache export has no prefix cache: its preallocated buffers are not shared, and it batches
whole (:class:`~moe_onnx.server.batching.Scheduler`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from moe_onnx.server.kv_rows import HostLayers as Layers  # here one row: [1, G, P, D] each


@dataclass(frozen=True, eq=False)
class _Entry:
    ids: np.ndarray  # [P] int64
    layers: Layers
    nbytes: int


class PrefixCache:
    """An LRU of prompts' KV caches, at most ``max_bytes`` of them. Used by one thread only."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, ids: list[int]) -> tuple[int, Layers | None]:
        """``(L, layers)``: the most positions L of ``ids`` some entry shares, and that entry's cache
        of them (views, ``[1, G, L, D]``); ``(0, None)`` when none shares a first token."""
        ids_T = np.asarray(ids, np.int64)
        best, found = 0, None
        for key, entry in self._entries.items():
            shared = _shared(entry.ids, ids_T)
            if shared > best:
                best, found = shared, key
        if found is None:
            return 0, None
        self._entries.move_to_end(found)
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in self._entries[found].layers]

    def holds(self, ids: list[int]) -> bool:
        """Whether some entry's prompt starts with all of ``ids`` (so storing them adds nothing)."""
        ids_T = np.asarray(ids, np.int64)
        return any(len(e.ids) >= len(ids_T) and _shared(e.ids, ids_T) == len(ids_T)
                   for e in self._entries.values())

    def store(self, ids: list[int], layers: Layers) -> None:
        """Keep ``layers``, the cache of exactly ``ids``, evicting the least recently used entries
        beyond the budget; a cache larger than the whole budget, or of a prompt inside a kept
        one, is not kept."""
        if self.holds(ids):
            return
        ids_T = np.asarray(ids, np.int64)
        nbytes = sum(k.nbytes + v.nbytes for k, v in layers)
        if nbytes > self.max_bytes:
            return
        for key in [k for k, e in self._entries.items() if _shared(e.ids, ids_T) == len(e.ids)]:
            self._drop(key)  # inside the new prompt: superseded by it
        self._entries[tuple(ids)] = _Entry(ids_T, layers, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.evictions += 1

    def _drop(self, key: tuple[int, ...]) -> None:
        self.bytes -= self._entries.pop(key).nbytes


def _shared(a_T: np.ndarray, b_T: np.ndarray) -> int:
    """How many first tokens ``a_T`` and ``b_T`` have in common."""
    n = min(len(a_T), len(b_T))
    differ = np.flatnonzero(a_T[:n] != b_T[:n])
    return int(differ[0]) if differ.size else n
