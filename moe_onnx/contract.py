"""The decoder graph's I/O contract: names, shapes, and the feeds of a first step.

numpy only: the graph builder, the exporter's verify, the runtime, genai_config and the
benchmarks all take the names from here. Legend: B batch, S new tokens, P past positions,
T = P + S, G kv heads, D head_dim, V vocabulary; L and R the widths of MLA's latent and roped key.

Inputs
    ``input_ids``                   int64 [B, S]
    ``attention_mask``              int64 [B, T]   1 = a real token, 0 = left padding
    ``position_ids``                int64 [B, S]   the mask's running count - 1 (see positions_from_mask)
    ``past_key_values.{i}.key``     [B, G, P, D]   for every layer i, in the compute dtype; P may be 0
    ``past_key_values.{i}.value``   [B, G, P, D]
    ``num_logits_to_keep``          int64 scalar: logits of the last n positions only; 0 = every
                                    position. Generation asks for 1, perplexity for 0. Required (the
                                    name onnxruntime-genai and transformers.js feed): an optional
                                    input, an initializer with a default, is what the OpenVINO
                                    execution provider cannot bind. Exports before 2026-12-05 have
                                    the optional ``logits_to_keep`` instead (the runtime reads both).
Outputs
    ``logits``                      float32 [B, S, V] ([B, n, V] with num_logits_to_keep = n > 0)
    ``present.{i}.key`` / ``.value``  [B, G, T, D]

Multi-head latent attention (deepseek_v2; manifest ``kv_dims`` [[1, L], [1, R]])
    The cache holds what MLA needs to rebuild every head's key and value, never the expanded K/V:
    ``.key`` is the latent ``[B, 1, T, L]`` (``kv_lora_rank`` values after ``kv_a_layernorm``)
    and ``.value`` the roped key part ``[B, 1, T, R]`` (``qk_rope_head_dim``, shared by all
    heads), exactly the two tensors transformers' own cache holds for the family. The graph
    folds ``kv_b_proj`` into the queries and the heads' outputs, so no step expands the cache.
    Key and value differ in shape: each export records its own ``(heads, dim)`` pair for both in
    its manifest (``kv_dims``), which every reader takes instead of assuming ``[G, D]`` twice.

Static cache (``moe-onnx export --kv-cache static``; opset 24, manifest ``kv_cache: "static"``)
    ``past_key_values.{i}.key`` / ``.value`` and ``present.{i}.key`` / ``.value`` are
    [B, G, C, D]: a buffer of capacity C >= T (``cache_capacity``) whose first P positions hold
    the past. The graph writes the S new positions at P = T - S (``TensorScatter``) and attends
    over all C, masking positions >= T. Bind each ``present`` to its ``past`` buffer (I/O
    binding) and the update happens in place: a step copies no cache, whatever the context.
    ``attention_mask`` stays [B, T]: its length tells the graph P. Not onnxruntime-genai's
    contract (no genai_config.json is written for it).

Recurrent state (hybrid models; manifest spec ``layer_types``)
    Only the ``attention`` layers have ``past_key_values.{i}.*``. Every other layer i carries a
    fixed-size state instead, whatever the context: ``past_conv.{i}`` [B, C, K] (the last K inputs
    of its causal depthwise convolution, C its channels), plus for Mamba2 ``past_ssm.{i}``
    [B, heads, head_dim, state] and for Gated DeltaNet ``past_recurrent.{i}`` [B, v_heads,
    k_dim, v_dim]; outputs ``present_conv.{i}`` ... (``past`` becomes ``present``), the same shape.
    Zeros for a fresh sequence; in the compute dtype; rows independent. Padded (mask 0) positions of
    the new tokens leave a fresh state untouched: their inputs are zeroed, as transformers does.
    These are the names transformers.js and onnxruntime-genai read (LFM2: ``past_conv.{i}``).
    Graph order: the tokens, every attention past (layer order), every state (layer order); the
    outputs likewise after ``logits``.

B, S and P are dynamic (``batch_size``, ``sequence_length``, ``past_sequence_length``;
``total_sequence_length`` for T). Left padding through ``attention_mask`` gives the same logits
as the unpadded sequence. These are the names Optimum, onnxruntime-genai and transformers.js use.
"""

from __future__ import annotations

import numpy as np

INPUT_IDS, ATTENTION_MASK, POSITION_IDS = "input_ids", "attention_mask", "position_ids"
TOKEN_INPUTS = (INPUT_IDS, ATTENTION_MASK, POSITION_IDS)
LOGITS = "logits"
NUM_LOGITS_TO_KEEP = "num_logits_to_keep"
LOGITS_TO_KEEP = "logits_to_keep"  # its optional predecessor (exports before 2026-12-05)
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
PAST_CONV, PAST_SSM, PAST_RECURRENT = "past_conv.%d", "past_ssm.%d", "past_recurrent.%d"
# A recurrent layer's states, by its mixer (spec.LAYER_TYPES), in graph order.
STATES = {"conv": (PAST_CONV,), "mamba": (PAST_CONV, PAST_SSM),
          "linear_attention": (PAST_CONV, PAST_RECURRENT)}
