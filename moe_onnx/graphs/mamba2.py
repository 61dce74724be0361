"""The Mamba2 (SSD) token mixer of granitemoehybrid's ``mamba`` layers, in standard ONNX ops.

Legend: B batch, S new tokens, H hidden, I intermediate (= heads * P), h heads, P head_dim,
N state_size, G n_groups (B and C are shared by h / G heads), C conv_dim (= I + 2 G N), K the
conv's taps, Q tokens per chunk, c chunks.

``in_proj`` gives the gate z [I], xBC [C] and dt [h]. xBC runs through a causal depthwise
convolution continuing from ``past_conv`` and a SiLU, then splits into x [h, P], B [G, N] and
C [G, N]. Per token and head, with ``dt = clamp(softplus(dt + dt_bias))`` and ``A = -exp(A_log)``:
``state = exp(dt A) state + dt x ⊗ B``, ``y = state · C + D x``. Then the gated RMSNorm
(transformers' ``GraniteMoeHybridRMSNormGated``: ``y * silu(z)`` first, then RMS over each of
the G groups of I / G, times its weight) and ``out_proj``. The conv and the recurrence run in
float32 whatever the compute dtype (transformers' reference scan is float32 too).

States, the layout of transformers' cache (``conv_states`` / ``recurrent_states``):
``past_conv`` [B, C, K] (the last K conv inputs, before the conv) and ``past_ssm``
[B, h, P, N], both in the compute dtype; zeros start a sequence. Positions whose mask is 0
(left padding) have their inputs zeroed before ``in_proj`` and again after the conv, as
transformers' ``apply_mask_to_padding_states`` does: a fresh state then stays zero through them.

Prefill forms (``form``), both one graph for S = 1 and S > 1:
- ``scan`` (default): an ONNX ``Scan`` over time carrying the [B, h, P, N] state; exact, S steps.
- ``chunked``: the state-space duality of transformers' ``mamba2_chunk_scan``: within a chunk of
  Q = min(S, chunk_size) tokens a masked decay matrix and batched MatMuls, between chunks the
  states decayed by one [c+1, c+1] matrix; no loop.

Weights under ``prefix`` (``mamba2_sources`` says which tensor of a checkpoint's ``mamba`` module
each comes from and how it is laid out; ``mamba2_weights`` makes them all):
- ``in_proj`` [H, I + C + h] (MatMul layout; ``in_proj.weight`` transposed), z | xBC | dt;
  with ``proj_bias`` ``in_proj_bias`` [I + C + h];
- ``conv`` [C, 1, K]: ONNX Conv's depthwise weight, ``conv1d.weight`` as stored; with
  ``conv_bias`` ``conv_bias`` [C];
- ``dt_bias`` [h]; ``a_neg`` [h] = ``-exp(A_log)``; ``d`` [h] = ``D``;
- ``gated_norm`` [I] = ``norm.weight``;
- ``out_proj`` [I, H] (``out_proj.weight`` transposed); with ``proj_bias`` ``out_proj_bias`` [H].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from moe_onnx import weight_names as wn
from moe_onnx.graphs.context import GraphContext, branches
from moe_onnx.graphs.short_conv import causal_conv
from moe_onnx.spec import Mamba2Spec
from moe_onnx.weight_names import CONV, IN_PROJ, OUT_PROJ  # the names --weights int8|int4 quantizes

DT_BIAS = "dt_bias"
A_NEG = "a_neg"  # A = -exp(A_log), precomputed
D = "d"
NORM = "gated_norm"
# The chunked form's chunk: 64 measured fastest of 32/64/128/256 at Granite-4.0-H-Tiny's size on
# onnxruntime CPU (prefill of 256: 47.6 ms against 77.4 at 256 and 70.2 by the Scan; see BENCHMARKS.md).
CHUNK = 64
FORMS = ("scan", "chunked", "auto")  # auto: an If, the Scan for one token, chunked for more
_END = 2**62  # a Slice end past any axis
_F = ir.DataType.FLOAT


def _neg_exp(a_log: np.ndarray) -> np.ndarray:
    return -np.exp(a_log)


@dataclass(frozen=True)
class Source:
    """Where one canonical weight comes from: ``tensor`` of a layer's ``mamba`` module, stored
    ``shape``d, a torch Linear to ``transpose`` into a MatMul operand, then ``convert``ed."""

    tensor: str
    shape: tuple[int, ...]
    transpose: bool = False
    convert: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def graph_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.transpose else self.shape

    def make(self, stored: np.ndarray) -> np.ndarray:
        """The graph's float32 array from the stored tensor."""
        w = stored.T if self.transpose else stored
        return np.ascontiguousarray(self.convert(w) if self.convert else w, dtype=np.float32)


