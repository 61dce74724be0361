"""The gated feed-forward (SwiGLU) used by dense layers, experts and shared experts.

Gate and up projections are fused into one ``[H, 2F]`` matrix: one MatMul instead of two.
"""

from __future__ import annotations

import onnx_ir as ir

from moe_onnx import weight_names as wn
from moe_onnx.graphs.context import GraphContext


def swiglu(ctx: GraphContext, gate_up_x2F: ir.Value, alpha: float = 1.0, beta: float = 0.0,
           limit: float = 0.0) -> ir.Value:
    """``silu(gate) * up`` over the last axis split in two halves ``[gate | up]``; in general
    ``gate * sigmoid(alpha * gate) * (up + beta)`` with, when ``limit`` > 0, ``gate <= limit`` and
    ``-limit <= up <= limit`` first (gpt_oss's clamped SwiGLU: alpha 1.702, beta 1, limit 7)."""
    op = ctx.op
    gate, up = op.Split(gate_up_x2F, axis=-1, num_outputs=2, _outputs=2)
    if limit:
        gate = op.Clip(gate, None, ctx.const(limit, ctx.dtype))
        up = op.Clip(up, ctx.const(-limit, ctx.dtype), ctx.const(limit, ctx.dtype))
    sig = op.Sigmoid(gate if alpha == 1.0 else op.Mul(gate, ctx.const(alpha, ctx.dtype)))
    if beta:
        up = op.Add(up, ctx.const(beta, ctx.dtype))
    return op.Mul(op.Mul(gate, sig), up)


def gated_mlp(ctx: GraphContext, x: ir.Value, prefix: str) -> ir.Value:
    """``down(silu(x @ gate) * (x @ up))`` with weights ``{prefix}gate_up`` and ``{prefix}down``."""
    op = ctx.op
    hidden = swiglu(ctx, op.MatMul(x, ctx.weight(prefix + wn.GATE_UP)))
    return op.MatMul(hidden, ctx.weight(prefix + wn.DOWN))