# Symbolic dimension names of the graph's inputs and outputs.
BATCH, SEQUENCE = "batch_size", "sequence_length"
PAST, TOTAL = "past_sequence_length", "total_sequence_length"
CAPACITY = "cache_capacity"  # C of a static cache
KEPT = "logits_sequence_length"  # S, or n when num_logits_to_keep = n > 0


def attention_layers(num_layers: int, layer_types=()) -> list[int]:
    """The layers with a KV cache: all, or those whose ``layer_types`` entry is ``attention``."""
    return [i for i in range(num_layers) if not layer_types or layer_types[i] == "attention"]


def past_names(num_layers: int, layer_types=()) -> list[str]:
    """``past_key_values.{i}.key``, ``past_key_values.{i}.value`` for every attention layer, in
    graph order."""
    return [name % i for i in attention_layers(num_layers, layer_types) for name in (PAST_KEY, PAST_VALUE)]


def present_names(num_layers: int, layer_types=()) -> list[str]:
    return [present(name) for name in past_names(num_layers, layer_types)]


def state_names(layer_types=()) -> list[str]:
    """The recurrent layers' ``past_conv.{i}`` / ``past_ssm.{i}`` / ``past_recurrent.{i}``, in graph
    order (none for a model without ``layer_types``)."""
    return [name % i for i, kind in enumerate(layer_types) for name in STATES.get(kind, ())]


def cache_names(num_layers: int, layer_types=()) -> list[str]:
    """Every input the cache feeds, in graph order: the attention layers' keys and values, then the
    recurrent layers' states (each fed back from the output :func:`present` names)."""
    return [*past_names(num_layers, layer_types), *state_names(layer_types)]


def present(past_name: str) -> str:
    """The output that follows the input ``past_name``: ``past_key_values.3.key`` -> ``present.3.key``,
    ``past_conv.0`` -> ``present_conv.0``."""
    if past_name.startswith("past_key_values."):
        return "present." + past_name[len("past_key_values."):]
    return "present_" + past_name[len("past_"):]


def keep_all() -> dict:
    """The ``num_logits_to_keep`` feed that asks for every position's logits."""
    return {NUM_LOGITS_TO_KEEP: np.array(0, np.int64)}


def empty_states(batch: int, state_shapes: dict, dtype=np.float32) -> dict:
    """Zeroed recurrent states ``[batch, *shape]`` for ``state_shapes`` (name -> shape without the
    batch, e.g. ``ModelSpec.state_shapes()``)."""
    return {name: np.zeros((batch, *shape), dtype) for name, shape in state_shapes.items()}


def positions_from_mask(mask_BT: np.ndarray, new: int) -> np.ndarray:
    """``position_ids`` of the last ``new`` positions: left padding gets 0, real tokens count up
    from 0 (as transformers computes them)."""
    return np.clip(np.cumsum(mask_BT, axis=1) - 1, 0, None)[:, mask_BT.shape[1] - new:]


def is_static(past_shape) -> bool:
    """Whether a graph whose past inputs have this shape (``[B, G, P or C, D]``, e.g. from
    ``InferenceSession.get_inputs()[3].shape``) takes a static cache."""
    return len(past_shape) == 4 and past_shape[2] == CAPACITY


def empty_pasts(batch: int, num_layers: int, kv_dims, kv_dtype=np.float32, capacity: int = 0,
                layer_types=()) -> dict:
    """Every ``past_key_values.{i}.key`` / ``.value`` feed with no positions: ``[B, G, 0, D]``, or
    for a static cache a zeroed buffer ``[B, G, capacity, D]`` (zeros: positions beyond T are
    masked, but must be finite); ``kv_dims`` being the key's and the value's ``((G, D), (G, D))``,
    a manifest's ``kv_dims`` (MLA's latent and roped key differ)."""
    key, value = (np.zeros((batch, heads, capacity, dim), kv_dtype) for heads, dim in kv_dims)
    return {name: key if name.endswith(".key") else value for name in past_names(num_layers, layer_types)}


def prefill_feeds(ids, num_layers: int, kv_dims, kv_dtype=np.float32, static: bool = False,
                  layer_types=(), state_shapes=None, state_dtype=np.float32) -> dict:
    """Feeds for ``ids`` [B, S] with no padding and an empty cache (past length 0; a static
    cache gets a buffer of capacity S; zeroed recurrent states of ``state_shapes``); ``kv_dims``
    as :func:`empty_pasts` takes them."""
    ids = np.asarray(ids, dtype=np.int64)
    feeds = {INPUT_IDS: ids, ATTENTION_MASK: np.ones_like(ids),
             POSITION_IDS: np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy(), **keep_all()}
    feeds.update(empty_pasts(ids.shape[0], num_layers, kv_dims, kv_dtype, ids.shape[1] if static else 0,
                             layer_types))
    feeds.update(empty_states(ids.shape[0], state_shapes or {}, state_dtype))
    return feeds
