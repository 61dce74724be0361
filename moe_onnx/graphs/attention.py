"""Causal self-attention with grouped KV heads and a KV cache, plus its additive mask.

Legend: B batch, S new tokens, P past tokens, T = P + S, H hidden, N query heads,
G key/value heads, R = N / G query heads per KV head, D head_dim.

Grouped-query attention never copies K/V: the R query heads that share a KV head are folded
into the row axis (``[B, G, R*S, D]``), so one MatMul per layer serves them all.

The cache is grown one of two ways (``kv_cache`` at export, see :mod:`moe_onnx.contract`):
``concat`` appends the new K/V to the past (``present`` is ``[B, G, T, D]``, a copy of the whole
past every step); ``static`` writes them at position P of a preallocated ``[B, G, C, D]`` buffer
with ``TensorScatter`` (opset 24) and attends over the whole buffer, positions >= T masked (with
the standard ``Attention`` op there, one node for scores, mask, softmax and values): with
``present`` bound to the ``past`` buffer the update is in place, so a step copies nothing.
Either cache may be stored narrower than the compute dtype (``kv_dtype`` fp16 under fp32
compute: half the bytes a step reads; K/V are cast on the way in and out).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from moe_onnx import weight_names as wn
from moe_onnx.graphs.context import GraphContext
from moe_onnx.graphs.norms import rms_norm
from moe_onnx.graphs.rope import apply_rope
from moe_onnx.spec import ModelSpec

ATTENTION_OPSET = 23  # the standard Attention op
_MASKED = -3.0e38  # finite: a fully padded query row stays finite after softmax


@dataclass(frozen=True)
class AttentionInputs:
    """What an attention sublayer reads besides its hidden states and its cache, shared by the
    layers of one kind: the additive mask (:func:`attention_bias`), the RoPE tables, and a static
    cache's write index (:func:`write_index`; None: the cache is appended to)."""

    bias: ir.Value
    cos: ir.Value | None  # None where no layer uses RoPE (NoPE models)
    sin: ir.Value | None
    write_B: ir.Value | None = None


def write_index(ctx: GraphContext, attention_mask_BT: ir.Value, input_ids_BS: ir.Value) -> ir.Value:
    """Where this step's tokens go in a static cache: P = T - S for every row, ``[B]`` int64."""
    op = ctx.op
    P = op.Sub(op.Shape(attention_mask_BT, start=1, end=2), op.Shape(input_ids_BS, start=1, end=2))
    return op.Expand(P, op.Shape(input_ids_BS, start=0, end=1))


def attention_bias(
    ctx: GraphContext, attention_mask_BT: ir.Value, input_ids_BS: ir.Value, spec: ModelSpec,
    window: int | None = None, capacity: ir.Value | None = None,
) -> ir.Value:
    """Additive float32 mask ``[B, 1, R*S, K]``: causal, left padding, optional sliding window
    (``window``; ``spec.sliding_window`` when None). Layers of one kind share it.

    The query at row s sits at absolute index P + s of the key axis, so causality is by index;
    padded keys are masked by ``attention_mask``. K is T, or the static cache's ``capacity``
    (``[1]`` int64), whose positions >= T are masked too.
    """
    window = spec.sliding_window if window is None else window
    op = ctx.op
    i64 = ir.DataType.INT64
    T = op.Shape(attention_mask_BT, start=1, end=2)
    S = op.Shape(input_ids_BS, start=1, end=2)
    P = op.Sub(T, S)
    zero, one = ctx.const(0, i64), ctx.const(1, i64)
    if capacity is not None:  # keys up to the buffer's end; those >= T get mask 0 (and are in the future)
        pads = op.Concat(ctx.const([0, 0, 0]), op.Sub(capacity, T), axis=0)
        attention_mask_BT, T = op.Pad(attention_mask_BT, pads), capacity
    q_idx_S1 = op.Unsqueeze(op.Range(op.Squeeze(P), op.Squeeze(op.Add(P, S)), one), ctx.const([1]))
    k_idx_1T = op.Unsqueeze(op.Range(zero, op.Squeeze(T), one), ctx.const([0]))
    allowed_ST = op.LessOrEqual(k_idx_1T, q_idx_S1)
    if window:
        allowed_ST = op.And(allowed_ST, op.Less(op.Sub(q_idx_S1, k_idx_1T), ctx.const(window, i64)))
    keep_B11T = op.Unsqueeze(op.Cast(attention_mask_BT, to=ir.DataType.BOOL), ctx.const([1, 2]))
    allowed_B1ST = op.And(op.Unsqueeze(allowed_ST, ctx.const([0, 1])), keep_B11T)
    f32 = ir.DataType.FLOAT
    bias = op.Where(allowed_B1ST, ctx.const(0.0, f32), ctx.const(_MASKED, f32))
    groups = spec.num_heads // spec.num_kv_heads
    if groups > 1 and not fused_attention(ctx, spec):  # the folded rows; the Attention op broadcasts
        bias = op.Tile(bias, ctx.const([1, 1, groups, 1]))
    return bias


