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

Static cache (``moe-onnx export --kv-cache static``; opset 24, manifest ``kv_cache: "static"``)
    ``past_key_values.{i}.key`` / ``.value`` and ``present.{i}.key`` / ``.value`` are
    [B, G, C, D]: a buffer of capacity C >= T (``cache_capacity``) whose first P positions hold
    the past. The graph writes the S new positions at P = T - S (``TensorScatter``) and attends
    over all C, masking positions >= T. Bind each ``present`` to its ``past`` buffer (I/O
    binding) and the update happens in place: a step copies no cache, whatever the context.
    ``attention_mask`` stays [B, T]: its length tells the graph P. Not onnxruntime-genai's
    contract (no genai_config.json is written for it).

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
CAPACITY = "cache_capacity"  # C of a static cache
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


def is_static(past_shape) -> bool:
    """Whether a graph whose past inputs have this shape (``[B, G, P or C, D]``, e.g. from
    ``InferenceSession.get_inputs()[3].shape``) takes a static cache."""
    return len(past_shape) == 4 and past_shape[2] == CAPACITY


def empty_past(batch: int, kv_heads: int, head_dim: int, kv_dtype=np.float32,
               capacity: int = 0) -> np.ndarray:
    """A past with no positions: ``[B, G, 0, D]``, or for a static cache a zeroed buffer
    ``[B, G, capacity, D]`` (zeros: positions beyond T are masked, but must be finite)."""
    return np.zeros((batch, kv_heads, capacity, head_dim), kv_dtype)


def prefill_feeds(ids, num_layers: int, kv_heads: int, head_dim: int, kv_dtype=np.float32,
                  static: bool = False) -> dict:
    """Feeds for ``ids`` [B, S] with no padding and an empty cache (past length 0; a static
    cache gets a buffer of capacity S)."""
    ids = np.asarray(ids, dtype=np.int64)
    empty = empty_past(ids.shape[0], kv_heads, head_dim, kv_dtype, ids.shape[1] if static else 0)
    feeds = {INPUT_IDS: ids, ATTENTION_MASK: np.ones_like(ids),
             POSITION_IDS: np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()}
    feeds.update({name: empty for name in past_names(num_layers)})
    return feeds
