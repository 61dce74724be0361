"""The Gated DeltaNet token mixer of qwen3_next and qwen3_5_moe (``layer_types``
"linear_attention"), in standard ONNX ops.

Legend: B batch, S new tokens, H hidden, G key heads, N value heads (r = N / G per key head),
Dk / Dv key / value head dim, C = 2*G*Dk + N*Dv conv channels (q | k | v), K conv taps.

The masked input is projected to q, k, v, z, b, a; q | k | v run through a causal depthwise conv
(continuing from ``past_conv``) and SiLU. Then per token t and value head, with a state
M [Dk, Dv] in float32 (key head h // r serves value head h)::

    q, k = l2norm(q) / sqrt(Dk), l2norm(k);  beta = sigmoid(b);  g = -exp(A_log) * softplus(a + dt_bias)
    M = M * exp(g);  M = M + (beta * k) (v - M^T k)^T;  o = M^T q

and ``y = out_proj(rmsnorm(o) * norm * silu(z))``, the RMSNorm per head. Prefill and decode are
the same nodes: ``prefill="scan"`` (default) runs the recurrence token by token in a ``Scan``;
``prefill="chunked"`` runs the chunked (WY) form of transformers' ``torch_chunk_gated_delta_rule``,
see :func:`chunked_delta_rule` (a decode step is then padded to one chunk of 64).

Padding (mask 0) zeroes the input, as transformers' ``apply_mask_to_padding_states`` does: from
zero states left padding leaves them zero (k = 0 writes nothing), so a left-padded row matches
the unpadded one. From a non-zero state it does not: a zero input still decays M by
``exp(-exp(A_log) * softplus(dt_bias))`` and the conv still reads its past (transformers alike).

Canonical weights under ``prefix`` (MatMul layout [in, out]):
``in_proj`` [H, C + N*Dv + 2N], columns q [G*Dk] | k [G*Dk] | v [N*Dv] | z [N*Dv] | b [N] | a [N],
heads in order within each; ``conv`` [C, 1, K] (ONNX Conv's depthwise layout, torch's
``conv1d.weight`` as stored); ``dt_bias`` [N]; ``A_log`` [N] (``-exp`` is taken in float32, as
transformers does); ``norm`` [Dv] (the gated RMSNorm's weight, plain, not 1 + w);
``out_proj`` [N*Dv, H]. :func:`deltanet_sources` lays both checkpoint layouts onto these
(the exporter's recipes read it), :func:`deltanet_weights` makes them all at once.

States, transformers' cache layouts: ``past_conv`` [B, C, K] the last K conv inputs (q | k | v
before the conv), ``past_recurrent`` [B, N, Dk, Dv] the M of each value head; both in the
compute dtype, zeros for a fresh sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from moe_onnx.graphs.context import GraphContext, branches
from moe_onnx.graphs.norms import rms_norm
from moe_onnx.graphs.short_conv import causal_conv
from moe_onnx.spec import DeltaNetSpec
from moe_onnx.weight_names import CONV, IN_PROJ, OUT_PROJ  # the names --weights int8|int4 quantizes

DT_BIAS = "dt_bias"
A_LOG = "A_log"
NORM = "norm"
LAYOUTS = ("qwen3_next", "qwen3_5_moe")
PREFILLS = ("scan", "chunked", "auto")  # auto: an If, the Scan for one token, chunked for more
CHUNK = 64  # the chunked form's chunk length, as transformers' and FLA's
_END = 2**62  # a Slice end past any axis
_F32 = ir.DataType.FLOAT


@dataclass(frozen=True)
class Source:
    """Where one canonical weight comes from: ``parts``, tensors of a layer's ``linear_attn``
    module and their stored shapes, made into the graph's ``shape`` by ``make(*tensors)``."""

    parts: tuple[tuple[str, tuple[int, ...]], ...]
    shape: tuple[int, ...]
    make: Callable[..., np.ndarray]


