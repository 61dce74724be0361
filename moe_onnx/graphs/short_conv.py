"""LFM2's gated short convolution, the token mixer of its ``conv`` layers, in standard ONNX ops.

Legend: B batch, S new tokens, H hidden size, K the kernel's taps (``conv_L_cache``).

``in_proj`` gives three [B, S, H] streams b, c, x; ``u = b * x`` runs through a causal depthwise
convolution of K taps over time; ``y = out_proj(c * conv(u))``. The state ``past_conv.{i}``
[B, H, K] is the last K values of ``u`` (the layout of transformers' cache and of the LFM2 ONNX
exports transformers.js reads): a step convolves ``Concat(state, u)`` with no padding, keeps its
last S outputs, and hands back that concatenation's last K columns. Decode and prefill are the
same nodes.

Weights under ``layers.{i}.conv.``: ``in_proj`` [H, 3H] (b | c | x), ``conv`` [H, 1, K] (ONNX
Conv's depthwise layout, torch's Conv1d weight as stored), ``out_proj`` [H, H]; with ``bias``:
``in_proj_bias`` [3H], ``conv_bias`` [H], ``out_proj_bias`` [H].
"""

from __future__ import annotations

import onnx_ir as ir

from moe_onnx import weight_names as wn
from moe_onnx.graphs.context import GraphContext
from moe_onnx.spec import ShortConvSpec


def masked(ctx: GraphContext, x_BSH: ir.Value, mask_BS: ir.Value) -> ir.Value:
    """``x`` with the positions of left padding (mask 0) zeroed, as transformers'
    ``apply_mask_to_padding_states`` does before a recurrent mixer: a fresh state then stays
    zero through the padding."""
    op = ctx.op
    return op.Mul(x_BSH, op.Unsqueeze(op.Cast(mask_BS, to=ctx.dtype), ctx.const([-1])))


def causal_conv(ctx: GraphContext, u_BCS: ir.Value, past_BCK: ir.Value, weight: ir.Value,
                bias: ir.Value | None, channels: int, in_float: bool = False) -> tuple[ir.Value, ir.Value]:
    """The causal depthwise convolution of every recurrent mixer (short conv, Mamba2, DeltaNet),
    continuing from ``past`` [B, C, K]: outputs [B, C, S] and the new state, the last K columns of
    ``Concat(past, u)`` (its dtype). The oldest column is dropped before the Conv, so it gives
    exactly S outputs; ``in_float`` convolves in float32 (and returns float32)."""
    op, end, time = ctx.op, ctx.const([2**62]), ctx.const([2])
    window_BCT = op.Concat(past_BCK, u_BCS, axis=2)  # T = K + S
    present_BCK = op.Slice(window_BCT, ctx.const([-int(weight.shape[2])]), end, time)
    inputs = [op.Slice(window_BCT, ctx.const([1]), end, time), weight] + ([bias] if bias is not None else [])
    if in_float:
        inputs = [ctx.to_float(x) for x in inputs]
    return op.Conv(*inputs, group=channels), present_BCK


def short_conv_mixer(ctx: GraphContext, spec: ShortConvSpec, prefix: str, x_BSH: ir.Value,
                     mask_BS: ir.Value, past_conv: ir.Value, hidden: int) -> tuple[ir.Value, ir.Value]:
    """The mixer's output [B, S, H] and ``present_conv`` [B, H, K]; ``mask_BS`` the attention
    mask's columns of the new tokens."""
    op = ctx.op

    def linear(x: ir.Value, name: str) -> ir.Value:
        y = op.MatMul(x, ctx.weight(prefix + name))
        return op.Add(y, ctx.weight(wn.bias(prefix + name))) if spec.bias else y

    bcx_BS3H = linear(masked(ctx, x_BSH, mask_BS), wn.IN_PROJ)
    b_BSH, c_BSH, x_BSH = op.Split(bcx_BS3H, axis=-1, num_outputs=3, _outputs=3)
    u_BHS = op.Transpose(op.Mul(b_BSH, x_BSH), perm=[0, 2, 1])
    conv = ctx.weight(prefix + wn.CONV)
    bias = ctx.weight(wn.bias(prefix + wn.CONV)) if spec.bias else None
    conv_BHS, present = causal_conv(ctx, u_BHS, past_conv, conv, bias, hidden)
    y_BSH = op.Mul(c_BSH, op.Transpose(conv_BHS, perm=[0, 2, 1]))
    return linear(y_BSH, wn.OUT_PROJ), present
