"""RMSNorm, written so ONNX Runtime fuses it (SimplifiedLayerNormalization), and LayerNorm."""

from __future__ import annotations

import onnx_ir as ir

from moe_onnx import weight_names as wn
from moe_onnx.graphs.context import GraphContext


def rms_norm(ctx: GraphContext, x: ir.Value, weight: str, eps: float) -> ir.Value:
    """``weight * x / sqrt(mean(x**2, -1) + eps)``, the statistics in float32 as in transformers."""
    op = ctx.op
    xf = ctx.to_float(x)
    var = op.ReduceMean(op.Pow(xf, ctx.const(2.0, ir.DataType.FLOAT)), ctx.const([-1]), keepdims=1)
    normed = op.Div(xf, op.Sqrt(op.Add(var, ctx.const(float(eps), ir.DataType.FLOAT))))
    return op.Mul(ctx.from_float(normed), ctx.weight(weight))


def layer_norm(ctx: GraphContext, x: ir.Value, weight: str, eps: float) -> ir.Value:
    """``LayerNormalization`` with weight and ``{weight}_bias``; statistics in float32 (stash_type)."""
    return ctx.op.LayerNormalization(x, ctx.weight(weight), ctx.weight(wn.bias(weight)), axis=-1,
                                     epsilon=float(eps), stash_type=1)


def norm(ctx: GraphContext, x: ir.Value, weight: str, kind: str, eps: float) -> ir.Value:
    """The spec's norm (``ModelSpec.norm``): ``"rms"`` or ``"layer"``."""
    return (layer_norm if kind == "layer" else rms_norm)(ctx, x, weight, eps)
