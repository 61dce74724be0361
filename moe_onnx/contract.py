"""The decoder graph's I/O contract: names, shapes, and the feeds of a first step.

numpy only: the graph builder, the exporter's verify, the runtime, genai_config and the
benchmarks all take the names from here. Legend: B batch, S new tokens, P past positions,
T = P + S, G kv heads, D head_dim, V vocabulary.

Inputs
    ``input_ids``                   int64 [B, S]
    ``attention_mask``              int64 [B, T]   1 = a real token, 0 = left padding
    ``position_ids``                int64 [B, S]   the mask's running count - 1 (see positions_from_mask)
    ``past_key_values.{i}.key``     [B, G, P, D]   for every layer i, in the compute dtype; P may be 0
    ``past_key_values.{i}.value``   [B, G, P, D]
    ``logits_to_keep``              int64 scalar, optional (default 0): logits of the last n positions
                                    only; 0 = every position. Generation asks for 1, perplexity for all;
                                    callers that do not know it (onnxruntime-genai) get every position.
Outputs
    ``logits``                      float32 [B, S, V] ([B, n, V] with logits_to_keep = n > 0)
    ``present.{i}.key`` / ``.value``  [B, G, T, D]

B, S and P are dynamic (``batch_size``, ``sequence_length``, ``past_sequence_length``;
``total_sequence_length`` for T). Left padding through ``attention_mask`` gives the same logits
as the unpadded sequence. These are the names Optimum, onnxruntime-genai and transformers.js use.
"""

from __future__ import annotations

import numpy as np

INPUT_IDS, ATTENTION_MASK, POSITION_IDS = "input_ids", "attention_mask", "position_ids"
TOKEN_INPUTS = (INPUT_IDS, ATTENTION_MASK, POSITION_IDS)
LOGITS = "logits"
LOGITS_TO_KEEP = "logits_to_keep"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
# Symbolic dimension names of the graph's inputs and outputs.
BATCH, SEQUENCE = "batch_size", "sequence_length"
PAST, TOTAL = "past_sequence_length", "total_sequence_length"
KEPT = "logits_sequence_length"  # S, or n when logits_to_keep = n > 0


def past_names(num_layers: int) -> list[str]:
    """``past_key_values.{i}.key``, ``past_key_values.{i}.value`` for every layer, in graph order."""
    return [name % i for i in range(num_layers) for name in (PAST_KEY, PAST_VALUE)]


def present_names(num_layers: int) -> list[str]:
    return [name % i for i in range(num_layers) for name in (PRESENT_KEY, PRESENT_VALUE)]


def positions_from_mask(mask_BT: np.ndarray, new: int) -> np.ndarray:
    """``position_ids`` of the last ``new`` positions: left padding gets 0, real tokens count up
    from 0 (as transformers computes them)."""
    return np.clip(np.cumsum(mask_BT, axis=1) - 1, 0, None)[:, mask_BT.shape[1] - new:]


def prefill_feeds(ids, num_layers: int, kv_heads: int, head_dim: int, kv_dtype=np.float32) -> dict:
    """Feeds for ``ids`` [B, S] with no padding and an empty cache (past length 0)."""
    ids = np.asarray(ids, dtype=np.int64)
    empty = np.zeros((ids.shape[0], kv_heads, 0, head_dim), kv_dtype)
    feeds = {INPUT_IDS: ids, ATTENTION_MASK: np.ones_like(ids),
             POSITION_IDS: np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()}
    feeds.update({name: empty for name in past_names(num_layers)})
    return feeds
