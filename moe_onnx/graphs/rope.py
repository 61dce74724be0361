"""Rotary position embedding: the rotate-half form transformers uses for most families, or
rotation of interleaved pairs (``RopeSpec.interleaved``, ernie4_5_moe).

From opset 23 (the static-cache export) the standard ``RotaryEmbedding`` op applies it, one node
per tensor where opset 21 spells it in six (Split, Neg, Concat, two Mul, Add); its caches are the
half tables ``[B, S, D/2]``.

Legend: B batch, S new tokens, D head_dim.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moe_onnx.graphs.context import GraphContext
from moe_onnx.spec import RopeSpec

ROTARY_OPSET = 23  # the standard RotaryEmbedding op


def rope_tables(
    ctx: GraphContext, position_ids_BS: ir.Value, rope: RopeSpec
) -> tuple[ir.Value, ir.Value]:
    """cos and sin tables ``[B, 1, S, D]`` for the given positions, built once per graph (from
    opset 23: ``[B, S, D/2]``, the caches of the ``RotaryEmbedding`` op)."""
    op = ctx.op
    inv_freq = np.asarray(rope.inv_freq, dtype=np.float32)
    inv_freq_v = ctx.builder.initializer(ir.tensor(inv_freq[None, None, :], name="rope.inv_freq"))
    pos_BS1 = op.Unsqueeze(op.Cast(position_ids_BS, to=ir.DataType.FLOAT), ctx.const([-1]))
    freqs_BSh = op.Mul(pos_BS1, inv_freq_v)
    if ctx.opset >= ROTARY_OPSET:
        cos, sin = op.Cos(freqs_BSh), op.Sin(freqs_BSh)
        if rope.attention_scaling != 1.0:
            scale = ctx.const(float(rope.attention_scaling), ir.DataType.FLOAT)
            cos, sin = op.Mul(cos, scale), op.Mul(sin, scale)
        return ctx.from_float(cos), ctx.from_float(sin)
    if rope.interleaved:  # each frequency twice in a row: f0, f0, f1, f1 ...
        freqs_BSh1 = op.Unsqueeze(freqs_BSh, ctx.const([-1]))
        emb_BSD = op.Reshape(op.Concat(freqs_BSh1, freqs_BSh1, axis=-1), ctx.const([0, 0, -1]))
    else:
        emb_BSD = op.Concat(freqs_BSh, freqs_BSh, axis=-1)
    cos, sin = op.Cos(emb_BSD), op.Sin(emb_BSD)
    if rope.attention_scaling != 1.0:
        scale = ctx.const(float(rope.attention_scaling), ir.DataType.FLOAT)
        cos, sin = op.Mul(cos, scale), op.Mul(sin, scale)
    axis = ctx.const([1])
    return (
        ctx.from_float(op.Unsqueeze(cos, axis)),
        ctx.from_float(op.Unsqueeze(sin, axis)),
    )


def apply_rope(
    ctx: GraphContext, x_BNSD: ir.Value, cos: ir.Value, sin: ir.Value, interleaved: bool = False,
    rotary_dim: int = 0, head_dim: int = 0,
) -> ir.Value:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half([a, b]) = [-b, a]``; interleaved,
    the pairs are ``(x[2i], x[2i+1]) -> (-x[2i+1], x[2i])``. With ``rotary_dim < head_dim``
    (partial rotary) only the first ``rotary_dim`` dims of each head turn."""
    op = ctx.op
    if ctx.opset >= ROTARY_OPSET:
        if rotary_dim and rotary_dim < head_dim:
            return op.RotaryEmbedding(x_BNSD, cos, sin, interleaved=int(interleaved),
                                      rotary_embedding_dim=rotary_dim)
        return op.RotaryEmbedding(x_BNSD, cos, sin, interleaved=int(interleaved))
    if rotary_dim and rotary_dim < head_dim:
        turned, kept = op.Split(x_BNSD, ctx.const([rotary_dim, head_dim - rotary_dim]), axis=-1, _outputs=2)
        return op.Concat(apply_rope(ctx, turned, cos, sin, interleaved), kept, axis=-1)
    if interleaved:
        a, b = op.Split(op.Reshape(x_BNSD, ctx.const([0, 0, 0, -1, 2])), axis=-1, num_outputs=2, _outputs=2)
        rotated = op.Reshape(op.Concat(op.Neg(b), a, axis=-1), ctx.const([0, 0, 0, -1]))
    else:
        a, b = op.Split(x_BNSD, axis=-1, num_outputs=2, _outputs=2)
        rotated = op.Concat(op.Neg(b), a, axis=-1)
    return op.Add(op.Mul(x_BNSD, cos), op.Mul(rotated, sin))
