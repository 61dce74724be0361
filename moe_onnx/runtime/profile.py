"""What one decode step runs: the kernels onnxruntime executes after its graph optimizations.

``moe-onnx inspect --step-nodes`` prints their count by op type; ``python -m
studies.step_profile`` adds where the step's time goes. The count is of kernels
really run (fused ops count once, a MatMulNBits is one node), which is what a step pays per
node in dispatch cost, not the exported graph's node count.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_onnx.contract import positions_from_mask


@dataclass(frozen=True)
class StepProfile:
    """The kernels of one decode step at ``context`` positions: ``(op type, node name, µs)``."""

    context: int
    kernels: list[tuple[str, str, float]]

    @property
    def nodes(self) -> int:
        return len(self.kernels)

    def by_op(self) -> list[tuple[str, int, float]]:
        """``(op type, kernels, µs)``, the most expensive first."""
        count, micros = Counter(), Counter()
        for op, _, us in self.kernels:
            count[op] += 1
            micros[op] += us
        return sorted(((op, count[op], micros[op]) for op in count), key=lambda r: -r[2])


def profile_step(out, context: int = 128, threads: int | None = None, steps: int = 3,
                 provider: str = "cpu") -> StepProfile:
    """Load the export ``out`` with onnxruntime's profiler on, build a ``context``-token cache and
    run ``steps`` decode steps (the runtime's own step: ``logits_to_keep`` = 1, its cache
    binding); the kernels of the last one (the earlier ones warm up)."""
    from moe_onnx.runtime.session import Session

    with tempfile.TemporaryDirectory(prefix="moe-onnx-profile-") as tmp:
        session = Session(out, provider=provider, threads=threads, profile_prefix=str(Path(tmp) / "step"))
        rng = np.random.default_rng(0)
        vocab = session.info.vocab_size
        ids = rng.integers(0, vocab, (1, context))
        cache = session.empty_cache(1, capacity=context + 1)
        mask = np.ones((1, context), np.int64)
        _, cache = session.step(ids, mask, positions_from_mask(mask, context), cache, 1)
        mask = np.ones((1, context + 1), np.int64)
        positions = positions_from_mask(mask, 1)
        for _ in range(steps):  # each from the same past: the same step, timed again
            session.step(rng.integers(0, vocab, (1, 1)), mask, positions, cache, 1)
        events = json.loads(Path(session.inference_session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    last = runs[-1]
    start, end = last["ts"], last["ts"] + last["dur"]
    kernels = [
        (e["args"].get("op_name", "?"), e["name"].removesuffix("_kernel_time"), float(e["dur"]))
        for e in events
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and start <= e["ts"] <= end
    ]
    return StepProfile(context, kernels)