def deltanet_sources(spec: DeltaNetSpec, layout: str, hidden: int) -> dict[str, Source]:
    """Each canonical weight (name relative to the mixer's prefix) of a mixer over ``hidden``
    features, by the checkpoint tensors it is made from. ``layout``: ``qwen3_5_moe`` stores
    ``in_proj_qkv`` [C, H], ``in_proj_z`` [N*Dv, H], ``in_proj_b`` / ``in_proj_a`` [N, H];
    ``qwen3_next`` fuses them as ``in_proj_qkvz`` [2*G*Dk + 2*N*Dv, H], rows grouped per key
    head q_g | k_g | v_g (r*Dv) | z_g (r*Dv), and ``in_proj_ba`` [2N, H], b_g (r) | a_g (r)."""
    s, H = spec, hidden
    N, C, vd = s.num_v_heads, s.conv_dim, s.num_v_heads * s.head_v_dim
    if layout == "qwen3_5_moe":
        parts = (("in_proj_qkv.weight", (C, H)), ("in_proj_z.weight", (vd, H)), ("in_proj_b.weight", (N, H)),
                 ("in_proj_a.weight", (N, H)))

        def in_proj(*rows: np.ndarray) -> np.ndarray:
            return np.concatenate(rows, axis=0).T
    elif layout == "qwen3_next":
        parts = (("in_proj_qkvz.weight", (C + vd, H)), ("in_proj_ba.weight", (2 * N, H)))

        def in_proj(qkvz: np.ndarray, ba: np.ndarray) -> np.ndarray:
            return np.concatenate(_qwen3_next_rows(qkvz, ba, s), axis=0).T
    else:
        raise ValueError(f"unknown DeltaNet layout {layout!r}; known: {', '.join(LAYOUTS)}")
    K, Dv = s.conv_kernel, s.head_v_dim
    return {
        IN_PROJ: Source(parts, (H, C + vd + 2 * N), in_proj),
        CONV: Source((("conv1d.weight", (C, 1, K)),), (C, 1, K), np.asarray),
        DT_BIAS: Source((("dt_bias", (N,)),), (N,), np.asarray),
        A_LOG: Source((("A_log", (N,)),), (N,), np.asarray),
        NORM: Source((("norm.weight", (Dv,)),), (Dv,), np.asarray),
        OUT_PROJ: Source((("out_proj.weight", (H, vd)),), (vd, H), np.transpose),
    }


def deltanet_weights(get: Callable[[str], np.ndarray], layout: str, spec: DeltaNetSpec,
                     ) -> dict[str, np.ndarray]:
    """Every canonical weight (unprefixed, float32) from one layer's checkpoint tensors, ``get(name)``
    a tensor by its name under ``linear_attn``; ``layout`` as :func:`deltanet_sources` takes it."""
    hidden = get("out_proj.weight").shape[0]
    return {name: np.ascontiguousarray(source.make(*(get(t) for t, _ in source.parts)), dtype=np.float32)
            for name, source in deltanet_sources(spec, layout, hidden).items()}


def _qwen3_next_rows(qkvz: np.ndarray, ba: np.ndarray, s: DeltaNetSpec) -> list[np.ndarray]:
    """qwen3_next's per-key-head interleaved rows as the plain [qkv, z, b, a] row blocks."""
    G, r, H = s.num_k_heads, s.num_v_heads // s.num_k_heads, qkvz.shape[1]
    groups = qkvz.reshape(G, -1, H)
    q, k, v, z = np.split(groups, np.cumsum([s.head_k_dim, s.head_k_dim, r * s.head_v_dim]), axis=1)
    b, a = np.split(ba.reshape(G, 2 * r, H), 2, axis=1)
    qkv = np.concatenate([x.reshape(-1, H) for x in (q, k, v)])
    return [qkv, z.reshape(-1, H), b.reshape(-1, H), a.reshape(-1, H)]


