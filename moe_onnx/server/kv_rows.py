"""Rows of a concat KV cache joined and sliced, for continuous batching (and a row's cache to the
host and back, for the prefix cache).

Legend: B rows, G kv heads, T positions, D head_dim (the key's and the value's own G and D).

A row's positions are the last ``length`` of the batch's T (left padding; the attention mask
hides the rest), so rows of different lengths are joined by zero-padding each on the left to the
longest, and the positions no row uses any more are cut from the left. A device cache (OrtValues)
makes a round trip through the host here: a join or a retire costs a copy of the cache, a decode
step none. A hybrid model's recurrent states ``[B, ...]`` have no positions: rows are joined and
kept along the batch only.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from moe_onnx.runtime.cache import KVCache

HostLayers = list[tuple[np.ndarray, np.ndarray]]  # per layer (key [B, G, T, D], value [B, G, T, D])


def join(caches: list[KVCache], positions: int) -> KVCache:
    """One cache of every row of ``caches`` in order, each left-padded to ``positions``: each
    tensor written once into its place in one zeroed array (no padded copy, then a joined one)."""
    def joined(parts: list[np.ndarray]) -> np.ndarray:
        B, (_, G, _, D) = sum(t.shape[0] for t in parts), parts[0].shape
        out = np.zeros((B, G, positions, D), parts[0].dtype)
        row = 0
        for t in parts:
            out[row:row + t.shape[0], :, positions - t.shape[2]:] = t
            row += t.shape[0]
        return out

    layers = [tuple(joined([_host(c.layers[i][j]) for c in caches]) for j in (0, 1))
              for i in range(len(caches[0].layers))]
    states = [np.concatenate([_host(c.states[j]) for c in caches], axis=0)
              for j in range(len(caches[0].states))]
    return rebuilt(layers, caches[0], states)


def keep(cache: KVCache, rows: list[int], positions: int) -> KVCache:
    """The ``rows`` of ``cache``, their last ``positions`` only."""
    T = cache.length
    layers = [tuple(_host(t)[rows, :, T - positions:] for t in kv) for kv in cache.layers]
    return rebuilt(layers, cache, [_host(t)[rows] for t in cache.states])


def on_host(cache: KVCache) -> HostLayers:
    """Every layer's key and value as numpy arrays (OrtValues copied to the host)."""
    return [tuple(_host(t) for t in kv) for kv in cache.layers]


def row(layers: HostLayers, b: int, positions: int) -> HostLayers:
    """Row ``b`` of host ``layers``, its last ``positions``, as one row's arrays of its own (a
    view would keep the whole batch's arrays alive)."""
    return [tuple(t[b:b + 1, :, t.shape[2] - positions:].copy() for t in kv) for kv in layers]


def _host(t) -> np.ndarray:
    return t.numpy() if isinstance(t, ort.OrtValue) else t


def rebuilt(layers: HostLayers, like: KVCache, states=()) -> KVCache:
    """``layers`` (and recurrent ``states``) as a cache of the kind ``like`` is: numpy arrays, or
    OrtValues on its device."""
    device_values = isinstance(like.layers[0][0], ort.OrtValue)

    def tensor(t: np.ndarray):
        t = np.ascontiguousarray(t)
        return ort.OrtValue.ortvalue_from_numpy(t, like.device, 0) if device_values else t

    return KVCache([tuple(tensor(t) for t in kv) for kv in layers], like.device,
                   states=tuple(tensor(t) for t in states))
