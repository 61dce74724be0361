"""Timing primitives: statistics, ONNX and PyTorch prefill/decode runners, memory bandwidth.

Every runner takes fixed random token ids; decode timings are single-token steps through the
KV cache starting at a given context length (EOS is never checked).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Stats:
    p50: float
    p90: float
    min: float
    n: int

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        s = sorted(seconds)
        return cls(statistics.median(s), s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))], s[0], len(s))


def copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Best-of memory bandwidth in GB/s of a large copy (bytes read + bytes written)."""
    src = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


class OnnxRunner:
    """Prefill and decode on one onnxruntime session with the export contract's inputs."""

    def __init__(self, session, spec: dict, kv_dtype=np.float32):
        self.session, self.spec, self.kv_dtype = session, spec, kv_dtype
        self.names = [o.name for o in session.get_outputs()]

    def _feeds(self, ids: np.ndarray, past: list, past_len: int) -> dict:
        total = past_len + ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], total), np.int64),
                 "position_ids": np.broadcast_to(np.arange(past_len, total), ids.shape).copy()}
        for i in range(self.spec["num_layers"]):
            feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        return feeds

    def prefill(self, ids: np.ndarray) -> tuple[float, list]:
        empty = np.zeros((ids.shape[0], self.spec["num_kv_heads"], 0, self.spec["head_dim"]), self.kv_dtype)
        start = time.perf_counter()
        outputs = self.session.run(self.names, self._feeds(ids, [empty] * (2 * self.spec["num_layers"]), 0))
        return time.perf_counter() - start, outputs

    def decode(self, context_ids: np.ndarray, steps: int, warmup: int = 1) -> list[float]:
        _, outputs = self.prefill(context_ids)
        past, length = outputs[1:], context_ids.shape[1]
        rng = np.random.default_rng(length)
        times = []
        for step in range(warmup + steps):
            token = rng.integers(0, self.spec["vocab_size"], size=(context_ids.shape[0], 1))
            feeds = self._feeds(token, past, length)
            start = time.perf_counter()
            outputs = self.session.run(self.names, feeds)
            if step >= warmup:
                times.append(time.perf_counter() - start)
            past, length = outputs[1:], length + 1
        return times


class TorchRunner:
    """The same model in PyTorch eager (transformers), no grad, its DynamicCache for decode."""

    def __init__(self, model, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.model, self.torch = model, torch

    def prefill(self, ids: np.ndarray) -> tuple[float, object]:
        with self.torch.no_grad():
            start = time.perf_counter()
            out = self.model(input_ids=self.torch.from_numpy(ids), use_cache=True)
            return time.perf_counter() - start, out.past_key_values

    def decode(self, context_ids: np.ndarray, steps: int, warmup: int = 1) -> list[float]:
        _, cache = self.prefill(context_ids)
        rng = np.random.default_rng(context_ids.shape[1])
        times = []
        with self.torch.no_grad():
            for step in range(warmup + steps):
                token = self.torch.from_numpy(rng.integers(0, self.model.config.vocab_size, size=(context_ids.shape[0], 1)))
                start = time.perf_counter()
                cache = self.model(input_ids=token, past_key_values=cache, use_cache=True).past_key_values
                if step >= warmup:
                    times.append(time.perf_counter() - start)
        return times


class PrefillOnlyRunner:
    """A graph that takes only ``input_ids`` (transformers' exporter used plainly): decode means
    recomputing the whole prefix for every new token."""

    def __init__(self, session):
        self.session = session

    def prefill(self, ids: np.ndarray) -> tuple[float, None]:
        start = time.perf_counter()
        self.session.run(["logits"], {"input_ids": ids})
        return time.perf_counter() - start, None

    def decode(self, context_ids: np.ndarray, steps: int, warmup: int = 1) -> list[float]:
        times = []
        ids = context_ids
        for step in range(warmup + steps):
            ids = np.concatenate([ids, ids[:, -1:]], axis=1)
            seconds, _ = self.prefill(ids)
            if step >= warmup:
                times.append(seconds)
        return times