def deltanet_mixer(ctx: GraphContext, spec: DeltaNetSpec, prefix: str, x_BSH: ir.Value,
                   mask_BS: ir.Value, past_conv: ir.Value, past_recurrent: ir.Value,
                   prefill: str = "scan") -> tuple[ir.Value, ir.Value, ir.Value]:
    """The mixer over the normed ``x_BSH``; ``mask_BS`` (int64) the attention mask's columns of
    the S new tokens. Returns ``(y_BSH, present_conv, present_recurrent)``."""
    if prefill not in PREFILLS:
        raise ValueError(f"unknown DeltaNet prefill {prefill!r}; known: {', '.join(PREFILLS)}")
    op, s = ctx.op, spec
    kd, vd = s.num_k_heads * s.head_k_dim, s.num_v_heads * s.head_v_dim
    x_BSH = op.Mul(x_BSH, op.Unsqueeze(op.Cast(mask_BS, to=ctx.dtype), ctx.const([-1])))
    proj = op.MatMul(x_BSH, ctx.weight(prefix + IN_PROJ))
    qkv_BSC, z, b_BSN, a_BSN = op.Split(proj, ctx.const([s.conv_dim, vd, s.num_v_heads, s.num_v_heads]),
                                        axis=-1, _outputs=4)
    qkv_BSC, present_conv = _causal_conv(ctx, s, prefix, qkv_BSC, past_conv)
    q, k, v = op.Split(qkv_BSC, ctx.const([kd, kd, vd]), axis=-1, _outputs=3)
    q_BSND, k_BSND = (_heads(ctx, s, x, scale) for x, scale in ((q, s.head_k_dim**-0.5), (k, 1.0)))
    v_BSND = op.Reshape(ctx.to_float(v), ctx.const([0, 0, s.num_v_heads, s.head_v_dim]))
    beta_BSN = ctx.to_float(op.Sigmoid(b_BSN))
    g_BSN = op.Mul(op.Neg(op.Exp(ctx.to_float(ctx.weight(prefix + A_LOG)))),
                   op.Softplus(op.Add(ctx.to_float(a_BSN), ctx.to_float(ctx.weight(prefix + DT_BIAS)))))
    args = (prefix, q_BSND, k_BSND, v_BSND, g_BSN, beta_BSN, ctx.to_float(past_recurrent))
    if prefill == "auto":  # the recurrence only: the projections stay outside, where onnxruntime fuses them
        one_token = op.Squeeze(op.Equal(op.Shape(x_BSH, start=1, end=2), ctx.const([1])), ctx.const([0]))
        o_BSND, state = branches(ctx, one_token, lambda c: scan_delta_rule(c, *args),
                                 lambda c: chunked_delta_rule(c, *args), f"{prefix}rule", 2)
    else:
        rule = chunked_delta_rule if prefill == "chunked" else scan_delta_rule
        o_BSND, state = rule(ctx, *args)
    z_BSND = op.Reshape(z, ctx.const([0, 0, s.num_v_heads, s.head_v_dim]))
    y = _gated_norm(ctx, prefix + NORM, o_BSND, z_BSND, s.norm_eps)
    y_BSH = op.MatMul(op.Reshape(y, ctx.const([0, 0, vd])), ctx.weight(prefix + OUT_PROJ))
    return y_BSH, present_conv, ctx.from_float(state)


def _causal_conv(ctx: GraphContext, s: DeltaNetSpec, prefix: str, qkv_BSC: ir.Value,
                 past_BCK: ir.Value) -> tuple[ir.Value, ir.Value]:
    """SiLU of the depthwise conv over ``Concat(past, new)`` [B, C, K + S] (no padding; its first
    output predates the new tokens), and the new state: that concatenation's last K columns."""
    op = ctx.op
    bf16 = ctx.dtype == ir.DataType.BFLOAT16  # Conv takes bfloat16 from opset 22 only
    conv_BCS, present = causal_conv(ctx, op.Transpose(qkv_BSC, perm=[0, 2, 1]), past_BCK,
                                    ctx.weight(prefix + CONV), None, s.conv_dim, in_float=bf16)
    conv_BSC = op.Transpose(conv_BCS, perm=[0, 2, 1])
    if bf16:
        conv_BSC = ctx.from_float(conv_BSC)
    return op.Mul(conv_BSC, op.Sigmoid(conv_BSC)), present


