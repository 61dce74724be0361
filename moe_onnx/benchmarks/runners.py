"""What the suite times: one forward pass of a prefill, or one decode step at a fixed context.

A decode step is a one-token forward with a KV cache of exactly ``context`` tokens: the past is
built once by a prefill (:meth:`Runner.prepare_decode`), then every timed step feeds a new random
token against that same past, so every sample measures the same context length. EOS is never
checked. Every call returns its wall time in seconds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import numpy as np

from moe_onnx import dtypes
from moe_onnx.contract import past_names, present_names


class Runner(Protocol):
    """One model on one engine."""

    def prefill(self, ids: np.ndarray) -> float: ...

    def prepare_decode(self, context_ids: np.ndarray) -> None: ...

    def decode_step(self, context: int, token: np.ndarray) -> float: ...


def ort_session(path: Path, providers: list[str], threads: int):
    """An onnxruntime session with ``threads`` intra-op threads; checks the provider really in use."""
    import onnxruntime as ort

    from moe_onnx.runtime.providers import ProviderError

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=providers)
    if session.get_providers()[0] != providers[0]:
        raise ProviderError(f"onnxruntime fell back from {providers[0]} to {session.get_providers()[0]} for {path}")
    return session


class OnnxRunner:
    """A moe-onnx export (the graph contract's inputs) on one session, through IO binding.

    The decode past stays on the session's device (``cuda`` or ``cpu``) between steps, as a
    runtime's KV cache would; outputs are left on the device.
    """

    def __init__(self, session, spec: dict, dtype: str, device: str = "cpu", max_chunk: int | None = None):
        self.session, self.spec, self.device = session, spec, device
        self.max_chunk = max_chunk  # build decode pasts by chunked prefill (bounds the weight-gather's memory)
        self.kv_dtype = dtypes.get(dtype).numpy
        self.output_names = [o.name for o in session.get_outputs()]
        self.pasts: dict[int, list] = {}  # context length -> past key/values on the device

    def _past_names(self) -> list[str]:
        return past_names(self.spec["num_layers"])

    def _run(self, ids: np.ndarray, past_len: int, past: list | None):
        import onnxruntime as ort

        binding = self.session.io_binding()
        total = past_len + ids.shape[1]
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((ids.shape[0], total), np.int64))
        binding.bind_cpu_input("position_ids", np.broadcast_to(np.arange(past_len, total), ids.shape).copy())
        for i, name in enumerate(self._past_names()):
            if past is None:
                empty = np.zeros((ids.shape[0], self.spec["num_kv_heads"], 0, self.spec["head_dim"]), self.kv_dtype)
                past_i = ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0)
            else:
                past_i = past[i]
            binding.bind_ortvalue_input(name, past_i)
        for name in self.output_names:
            binding.bind_output(name, self.device)
        start = time.perf_counter()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return time.perf_counter() - start, binding.get_outputs()

    def prefill(self, ids: np.ndarray) -> float:
        return self._run(ids, 0, None)[0]

    def prepare_decode(self, context_ids: np.ndarray) -> None:
        presents = present_names(self.spec["num_layers"])
        chunk = self.max_chunk or context_ids.shape[1]
        past = None
        for start in range(0, context_ids.shape[1], chunk):
            _, outputs = self._run(context_ids[:, start:start + chunk], start, past)
            by_name = dict(zip(self.output_names, outputs, strict=True))
            past = [by_name[name] for name in presents]
        self.pasts[context_ids.shape[1]] = past

    def decode_step(self, context: int, token: np.ndarray) -> float:
        return self._run(token, context, self.pasts[context])[0]
