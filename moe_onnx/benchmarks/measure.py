"""The first bench draft's runner API, kept for callers written against it
(``moe_onnx.reference.demo``). New code uses :mod:`moe_onnx.benchmarks.runners`."""

from __future__ import annotations

import numpy as np

from moe_onnx.benchmarks import runners


class OnnxRunner:
    """``prefill(ids) -> (seconds, None)``; ``decode(context_ids, steps) -> [seconds]`` at a fixed context."""

    def __init__(self, session, spec: dict, kv_dtype=np.float32):
        dtype = "fp16" if kv_dtype == np.float16 else "fp32"
        self.runner = runners.OnnxRunner(session, spec, dtype)
        self.vocab = spec["vocab_size"]

    def prefill(self, ids: np.ndarray) -> tuple[float, None]:
        return self.runner.prefill(ids), None

    def decode(self, context_ids: np.ndarray, steps: int, warmup: int = 1) -> list[float]:
        self.runner.prepare_decode(context_ids)
        rng = np.random.default_rng(context_ids.shape[1])
        context = context_ids.shape[1]
        times = [self.runner.decode_step(context, rng.integers(0, self.vocab, (context_ids.shape[0], 1)))
                 for _ in range(warmup + steps)]
        return times[warmup:]
