"""The gated feed-forward (SwiGLU) used by dense layers, experts and shared experts.

Gate and up projections are fused into one ``[H, 2F]`` matrix: one MatMul instead of two.
"""

from __future__ import annotations

import onnx_ir as ir

from moe_onnx.graphs.context import GraphContext


def swiglu(ctx: GraphContext, gate_up_x2F: ir.Value) -> ir.Value:
    """``silu(gate) * up`` over the last axis split in two halves ``[gate | up]``."""
    op = ctx.op
    gate, up = op.Split(gate_up_x2F, axis=-1, num_outputs=2, _outputs=2)
    return op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)


def gated_mlp(ctx: GraphContext, x: ir.Value, prefix: str) -> ir.Value:
    """``down(silu(x @ gate) * (x @ up))`` with weights ``{prefix}gate_up`` and ``{prefix}down``."""
    op = ctx.op
    hidden = swiglu(ctx, op.MatMul(x, ctx.weight(prefix + "gate_up")))
    return op.MatMul(hidden, ctx.weight(prefix + "down"))