def _heads(ctx: GraphContext, s: DeltaNetSpec, x_BSGD: ir.Value, scale: float) -> ir.Value:
    """q or k [B, S, G*Dk] as float32 heads [B, S, N, Dk]: L2-normalised (FLA's eps 1e-6 inside
    the root), scaled, each key head repeated for its r value heads."""
    op, r = ctx.op, s.num_v_heads // s.num_k_heads
    x = op.Reshape(ctx.to_float(x_BSGD), ctx.const([0, 0, s.num_k_heads, s.head_k_dim]))
    sq = op.ReduceSum(op.Mul(x, x), ctx.const([-1]), keepdims=1)
    x = op.Div(x, op.Sqrt(op.Add(sq, ctx.const(1e-6, _F32))))
    if scale != 1.0:
        x = op.Mul(x, ctx.const(float(scale), _F32))
    if r == 1:
        return x
    repeated = op.Expand(op.Unsqueeze(x, ctx.const([3])), ctx.const([1, 1, 1, r, 1]))
    return op.Reshape(repeated, ctx.const([0, 0, s.num_v_heads, s.head_k_dim]))


def _gated_norm(ctx: GraphContext, weight: str, o_BSND: ir.Value, z_BSND: ir.Value, eps: float) -> ir.Value:
    """transformers' RMSNormGated: ``(weight * rmsnorm(o)) * silu(z)``, the norm in float32 and
    cast back before the weight, the gate product in float32. ``o`` is the delta rule's float32
    output, normed as it is: transformers rounds it to the compute dtype first, where in fp16 a
    small o (the norm then magnifies it) keeps few digits."""
    op = ctx.op
    z = ctx.to_float(z_BSND)
    return ctx.from_float(op.Mul(ctx.to_float(rms_norm(ctx, o_BSND, weight, eps)), op.Mul(z, op.Sigmoid(z))))


def scan_delta_rule(ctx: GraphContext, prefix: str, q_BSND: ir.Value, k_BSND: ir.Value,
                    v_BSNE: ir.Value, g_BSN: ir.Value, beta_BSN: ir.Value, state_BNDE: ir.Value,
                    ) -> tuple[ir.Value, ir.Value]:
    """The gated delta rule token by token (a ``Scan`` over S; E = Dv), all float32: the outputs
    [B, S, N, E] and the final state [B, N, D, E]. The scanned values are sequence-first (the
    default scan axis 0, which every runtime takes; onnx's reference evaluator takes no other)."""
    op = ctx.op

    def first(x: ir.Value, rank: int = 4) -> ir.Value:  # [B, S, ...] -> [S, B, ...]
        return op.Transpose(x, perm=[1, 0, *range(2, rank)])

    row = [op.Unsqueeze(first(x), ctx.const([3])) for x in (q_BSND, k_BSND, v_BSNE)]  # [S, B, N, 1, *]
    kbeta_BSND = op.Mul(k_BSND, op.Unsqueeze(beta_BSN, ctx.const([-1])))
    kbeta_SBND1 = op.Unsqueeze(first(kbeta_BSND), ctx.const([-1]))
    decay_SBN11 = op.Unsqueeze(op.Exp(first(g_BSN, 3)), ctx.const([-2, -1]))

    def step(op, m, q_row, k_row, v_row, kbeta_col, decay):
        m = op.Mul(m, decay)
        m = op.Add(m, op.MatMul(kbeta_col, op.Sub(v_row, op.MatMul(k_row, m))))
        return m, op.MatMul(q_row, m)

    body = _scan_body(ctx, f"{prefix}scan", step, ("state", "q", "k", "v", "kbeta", "decay"))
    state, o_SBN1E = op.Scan(state_BNDE, *row, kbeta_SBND1, decay_SBN11, body=body, num_scan_inputs=5,
                             _outputs=2)
    return op.Transpose(op.Squeeze(o_SBN1E, ctx.const([3])), perm=[1, 0, 2, 3]), state


def _scan_body(ctx: GraphContext, name: str, step, inputs: tuple[str, ...]) -> ir.Graph:
    """A Scan body ``step(op, state, *slices) -> (state, output)`` over float32 rank-4 values,
    its values named under ``name``: ONNX wants names unique across the graph and its bodies,
    and the builder's counters restart in each body."""

    def value(tail: str) -> ir.Value:
        return ir.Value(name=f"{name}.{tail}", type=ir.TensorType(_F32), shape=ir.Shape([None] * 4))

    ins, outs = [value(n) for n in inputs], [value("state_out"), value("o")]
    ctx.builder.push_module(name)
    try:
        return ctx.builder.subgraph(step, ins, outs, name=name)
    finally:
        ctx.builder.pop_module()


