"""The decoder graph's input/output names (the export contract in DESIGN.md) and the feeds of a
first step with an empty KV cache. numpy only: shared by the exporter, runtime and benchmarks."""

from __future__ import annotations

import numpy as np

TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")


def past_names(num_layers: int) -> list[str]:
    """``past_key_values.{i}.key``, ``past_key_values.{i}.value`` for every layer, in graph order."""
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def prefill_feeds(ids, num_layers: int, kv_heads: int, head_dim: int, kv_dtype=np.float32) -> dict:
    """Feeds for ``ids`` [B, S] with no padding and an empty cache (past length 0)."""
    ids = np.asarray(ids, dtype=np.int64)
    empty = np.zeros((ids.shape[0], kv_heads, 0, head_dim), kv_dtype)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()}
    feeds.update({name: empty for name in past_names(num_layers)})
    return feeds
