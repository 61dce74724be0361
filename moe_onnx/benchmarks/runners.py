"""What the suite times: one forward pass of a prefill, or one decode step at a fixed context.

A decode step is a one-token forward with a KV cache of exactly ``context`` tokens: the past is
built once by a prefill (:meth:`Runner.prepare_decode`), then every timed step feeds a new random
token against that same past, so every sample measures the same context length. EOS is never
checked. Every call returns its wall time in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from moe_onnx.benchmarks.timing import timed
from moe_onnx.contract import positions_from_mask
from moe_onnx.runtime import KVCache, Session


class Runner(Protocol):
    """One model on one engine."""

    def prefill(self, ids: np.ndarray) -> float: ...

    def prepare_decode(self, context_ids: np.ndarray) -> None: ...

    def decode_step(self, context: int, token: np.ndarray) -> float: ...


class OnnxRunner:
    """A moe-onnx export on the runtime's own step path, :meth:`moe_onnx.runtime.Session.step`.

    That is the graph run of every generation step, input binding included, with the runtime's
    KV cache: on CUDA the cache and the logits stay on the GPU (I/O binding), on CPU they are the
    numpy arrays onnxruntime returns. ``Session.forward``'s input checks and host copy of every
    position's logits are not timed. onnxruntime's ``Run`` waits for the device before it returns.
    """

    def __init__(self, session: Session, max_chunk: int | None = None):
        self.session = session
        # build decode pasts by chunked prefill (bounds the weight-gather's memory)
        self.max_chunk = max_chunk
        self.pasts: dict[int, KVCache] = {}  # context length -> its cache, on the session's device

    def _step(self, ids_BS: np.ndarray, cache: KVCache) -> tuple[float, KVCache]:
        mask_BT = np.ones((ids_BS.shape[0], cache.length + ids_BS.shape[1]), np.int64)
        positions_BS = positions_from_mask(mask_BT, ids_BS.shape[1])
        # The last position's logits only, as generation asks for them (logits_to_keep = 1).
        took, (_, cache) = timed(self.session.step, ids_BS, mask_BT, positions_BS, cache, 1)
        return took, cache

    def prefill(self, ids: np.ndarray) -> float:
        return self._step(ids, self.session.empty_cache(ids.shape[0], capacity=ids.shape[1]))[0]

    def prepare_decode(self, context_ids: np.ndarray) -> None:
        chunk = self.max_chunk or context_ids.shape[1]
        # A static cache sized for the context and the token each decode step adds (and drops).
        cache = self.session.empty_cache(context_ids.shape[0], capacity=context_ids.shape[1] + 1)
        for start in range(0, context_ids.shape[1], chunk):
            _, cache = self._step(context_ids[:, start:start + chunk], cache)
        self.pasts[context_ids.shape[1]] = cache

    def decode_step(self, context: int, token: np.ndarray) -> float:
        return self._step(token, self.pasts[context])[0]  # the new cache is dropped: the past stays


def onnx_runner(out: Path, provider: str, threads: int, max_chunk: int | None = None,
                tf32: bool = True) -> OnnxRunner:
    """The export in ``out`` loaded by the runtime on ``provider`` (``cpu`` | ``cuda`` | ``openvino``
    | ``webgpu``) with ``threads`` intra-op threads; a ``ProviderError`` when onnxruntime does not
    place it there. ``wasm``: onnxruntime-web in Node (:class:`moe_onnx.benchmarks.wasm.WasmRunner`).

    ``tf32`` defaults to onnxruntime's own CUDA default (on); the runtime's default is off.
    """
    if provider == "wasm":
        from moe_onnx.benchmarks.wasm import WasmRunner

        return WasmRunner(out, threads)
    session = Session(out, provider=provider, threads=threads, tf32=tf32)
    return OnnxRunner(session, max_chunk)