def chunked_delta_rule(ctx: GraphContext, prefix: str, q_BSND: ir.Value, k_BSND: ir.Value,
                       v_BSNE: ir.Value, g_BSN: ir.Value, beta_BSN: ir.Value, state_BNDE: ir.Value,
                       ) -> tuple[ir.Value, ir.Value]:
    """The gated delta rule by chunks (transformers' ``torch_chunk_gated_delta_rule``, the WY
    form), all float32: S padded to c chunks of L = 64; within a chunk batched MatMuls, across
    chunks a ``Scan`` over c (chunks first, its default axis) carrying the state. Returns the
    outputs [B, S, N, E] and the final state [B, N, D, E]."""
    op = ctx.op
    q, k, v = (_chunked(ctx, x, 4) for x in (q_BSND, k_BSND, v_BSNE))  # [c, B, N, L, *]
    g, beta = (_chunked(ctx, x, 3) for x in (g_BSN, beta_BSN))  # [c, B, N, L]
    cum = op.CumSum(g, ctx.const(3))  # log of the decay from the chunk's start, inclusive
    beta_col, exp_cum = op.Unsqueeze(beta, ctx.const([-1])), op.Unsqueeze(op.Exp(cum), ctx.const([-1]))
    kbeta = op.Mul(k, beta_col)
    inverse_LL = _unit_lower_inverse(ctx, kbeta, k, cum)  # (I + strict_lower(decayed kbeta k^T))^-1
    u = op.MatMul(inverse_LL, op.Mul(v, beta_col))  # the values the chunk writes, before the state
    w = op.MatMul(inverse_LL, op.Mul(kbeta, exp_cum))  # the keys that read the state back
    attn_LL = op.Mul(op.MatMul(q, _t(ctx, k)), _causal_decay(ctx, cum))
    last = op.Slice(cum, ctx.const([-1]), ctx.const([_END]), ctx.const([3]))  # [c, B, N, 1]
    k_to_end = op.Mul(k, op.Unsqueeze(op.Exp(op.Sub(last, cum)), ctx.const([-1])))
    chunk_decay = op.Unsqueeze(op.Exp(last), ctx.const([-1]))  # [c, B, N, 1, 1]

    def step(op, m, u, w, q_decayed, attn, k_to_end_t, decay):
        v_new = op.Sub(u, op.MatMul(w, m))
        o = op.Add(op.MatMul(q_decayed, m), op.MatMul(attn, v_new))
        return op.Add(op.Mul(m, decay), op.MatMul(k_to_end_t, v_new)), o

    body = _scan_body(ctx, f"{prefix}chunks", step, ("state", "u", "w", "q", "attn", "k", "decay"))
    state, o_cBNLE = op.Scan(state_BNDE, u, w, op.Mul(q, exp_cum), attn_LL, _t(ctx, k_to_end), chunk_decay,
                             body=body, num_scan_inputs=6, _outputs=2)
    o_BcLNE = op.Transpose(o_cBNLE, perm=[1, 0, 3, 2, 4])
    o_BPNE = op.Reshape(o_BcLNE, op.Concat(ctx.const([0, -1]), op.Shape(v_BSNE, start=2), axis=0))
    return op.Slice(o_BPNE, ctx.const([0]), op.Shape(v_BSNE, start=1, end=2), ctx.const([1])), state


def _t(ctx: GraphContext, x: ir.Value) -> ir.Value:
    """``x`` with its last two axes swapped (rank 5)."""
    return ctx.op.Transpose(x, perm=[0, 1, 2, 4, 3])