def mamba2_sources(spec: Mamba2Spec, hidden: int) -> dict[str, Source]:
    """Each canonical weight (name relative to the mixer's prefix) of a mixer over ``hidden``
    features, by the checkpoint tensor it is made from."""
    inner, C, h, K = spec.intermediate_size, spec.conv_dim, spec.num_heads, spec.conv_kernel
    sources = {
        IN_PROJ: Source("in_proj.weight", (inner + C + h, hidden), transpose=True),
        CONV: Source("conv1d.weight", (C, 1, K)),
        DT_BIAS: Source("dt_bias", (h,)),
        A_NEG: Source("A_log", (h,), convert=_neg_exp),
        D: Source("D", (h,)),
        NORM: Source("norm.weight", (inner,)),
        OUT_PROJ: Source("out_proj.weight", (hidden, inner), transpose=True),
    }
    if spec.conv_bias:
        sources[wn.bias(CONV)] = Source("conv1d.bias", (C,))
    if spec.proj_bias:
        sources[wn.bias(IN_PROJ)] = Source("in_proj.bias", (inner + C + h,))
        sources[wn.bias(OUT_PROJ)] = Source("out_proj.bias", (hidden,))
    return sources


def mamba2_weights(spec: Mamba2Spec, hidden: int, get: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """Every canonical weight from one layer's ``mamba`` module, ``get`` giving its tensors
    (``in_proj.weight`` ...) as float32 arrays."""
    return {name: source.make(get(source.tensor)) for name, source in mamba2_sources(spec, hidden).items()}


def mamba2_mixer(ctx: GraphContext, spec: Mamba2Spec, prefix: str, x_BSH: ir.Value, mask_BS: ir.Value,
                 past_conv: ir.Value, past_ssm: ir.Value, form: str = "scan", chunk_size: int = CHUNK,
                 ) -> tuple[ir.Value, ir.Value, ir.Value]:
    """The mixer over ``x_BSH`` (normed, compute dtype) with ``mask_BS`` (int64, the attention
    mask's columns of the S new tokens): ``(y_BSH, present_conv, present_ssm)``."""
    if form not in FORMS:
        raise ValueError(f"unknown Mamba2 form {form!r}; expected one of {FORMS}")
    op = ctx.op
    inner, C, h, P, N, G = (spec.intermediate_size, spec.conv_dim, spec.num_heads, spec.head_dim,
                            spec.state_size, spec.n_groups)
    mask_BS1 = op.Unsqueeze(op.Cast(mask_BS, to=_F), ctx.const([-1]))

    proj = _linear(ctx, spec, op.Mul(x_BSH, ctx.from_float(mask_BS1)), prefix + IN_PROJ)
    z_BSI, xbc_BSC, dt_BSh = op.Split(proj, ctx.const([inner, C, h]), axis=-1, _outputs=3)
    conv_BCS, present_conv = _causal_conv(ctx, spec, prefix, xbc_BSC, past_conv)
    xbc_BSC = op.Mul(_silu(ctx, op.Transpose(conv_BCS, perm=[0, 2, 1])), mask_BS1)
    x_BSI, b_BSGN, c_BSGN = op.Split(xbc_BSC, ctx.const([inner, G * N, G * N]), axis=-1, _outputs=3)

    dt_BSh = op.Softplus(op.Add(ctx.to_float(dt_BSh), ctx.to_float(ctx.weight(prefix + DT_BIAS))))
    if spec.time_step_min > 0 or spec.time_step_max > 0:
        high = ctx.const(spec.time_step_max, _F) if spec.time_step_max > 0 else None
        dt_BSh = op.Clip(dt_BSh, ctx.const(spec.time_step_min, _F), high)
    x_BShP = op.Reshape(x_BSI, ctx.const([0, 0, h, P]))
    inputs = _SsmInputs(
        x=op.Mul(x_BShP, op.Unsqueeze(dt_BSh, ctx.const([-1]))),  # dt x [B, S, h, P]
        a=op.Mul(dt_BSh, ctx.to_float(ctx.weight(prefix + A_NEG))),  # dt A [B, S, h]
        b=_per_head(ctx, b_BSGN, spec), c=_per_head(ctx, c_BSGN, spec))
    state_BhPN = ctx.to_float(past_ssm)
    if form == "scan":
        y_BShP, state = _scan(ctx, prefix, inputs, state_BhPN)
    elif form == "chunked":
        y_BShP, state = _chunked(ctx, spec, inputs, state_BhPN, chunk_size)
    else:  # the recurrence only: the projections stay outside, where onnxruntime fuses them
        one_token = op.Equal(op.Shape(x_BSH, start=1, end=2), ctx.const([1]))
        y_BShP, state = branches(ctx, op.Squeeze(one_token, ctx.const([0])),
                                 lambda c: _scan(c, prefix, inputs, state_BhPN),
                                 lambda c: _chunked(c, spec, inputs, state_BhPN, chunk_size),
                                 f"{prefix}ssm", 2)
    d_h1 = op.Unsqueeze(ctx.to_float(ctx.weight(prefix + D)), ctx.const([-1]))
    y_BShP = op.Add(y_BShP, op.Mul(x_BShP, d_h1))

    y_BSI = _gated_norm(ctx, spec, prefix, op.Reshape(y_BShP, ctx.const([0, 0, inner])), z_BSI)
    return _linear(ctx, spec, y_BSI, prefix + OUT_PROJ), present_conv, ctx.from_float(state)


@dataclass(frozen=True)
class _SsmInputs:
    """The discretized per-token inputs of the recurrence, float32: ``x`` = dt x [B, S, h, P],
    ``a`` = dt A [B, S, h], ``b`` and ``c`` [B, S, h, N] (groups repeated per head)."""

    x: ir.Value
    a: ir.Value
    b: ir.Value
    c: ir.Value


def _linear(ctx: GraphContext, spec: Mamba2Spec, x: ir.Value, name: str) -> ir.Value:
    y = ctx.op.MatMul(x, ctx.weight(name))
    return ctx.op.Add(y, ctx.weight(wn.bias(name))) if spec.proj_bias else y


def _silu(ctx: GraphContext, x: ir.Value) -> ir.Value:
    return ctx.op.Mul(x, ctx.op.Sigmoid(x))


def _causal_conv(ctx: GraphContext, spec: Mamba2Spec, prefix: str, xbc_BSC: ir.Value,
                 past_BCK: ir.Value) -> tuple[ir.Value, ir.Value]:
    """The depthwise conv over ``Concat(past, new)`` in float32 (outputs [B, C, S]) and the new
    state (compute dtype): :func:`moe_onnx.graphs.short_conv.causal_conv`."""
    bias = ctx.weight(wn.bias(prefix + CONV)) if spec.conv_bias else None
    u_BCS = ctx.op.Transpose(xbc_BSC, perm=[0, 2, 1])
    return causal_conv(ctx, u_BCS, past_BCK, ctx.weight(prefix + CONV), bias, spec.conv_dim, in_float=True)


def _per_head(ctx: GraphContext, v_BSGN: ir.Value, spec: Mamba2Spec) -> ir.Value:
    """[B, S, G*N] -> [B, S, h, N], each group's row repeated for its h / G heads."""
    op, G, N = ctx.op, spec.n_groups, spec.state_size
    v_BSG1N = op.Reshape(v_BSGN, ctx.const([0, 0, G, 1, N]))
    if G != spec.num_heads:
        v_BSG1N = op.Expand(v_BSG1N, ctx.const([1, 1, G, spec.num_heads // G, N]))
    return op.Reshape(v_BSG1N, ctx.const([0, 0, spec.num_heads, N]))


def _scan(ctx: GraphContext, prefix: str, s: _SsmInputs, state_BhPN: ir.Value) -> tuple[ir.Value, ir.Value]:
    """``Scan`` over time: outputs [B, S, h, P] and the final state [B, h, P, N]. Inputs are
    shaped outside so the body is Mul, Add and MatMul only (no constants, no outer values), and
    time-major: a Scan over axis 0, the one every runtime implements (onnx's reference evaluator
    takes no other)."""
    op = ctx.op

    def time_major(v: ir.Value, rank: int, axes: list[int]) -> ir.Value:  # [B, S, ...] -> [S, B, ...]
        return op.Unsqueeze(op.Transpose(v, perm=[1, 0, *range(2, rank)]), ctx.const(axes))

    a_SBh11 = op.Exp(time_major(s.a, 3, [-1, -2]))
    x_SBhP1, b_SBh1N, c_SBhN1 = time_major(s.x, 4, [-1]), time_major(s.b, 4, [-2]), time_major(s.c, 4, [-1])

    def name(tail: str) -> str:  # the body's values named apart from the outer graph's
        return f"{prefix}step.{tail}"

    def step(sop, state, decay, x, b, c):
        kept = sop.Mul(state, decay, _outputs=[name("kept")])
        new = sop.Add(kept, sop.Mul(x, b, _outputs=[name("input")]))  # [B, h, P, N]
        return new, sop.MatMul(new, c)  # [B, h, P, 1]

    def value(tail: str) -> ir.Value:
        return ir.Value(name=name(tail), type=ir.TensorType(_F), shape=ir.Shape([None] * 4))

    body = ctx.builder.subgraph(step, inputs=[value(n) for n in ("state", "decay", "x", "b", "c")],
                                outputs=[value("state_out"), value("y")], name=f"{prefix}step")
    state, y_SBhP1 = ctx.op.Scan(state_BhPN, a_SBh11, x_SBhP1, b_SBh1N, c_SBhN1, body=body,
                                 num_scan_inputs=4, _outputs=2)
    return op.Transpose(op.Squeeze(y_SBhP1, ctx.const([-1])), perm=[1, 0, 2, 3]), state


def _chunked(ctx: GraphContext, spec: Mamba2Spec, s: _SsmInputs, state_BhPN: ir.Value, chunk_size: int,
             ) -> tuple[ir.Value, ir.Value]:
    """The SSD form (transformers' ``mamba2_chunk_scan``): outputs [B, S, h, P] and the final
    state. S is padded to c chunks of Q = min(S, chunk_size); padding has dt = 0, so it neither
    decays nor feeds the state."""
    op, h, P, N = ctx.op, spec.num_heads, spec.head_dim, spec.state_size
    S = op.Shape(s.a, start=1, end=2)
    Q = op.Min(S, ctx.const([chunk_size]))
    c = op.Div(op.Sub(op.Add(S, Q), ctx.const([1])), Q)
    pad = op.Sub(op.Mul(c, Q), S)

    def chunks(v: ir.Value, tail: list[int]) -> ir.Value:
        """[B, S, h, *tail] -> head-major chunks [B, h, c, Q, *tail]."""
        zeros = ctx.const([0] * (1 + len(tail)))
        padded = op.Pad(v, op.Concat(ctx.const([0, 0]), zeros, ctx.const([0]), pad, zeros, axis=0))
        split = op.Reshape(padded, op.Concat(ctx.const([0]), c, Q, ctx.const([h, *tail]), axis=0))
        return op.Transpose(split, perm=[0, 3, 1, 2, *range(4, 4 + len(tail))])

    x_BhcQP, b_BhcQN, c_BhcQN, a_BhcQ = chunks(s.x, [P]), chunks(s.b, [N]), chunks(s.c, [N]), chunks(s.a, [])
    cum_BhcQ = op.CumSum(a_BhcQ, ctx.const(-1))

    # Within a chunk: y_l = sum_{s <= l} (C_l . B_s) exp(a_{s+1} + ... + a_l) (dt x)_s.
    scores_BhcQQ = op.Mul(op.MatMul(c_BhcQN, op.Transpose(b_BhcQN, perm=[0, 1, 2, 4, 3])),
                          _decay_matrix(ctx, a_BhcQ, Q))
    y_BhcQP = op.MatMul(scores_BhcQQ, x_BhcQP)

    # Each chunk's own part of the state at its end: sum_l exp(cum_last - cum_l) (dt x)_l ⊗ B_l.
    last_Bhc1 = op.Slice(cum_BhcQ, ctx.const([-1]), ctx.const([_END]), ctx.const([-1]))
    to_end_BhcQ1 = op.Unsqueeze(op.Exp(op.Sub(last_Bhc1, cum_BhcQ)), ctx.const([-1]))
    own_BhcPN = op.MatMul(op.Transpose(x_BhcQP, perm=[0, 1, 2, 4, 3]), op.Mul(b_BhcQN, to_end_BhcQ1))

    # Between chunks: the states entering each chunk and the final one, z = c + 1 of them, from
    # [initial, chunk 0's own, ..., chunk c-1's own] and one [z, z] decay matrix of chunk totals.
    own_BhzF = op.Reshape(op.Concat(op.Unsqueeze(state_BhPN, ctx.const([2])), own_BhcPN, axis=2),
                          ctx.const([0, 0, 0, P * N]))
    totals_Bhz = op.Pad(op.Squeeze(last_Bhc1, ctx.const([-1])), ctx.const([0, 0, 1, 0, 0, 0]))
    entered_BhzF = op.MatMul(_decay_matrix(ctx, totals_Bhz, op.Add(c, ctx.const([1]))), own_BhzF)
    entered_BhzPN = op.Reshape(entered_BhzF, ctx.const([0, 0, 0, P, N]))
    starts_BhcPN = op.Slice(entered_BhzPN, ctx.const([0]), ctx.const([-1]), ctx.const([2]))
    final_BhPN = op.Squeeze(op.Slice(entered_BhzPN, ctx.const([-1]), ctx.const([_END]), ctx.const([2])),
                            ctx.const([2]))

    # From the entering state: y_l += exp(cum_l) C_l . state.
    from_start_BhcQP = op.MatMul(c_BhcQN, op.Transpose(starts_BhcPN, perm=[0, 1, 2, 4, 3]))
    y_BhcQP = op.Add(y_BhcQP, op.Mul(from_start_BhcQP, op.Unsqueeze(op.Exp(cum_BhcQ), ctx.const([-1]))))

    y_BShP = op.Reshape(op.Transpose(y_BhcQP, perm=[0, 2, 3, 1, 4]), ctx.const([0, -1, h, P]))
    return op.Slice(y_BShP, ctx.const([0]), S, ctx.const([1])), final_BhPN


def _decay_matrix(ctx: GraphContext, a: ir.Value, n: ir.Value) -> ir.Value:
    """``exp(a_{s+1} + ... + a_l)`` for l >= s, 0 above the diagonal: [..., n, n] from a [..., n].
    Summed per (l, s) as transformers' ``segment_sum`` does rather than as a difference of two
    cumulative sums, which loses the small sums' precision once the totals grow large."""
    op = ctx.op
    pos = op.Range(ctx.const(0), op.Squeeze(n, ctx.const([0])), ctx.const(1))
    rows, cols = op.Unsqueeze(pos, ctx.const([-1])), op.Unsqueeze(pos, ctx.const([0]))
    # [..., l, s] = a_l, kept below the diagonal and summed down each column.
    expanded = op.Expand(op.Unsqueeze(a, ctx.const([-1])), op.Concat(op.Shape(a), n, axis=0))
    terms = op.Where(op.Greater(rows, cols), expanded, ctx.const(0.0, _F))
    sums = op.CumSum(terms, ctx.const(-2))
    return op.Exp(op.Where(op.GreaterOrEqual(rows, cols), sums, ctx.const(-np.inf, _F)))


def _gated_norm(ctx: GraphContext, spec: Mamba2Spec, prefix: str, y_BSI: ir.Value, z_BSI: ir.Value,
                ) -> ir.Value:
    """``GraniteMoeHybridRMSNormGated``: ``y * silu(z)``, then RMS-normalized per group of I / G,
    times the weight; float32 statistics."""
    op, G = ctx.op, spec.n_groups
    gated = op.Mul(y_BSI, _silu(ctx, ctx.to_float(z_BSI)))
    grouped = op.Reshape(gated, ctx.const([0, 0, G, spec.intermediate_size // G]))
    var = op.ReduceMean(op.Mul(grouped, grouped), ctx.const([-1]), keepdims=1)
    normed = op.Div(grouped, op.Sqrt(op.Add(var, ctx.const(float(spec.norm_eps), _F))))
    normed = op.Reshape(normed, ctx.const([0, 0, spec.intermediate_size]))
    return op.Mul(ctx.from_float(normed), ctx.weight(prefix + NORM))
