"""Multi-head latent attention (deepseek_v2; deepseek_v3 shares it) over a cache of latents.

Legend: B batch, S new tokens, T = past + new positions, H hidden, N heads, L kv_lora_rank (the
latent), R qk_rope_head_dim (the roped key, one for all heads), Dn qk_nope_head_dim, Dv
v_head_dim, Q q_lora_rank.

MLA projects each token to a latent ``c = RMSNorm(x @ kv_a)[:L]`` and one roped key part
``k_r = rope((x @ kv_a)[L:])``; ``kv_b_proj`` expands ``c`` into every head's key (Dn) and value
(Dv). Expanding the cache would store N * (Dn + R + Dv) values per token and layer (5,120 for
DeepSeek-V2-Lite); this block caches ``c`` and ``k_r`` alone (L + R = 576) and never expands them:
the key half of ``kv_b_proj`` (``k_up`` [N, Dn, L]) is folded into the queries
(``q_n . (W_h c) = (q_n W_h) . c``), the value half (``v_up`` [N, L, Dv]) applied to each head's
attention-weighted latent, before ``o_proj``. The scores are then
``(q_n k_up) . c + rope(q_r) . k_r`` over the cached ``c`` and ``k_r``, as one MatMul each with
the N heads folded into rows (``[B, 1, N*S, L]``), so a decode step reads each cached latent once
for all heads. Neither half is multiplied into a neighbouring projection: that would grow the
weights a step reads (``q_proj``'s Dn columns per head become L).

Cache (see :mod:`moe_onnx.contract`): ``present.{i}.key`` is ``c`` ``[B, 1, T, L]``,
``present.{i}.value`` is ``k_r`` ``[B, 1, T, R]`` (the layout of transformers' own cache for the
family), grown by ``Concat`` or, in a static export, written in place by ``TensorScatter``.
"""

from __future__ import annotations

import onnx_ir as ir

from moe_onnx import weight_names as wn
from moe_onnx.graphs.attention import AttentionInputs, update_cache
from moe_onnx.graphs.context import GraphContext
from moe_onnx.graphs.norms import rms_norm
from moe_onnx.graphs.rope import apply_rope
from moe_onnx.spec import ModelSpec


def mla_attention(
    ctx: GraphContext, spec: ModelSpec, layer: int, x_BSH: ir.Value, inputs: AttentionInputs,
    past: tuple[ir.Value, ir.Value],
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """One MLA sublayer: the output ``[B, S, H]`` and the present latent and roped key.

    ``past`` is the layer's past latent ``[B, 1, P, L]`` and roped key ``[B, 1, P, R]``.
    ``inputs.bias`` is the additive mask with the heads folded into rows, ``[B, 1, N*S, T]``
    (:func:`moe_onnx.graphs.attention.attention_bias` for one KV head); ``inputs.write_B`` (a
    static cache's write index) scatters into the past buffers instead of appending."""
    op, m, p = ctx.op, spec.mla, wn.layer(layer)
    cos, sin = inputs.cos, inputs.sin
    assert m is not None
    N, L, R, Dn = spec.num_heads, m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim
    scale = spec.head_dim**-0.5 if spec.attention_scale is None else spec.attention_scale
    q_BNSd = op.Transpose(op.Reshape(op.Mul(_query(ctx, spec, p, x_BSH), ctx.const(scale, ctx.dtype)),
                                     ctx.const([0, 0, N, Dn + R])), perm=[0, 2, 1, 3])
    q_n_BNSD, q_r_BNSR = op.Split(q_BNSd, ctx.const([Dn, R]), axis=-1, _outputs=2)
    q_r_BNSR = apply_rope(ctx, q_r_BNSR, cos, sin, spec.rope.interleaved, R, R)

    kv_BSLR = op.MatMul(x_BSH, ctx.weight(p + wn.KV_A))
    if m.bias:
        kv_BSLR = op.Add(kv_BSLR, ctx.weight(wn.bias(p + wn.KV_A)))
    c_BSL, k_r_BSR = op.Split(kv_BSLR, ctx.const([L, R]), axis=-1, _outputs=2)
    c_B1SL = op.Unsqueeze(rms_norm(ctx, c_BSL, p + wn.KV_A_NORM, m.norm_eps), ctx.const([1]))
    k_r_B1SR = apply_rope(ctx, op.Unsqueeze(k_r_BSR, ctx.const([1])), cos, sin, spec.rope.interleaved, R, R)
    present_c, present_r = update_cache(ctx, *past, c_B1SL, k_r_B1SR, inputs.write_B)
    c_B1TL, k_r_B1TR = ctx.from_kv(present_c), ctx.from_kv(present_r)

    # The key half of kv_b_proj folded into the queries; the heads folded into rows.
    q_c_B1nL = op.Reshape(op.MatMul(q_n_BNSD, ctx.weight(p + wn.K_UP)), ctx.const([0, 1, -1, L]))
    q_r_B1nR = op.Reshape(q_r_BNSR, ctx.const([0, 1, -1, R]))
    scores = op.Add(op.MatMul(q_c_B1nL, op.Transpose(c_B1TL, perm=[0, 1, 3, 2])),
                    op.MatMul(q_r_B1nR, op.Transpose(k_r_B1TR, perm=[0, 1, 3, 2])))
    probs_B1nT = ctx.from_float(op.Softmax(op.Add(ctx.to_float(scores), inputs.bias), axis=-1))
    # Each head's weighted latent, then the value half of kv_b_proj: [B, N, S, L] @ [N, L, Dv].
    ctx_BNSL = op.Reshape(op.MatMul(probs_B1nT, c_B1TL), ctx.const([0, N, -1, L]))
    ctx_BNSV = op.MatMul(ctx_BNSL, ctx.weight(p + wn.V_UP))
    ctx_BSn = op.Reshape(op.Transpose(ctx_BNSV, perm=[0, 2, 1, 3]), ctx.const([0, 0, N * m.v_head_dim]))
    out = op.MatMul(ctx_BSn, ctx.weight(p + wn.O_PROJ))
    if spec.o_bias:
        out = op.Add(out, ctx.weight(wn.bias(p + wn.O_PROJ)))
    return out, present_c, present_r


def _query(ctx: GraphContext, spec: ModelSpec, p: str, x_BSH: ir.Value) -> ir.Value:
    """``[B, S, N * (Dn + R)]``: ``q_proj``, or ``q_b(RMSNorm(q_a(x)))`` with a query rank."""
    op, m = ctx.op, spec.mla
    if not m.q_lora_rank:
        return op.MatMul(x_BSH, ctx.weight(p + wn.Q_PROJ))
    q_BSQ = op.MatMul(x_BSH, ctx.weight(p + wn.Q_A))
    if m.bias:
        q_BSQ = op.Add(q_BSQ, ctx.weight(wn.bias(p + wn.Q_A)))
    return op.MatMul(rms_norm(ctx, q_BSQ, p + wn.Q_A_NORM, m.norm_eps), ctx.weight(p + wn.Q_B))