def _chunked(ctx: GraphContext, x: ir.Value, rank: int) -> ir.Value:
    """[B, S, N, *] as [c, B, N, L, *]: S zero-padded at the end to c * L."""
    op = ctx.op
    s = op.Shape(x, start=1, end=2)
    pad = op.Mod(op.Sub(ctx.const([CHUNK]), op.Mod(s, ctx.const([CHUNK]))), ctx.const([CHUNK]))
    pads = op.Concat(ctx.const([0] * (rank + 1)), pad, ctx.const([0] * (rank - 2)), axis=0)
    shape = op.Concat(ctx.const([0, -1, CHUNK]), op.Shape(x, start=2), axis=0)
    chunks = op.Reshape(op.Pad(x, pads), shape)  # [B, c, L, N, *]
    return op.Transpose(chunks, perm=[1, 0, 3, 2, 4][:rank + 1])


def _causal_decay(ctx: GraphContext, cum_cBNL: ir.Value) -> ir.Value:
    """``exp(cum_i - cum_j)`` for j <= i, else 0: [c, B, N, L, L] (masked before the Exp, where
    it would overflow)."""
    op = ctx.op
    pos = ctx.const(list(range(CHUNK)))
    later_LL = op.Less(op.Unsqueeze(pos, ctx.const([1])), op.Unsqueeze(pos, ctx.const([0])))
    diff = op.Sub(op.Unsqueeze(cum_cBNL, ctx.const([-1])), op.Unsqueeze(cum_cBNL, ctx.const([-2])))
    return op.Exp(op.Where(later_LL, ctx.const(float("-inf"), _F32), diff))


def _unit_lower_inverse(ctx: GraphContext, kbeta: ir.Value, k: ir.Value, cum: ir.Value) -> ir.Value:
    """The inverse of each chunk's unit lower triangular ``T = I + strict_lower(A)``,
    ``A_ij = (kbeta_i . k_j) exp(cum_i - cum_j)``: [c, B, N, L, L]. By recursive block inversion,
    ``[[X, 0], [Y, Z]]^-1 = [[X^-1, 0], [-Z^-1 Y X^-1, Z^-1]]``, doubling the block from 1 to L:
    log2(L) batched steps, where transformers' forward substitution takes L - 1; each step's
    off-diagonal blocks Y come straight from k, never the full A."""
    op = ctx.op
    ones = op.Concat(op.Shape(cum), ctx.const([1, 1]), axis=0)
    inverse = op.Expand(ctx.const([1.0], _F32), ones)  # [c, B, N, L, 1, 1]: the 1x1 diagonal blocks
    b = 1
    while b < CHUNK:
        m = CHUNK // (2 * b)  # pairs of b-blocks, each becoming one 2b-block
        _, kbeta_lo = _halves(ctx, kbeta, [m, 2, b, -1])
        k_hi, _ = _halves(ctx, k, [m, 2, b, -1])
        cum_hi, cum_lo = _halves(ctx, cum, [m, 2, b])
        decay = op.Exp(op.Sub(op.Unsqueeze(cum_lo, ctx.const([-1])), op.Unsqueeze(cum_hi, ctx.const([-2]))))
        y = op.Mul(op.MatMul(kbeta_lo, op.Transpose(k_hi, perm=[0, 1, 2, 3, 5, 4])), decay)
        x_inv, z_inv = _halves(ctx, inverse, [m, 2, b, b])
        off = op.Neg(op.MatMul(op.MatMul(z_inv, y), x_inv))
        top = op.Concat(x_inv, op.Mul(x_inv, ctx.const(0.0, _F32)), axis=-1)
        inverse = op.Concat(top, op.Concat(off, z_inv, axis=-1), axis=-2)  # [c, B, N, m, 2b, 2b]
        b *= 2
    return op.Squeeze(inverse, ctx.const([3]))


def _halves(ctx: GraphContext, x: ir.Value, tail: list[int]) -> tuple[ir.Value, ir.Value]:
    """``x`` [c, B, N, ...] reshaped to [c, B, N, m, 2, ...] (``tail``), split on the 2."""
    op = ctx.op
    pairs = op.Reshape(x, ctx.const([0, 0, 0, *tail]))
    return op.Gather(pairs, ctx.const(0), axis=4), op.Gather(pairs, ctx.const(1), axis=4)