def fused_attention(ctx: GraphContext, spec: ModelSpec) -> bool:
    """Whether the standard ``Attention`` op (opset 23) computes softmax(q k^T * scale + bias) v:
    from opset 24 (the static-cache export), unless attention sinks need the spelled-out softmax
    or the attention is MLA's (graphs/mla.py: two score MatMuls over the latent cache)."""
    return ctx.opset >= ATTENTION_OPSET and not spec.attention_sinks and spec.mla is None


def self_attention(
    ctx: GraphContext, spec: ModelSpec, layer: int, x_BSH: ir.Value, inputs: AttentionInputs,
    past_BGPD: tuple[ir.Value, ir.Value],
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """One attention sublayer: returns the output ``[B, S, H]`` and the present K and V.

    ``past_BGPD`` is the layer's past key and value; with ``inputs.write_B`` (a static cache) the
    new K/V are scattered into them instead of appended."""
    op = ctx.op
    cos, sin = inputs.cos, inputs.sin
    p = wn.layer(layer)
    N, G, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    qkv = op.MatMul(x_BSH, ctx.weight(p + wn.QKV))
    if spec.qkv_bias:
        qkv = op.Add(qkv, ctx.weight(wn.bias(p + wn.QKV)))
    if spec.attention_gate:  # the gate's columns follow v's
        q, k, v, gate = op.Split(qkv, ctx.const([N * D, G * D, G * D, N * D]), axis=-1, _outputs=4)
    else:
        q, k, v = op.Split(qkv, ctx.const([N * D, G * D, G * D]), axis=-1, _outputs=3)
        gate = None
    if spec.qk_norm == "full":
        q = rms_norm(ctx, q, p + wn.Q_NORM, spec.rms_norm_eps)
        k = rms_norm(ctx, k, p + wn.K_NORM, spec.rms_norm_eps)
    if spec.clip_qkv:
        lo, hi = ctx.const(-spec.clip_qkv, ctx.dtype), ctx.const(spec.clip_qkv, ctx.dtype)
        q, k, v = op.Clip(q, lo, hi), op.Clip(k, lo, hi), op.Clip(v, lo, hi)
    q_BSND = op.Reshape(q, ctx.const([0, 0, N, D]))
    k_BSGD = op.Reshape(k, ctx.const([0, 0, G, D]))
    if spec.qk_norm == "head":
        q_BSND = rms_norm(ctx, q_BSND, p + wn.Q_NORM, spec.rms_norm_eps)
        k_BSGD = rms_norm(ctx, k_BSGD, p + wn.K_NORM, spec.rms_norm_eps)
    pairs, rotary = spec.rope.interleaved, 2 * len(spec.rope.inv_freq)  # rotary < D: partial rotary
    q_BNSD, k_BGSD = op.Transpose(q_BSND, perm=[0, 2, 1, 3]), op.Transpose(k_BSGD, perm=[0, 2, 1, 3])
    if spec.uses_rope(layer):
        q_BNSD = apply_rope(ctx, q_BNSD, cos, sin, pairs, rotary, D)
        k_BGSD = apply_rope(ctx, k_BGSD, cos, sin, pairs, rotary, D)
    v_BGSD = op.Transpose(op.Reshape(v, ctx.const([0, 0, G, D])), perm=[0, 2, 1, 3])
    present_k, present_v = update_cache(ctx, *past_BGPD, k_BGSD, v_BGSD, inputs.write_B)
    keys, values = ctx.from_kv(present_k), ctx.from_kv(present_v)
    scale_value = D**-0.5 if spec.attention_scale is None else spec.attention_scale
    if fused_attention(ctx, spec):  # one node; GQA by kv heads, the mask broadcast over heads
        ctx_BNSD = op.Attention(q_BNSD, keys, values, inputs.bias, scale=float(scale_value))
        out = _output(ctx, spec, layer, op.Transpose(ctx_BNSD, perm=[0, 2, 1, 3]), gate)
        return out, present_k, present_v

    # Fold the R query heads of each KV head into rows: [B, N, S, D] -> [B, G, R*S, D].
    q_BGrD = op.Reshape(q_BNSD, ctx.const([0, G, -1, D]))
    scale = ctx.const(scale_value, ctx.dtype)
    scores = op.MatMul(op.Mul(q_BGrD, scale), op.Transpose(keys, perm=[0, 1, 3, 2]))
    logits = op.Add(ctx.to_float(scores), inputs.bias)
    if spec.attention_sinks:
        probs = ctx.from_float(sink_softmax(ctx, logits, ctx.to_float(ctx.weight(p + wn.SINKS)), N // G))
    else:
        probs = ctx.from_float(op.Softmax(logits, axis=-1))
    ctx_BGrD = op.MatMul(probs, values)
    ctx_BSND = op.Transpose(op.Reshape(ctx_BGrD, ctx.const([0, N, -1, D])), perm=[0, 2, 1, 3])
    return _output(ctx, spec, layer, ctx_BSND, gate), present_k, present_v


def update_cache(ctx: GraphContext, past_k: ir.Value, past_v: ir.Value, k: ir.Value, v: ir.Value,
                 write_B: ir.Value | None) -> tuple[ir.Value, ir.Value]:
    """The presents ``[B, G, T or C, D]`` in the cache's storage dtype: this step's key and value
    (``[B, G, S, D]``) appended to the past, or written at ``write_B`` in a static buffer."""
    op = ctx.op
    k, v = ctx.to_kv(k), ctx.to_kv(v)
    if write_B is None:
        return op.Concat(past_k, k, axis=2), op.Concat(past_v, v, axis=2)
    return op.TensorScatter(past_k, k, write_B, axis=2), op.TensorScatter(past_v, v, write_B, axis=2)


def _output(ctx: GraphContext, spec: ModelSpec, layer: int, ctx_BSND: ir.Value,
            gate_BSX: ir.Value | None = None) -> ir.Value:
    """The heads' outputs ``[B, S, N, D]`` (times ``sigmoid(gate)`` [B, S, N*D] in gated attention)
    through ``o_proj`` (+ its bias)."""
    op, p = ctx.op, wn.layer(layer)
    heads_BSX = op.Reshape(ctx_BSND, ctx.const([0, 0, spec.num_heads * spec.head_dim]))
    if gate_BSX is not None:
        heads_BSX = op.Mul(heads_BSX, op.Sigmoid(gate_BSX))
    out = op.MatMul(heads_BSX, ctx.weight(p + wn.O_PROJ))
    if spec.o_bias:
        out = op.Add(out, ctx.weight(wn.bias(p + wn.O_PROJ)))
    return out


def sink_softmax(ctx: GraphContext, logits_BGrT: ir.Value, sinks_N: ir.Value, R: int) -> ir.Value:
    """Softmax over the keys plus one more logit per head, its sink, which only joins the
    denominator: ``Softmax([logits, sink])`` with the sink's column dropped (gpt_oss). Row r*S + s
    of KV head g belongs to query head g*R + r."""
    op = ctx.op
    i64 = ir.DataType.INT64

    def head_of_row() -> tuple[ir.Value, ir.Value]:  # [1, G, R*S, 1] head ids, and the [B, G, R*S, 1] shape
        rows = op.Shape(logits_BGrT, start=2, end=3)
        S = op.Div(rows, ctx.const([R]))
        r_RS = op.Div(op.Range(ctx.const(0, i64), op.Squeeze(rows), ctx.const(1, i64)), op.Squeeze(S))
        G = op.Shape(logits_BGrT, start=1, end=2)
        g_G1 = op.Unsqueeze(op.Range(ctx.const(0, i64), op.Squeeze(G), ctx.const(1, i64)), ctx.const([1]))
        heads = op.Add(op.Mul(g_G1, ctx.const(R, i64)), op.Unsqueeze(r_RS, ctx.const([0])))
        shape = op.Concat(op.Shape(logits_BGrT, start=0, end=3), ctx.const([1]), axis=0)
        return op.Unsqueeze(heads, ctx.const([0, 3])), shape

    heads_1GR1, shape_BGr1 = ctx.shared("attention.sink_heads", head_of_row)
    sink_BGr1 = op.Expand(op.Gather(sinks_N, heads_1GR1, axis=0), shape_BGr1)
    probs = op.Softmax(op.Concat(logits_BGrT, sink_BGr1, axis=-1), axis=-1)
    return op.Slice(probs, ctx.const([0]), ctx.const([-1]), ctx.const([-1]))
