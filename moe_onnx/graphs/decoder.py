"""The whole decoder graph, with the inputs and outputs of :mod:`moe_onnx.contract`.

Canonical weight names (ONNX layout, ``[in, out]`` for MatMul):
``embed_tokens`` [V, H]; ``lm_head`` [V, H] (absent when tied; [H, V] when quantized, tied or
not); ``norm`` [H]; per layer
``layers.{i}.``: ``input_norm``, ``post_norm`` [H] (LayerNorm: also ``input_norm_bias``,
``post_norm_bias``, and ``norm_bias``; sandwich norms: ``post_mixer_norm``, ``post_ffn_norm``);
``lm_head_bias`` [V]; ``qkv`` [H, (N+2G)D] (gated attention: [H, (2N+2G)D], the gate last); ``qkv_bias``;
``q_norm``/``k_norm`` [D] (per head) or [N*D]/[G*D] (whole projection); ``o_proj`` [N*D, H];
``sinks`` [N];
dense FFN ``mlp.gate_up`` [H, 2F], ``mlp.down`` [F, H]; MoE ``moe.router`` [H, E],
``moe.experts.{e}.gate_up`` / ``.down`` (dispatch) or stacked ``moe.gate_up`` [E, H, 2F] /
``moe.down`` [E, F, H] (gather, dense); ``moe.shared.gate_up`` / ``.down``, ``moe.shared_gate`` [H, 1];
``moe.logit_bias`` [E]; ``moe.gate_up_bias`` [E, 2F], ``moe.down_bias`` [E, H], ``moe.fc1_bias``
(fused, interleaved). Multi-head latent attention (:mod:`moe_onnx.graphs.mla`) in place of ``qkv``:
``q_proj`` [H, N(Dn+R)] or ``q_a`` [H, Q], ``q_a_norm`` [Q], ``q_b`` [Q, N(Dn+R)]; ``kv_a`` [H, L+R],
``kv_a_norm`` [L]; ``k_up`` [N, Dn, L], ``v_up`` [N, L, Dv] (``kv_b_proj``'s halves); ``q_a_bias``,
``kv_a_bias``; ``o_proj`` [N*Dv, H]. A recurrent layer's token mixer (hybrid models) reads its
weights under ``layers.{i}.{conv|mamba|linear_attention}.``: see :mod:`moe_onnx.graphs.short_conv`,
:mod:`moe_onnx.graphs.mamba2`, :mod:`moe_onnx.graphs.deltanet`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnxscript

from moe_onnx import contract as io
from moe_onnx import dtypes
from moe_onnx import weight_names as wn
from moe_onnx.graphs.attention import AttentionInputs, attention_bias, self_attention, write_index
from moe_onnx.graphs.context import GraphContext, WeightSource
from moe_onnx.graphs.mla import mla_attention
from moe_onnx.graphs.mlp import gated_mlp
from moe_onnx.graphs.moe import moe_block
from moe_onnx.graphs.norms import norm
from moe_onnx.graphs.rope import rope_tables
from moe_onnx.graphs.short_conv import short_conv_mixer
from moe_onnx.spec import ModelSpec

OPSET = 21
STATIC_OPSET = 24  # TensorScatter, the in-place cache update of kv_cache="static"
KV_CACHES = ("concat", "static")
IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 would write 14


@dataclass(frozen=True)
class DecoderOptions:
    """How the decoder is built: compute ``dtype``; ``moe_impl`` (one of
    :data:`moe_onnx.graphs.moe.MOE_IMPLS`); ``kv_cache`` ``concat`` (past and present grow, opset
    21) or ``static`` (a preallocated buffer updated in place, opset 24), see
    :mod:`moe_onnx.contract`; ``kv_dtype`` the cache's storage dtype (None: ``dtype``)."""

    dtype: str = "fp32"
    moe_impl: str = "dispatch"
    kv_cache: str = "concat"
    kv_dtype: str | None = None

    @property
    def static(self) -> bool:
        return self.kv_cache == "static"


def build_decoder(spec: ModelSpec, weights: WeightSource, options: DecoderOptions = DecoderOptions(),
                  ) -> ir.Model:
    """Build the decoder as an ONNX IR model whose initializers come lazily from ``weights``."""
    opset = STATIC_OPSET if options.static else OPSET
    graph = ir.Graph(inputs=[], outputs=[], nodes=[], opset_imports={"": opset}, name="decoder")
    builder = onnxscript.GraphBuilder(graph)
    kv = ir.DataType(dtypes.get(options.kv_dtype).onnx) if options.kv_dtype else None
    ctx = GraphContext(builder, weights, ir.DataType(dtypes.get(options.dtype).onnx), opset, kv)
    op = ctx.op
    input_ids, attention_mask, position_ids, past, states, logits_to_keep = _inputs(ctx, spec, options.static)

    capacity = op.Shape(past[spec.attention_layers[0]][0], start=2, end=3) if options.static else None
    write_B = write_index(ctx, attention_mask, input_ids) if options.static else None
    # One mask per kind of layer (full, or each sliding window), shared by the layers of that kind.
    attention_layers = spec.attention_layers
    biases = {w: attention_bias(ctx, attention_mask, input_ids, spec, w, capacity)
              for w in sorted({spec.window(i) for i in attention_layers})}
    roped = any(spec.uses_rope(i) for i in attention_layers)  # NoPE models: no tables
    cos, sin = rope_tables(ctx, position_ids, spec.rope) if roped else (None, None)
    kinds = {w: AttentionInputs(bias, cos, sin, write_B) for w, bias in biases.items()}
    h = _scaled(ctx, ctx.rows(wn.EMBED, input_ids), spec.embedding_multiplier)
    presents, present_states = [], []
    attention = self_attention if spec.mla is None else mla_attention
    # The new tokens' mask columns [B, S]: a recurrent mixer zeroes the inputs of padding.
    new_mask = op.Slice(attention_mask, op.Neg(op.Shape(input_ids, start=1, end=2)),
                        ctx.const([np.iinfo(np.int64).max]), ctx.const([1])) if states else None
    for i in range(spec.num_layers):
        normed = norm(ctx, h, wn.layer(i) + wn.INPUT_NORM, spec.norm, spec.rms_norm_eps)
        if spec.mixer(i) == "attention":
            mixed, present_k, present_v = attention(ctx, spec, i, normed, kinds[spec.window(i)], past[i])
            presents += [present_k, present_v]
        else:
            mixed, *new_states = recurrent_mixer(ctx, spec, i, normed, new_mask, states[i])
            present_states += new_states
        if spec.sandwich_norms:
            mixed = norm(ctx, mixed, wn.layer(i) + wn.POST_MIXER_NORM, spec.norm, spec.rms_norm_eps)
        h = op.Add(h, _scaled(ctx, mixed, spec.residual_multiplier))
        normed = norm(ctx, h, wn.layer(i) + wn.POST_NORM, spec.norm, spec.rms_norm_eps)
        ffn = feed_forward(ctx, spec, i, normed, options.moe_impl)
        if spec.sandwich_norms:
            ffn = norm(ctx, ffn, wn.layer(i) + wn.POST_FFN_NORM, spec.norm, spec.rms_norm_eps)
        h = op.Add(h, _scaled(ctx, ffn, spec.residual_multiplier))

    # Only the last n positions reach the final norm and lm_head: Slice from -n (n = 0: from 0).
    start = op.Neg(op.Reshape(logits_to_keep, ctx.const([1])))
    h = op.Slice(h, start, ctx.const([np.iinfo(np.int64).max]), ctx.const([1]))
    h = norm(ctx, h, wn.FINAL_NORM, spec.norm, spec.rms_norm_eps)
    _outputs(ctx, spec, lm_head(ctx, spec, h), presents, present_states, options.static)
    return ir.Model(graph, ir_version=IR_VERSION, producer_name="moe-onnx")


def recurrent_mixer(ctx: GraphContext, spec: ModelSpec, i: int, x_BSH: ir.Value, mask_BS: ir.Value,
                    states: list[ir.Value]) -> list[ir.Value]:
    """Layer ``i``'s recurrent token mixer (see :data:`moe_onnx.spec.LAYER_TYPES`): its output and
    its new states, in the order of its ``past_*`` inputs."""
    kind = spec.mixer(i)
    prefix = wn.mixer(i, kind)
    if kind == "conv":
        assert spec.short_conv is not None
        return list(short_conv_mixer(ctx, spec.short_conv, prefix, x_BSH, mask_BS, *states, spec.hidden_size))
    if kind == "mamba":
        from moe_onnx.graphs.mamba2 import mamba2_mixer

        # "auto": an If on the token count, the Scan for one token (decode), the chunked SSD form for
        # more (prefill), each the faster there on onnxruntime CPU (python -m studies.recurrent_prefill).
        return list(mamba2_mixer(ctx, spec.mamba, prefix, x_BSH, mask_BS, *states, form="auto"))
    if kind == "linear_attention":
        from moe_onnx.graphs.deltanet import deltanet_mixer

        return list(deltanet_mixer(ctx, spec.deltanet, prefix, x_BSH, mask_BS, *states, prefill="auto"))
    raise ValueError(f"layer {i}: unknown token mixer {kind!r}")


def _inputs(ctx: GraphContext, spec: ModelSpec, static: bool):
    """The contract's inputs: ids, mask, positions, each attention layer's past (key, value), each
    recurrent layer's states, and ``num_logits_to_keep`` (0: all positions). Returns the pasts
    and states as dicts by layer."""
    builder, i64 = ctx.builder, ir.DataType.INT64
    input_ids = builder.input(io.INPUT_IDS, i64, [io.BATCH, io.SEQUENCE])
    attention_mask = builder.input(io.ATTENTION_MASK, i64, [io.BATCH, io.TOTAL])
    position_ids = builder.input(io.POSITION_IDS, i64, [io.BATCH, io.SEQUENCE])
    # [B, G, P, D] for key and value (MLA: the latent and the roped key, see contract).
    kv_shapes = [[io.BATCH, heads, io.CAPACITY if static else io.PAST, dim] for heads, dim in spec.kv_dims()]
    past = {
        i: (builder.input(io.PAST_KEY % i, ctx.kv, kv_shapes[0]),
            builder.input(io.PAST_VALUE % i, ctx.kv, kv_shapes[1]))
        for i in spec.attention_layers
    }
    states: dict[int, list[ir.Value]] = {}
    for name, shape in spec.state_shapes().items():
        layer = int(name.rsplit(".", 1)[1])
        states.setdefault(layer, []).append(builder.input(name, ctx.dtype, [io.BATCH, *shape]))
    logits_to_keep = builder.input(io.NUM_LOGITS_TO_KEEP, i64, [])
    return input_ids, attention_mask, position_ids, past, states, logits_to_keep


def _outputs(ctx: GraphContext, spec: ModelSpec, logits: ir.Value, presents: list[ir.Value],
             present_states: list[ir.Value], static: bool) -> None:
    """``logits`` [B, kept, V] float32, then each attention layer's present key and value, then
    each recurrent layer's states, typed and shaped."""
    builder, graph = ctx.builder, ctx.builder.graph
    builder.add_output(logits, io.LOGITS)
    graph.outputs[0].shape = ir.Shape([io.BATCH, io.KEPT, spec.vocab_size])
    graph.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    length = io.CAPACITY if static else io.TOTAL
    present_shapes = [[io.BATCH, heads, length, dim] for heads, dim in spec.kv_dims()]
    for j, (name, value) in enumerate(zip(io.present_names(spec.num_layers, spec.layer_types), presents,
                                          strict=True)):
        builder.add_output(value, name)
        value.shape, value.type = ir.Shape(present_shapes[j % 2]), ir.TensorType(ctx.kv)
    for (name, shape), value in zip(spec.state_shapes().items(), present_states, strict=True):
        builder.add_output(value, io.present(name))
        value.shape, value.type = ir.Shape([io.BATCH, *shape]), ir.TensorType(ctx.dtype)


def _scaled(ctx: GraphContext, x: ir.Value, multiplier: float) -> ir.Value:
    """``x * multiplier`` in the compute dtype; no node at 1.0."""
    return x if multiplier == 1.0 else ctx.op.Mul(x, ctx.const(multiplier, ctx.dtype))


def feed_forward(
    ctx: GraphContext, spec: ModelSpec, layer: int, x_BSH: ir.Value, moe_impl: str
) -> ir.Value:
    """The layer's FFN: dense SwiGLU, or the sparse MoE block on the flattened tokens."""
    op = ctx.op
    if not spec.is_moe_layer(layer):
        return gated_mlp(ctx, x_BSH, wn.mlp(layer))
    assert spec.moe is not None
    x_TH = op.Reshape(x_BSH, ctx.const([-1, spec.hidden_size]))
    y_TH = moe_block(ctx, x_TH, spec.moe, wn.moe(layer), moe_impl, spec.hidden_size)
    return op.Reshape(y_TH, op.Shape(x_BSH))


def lm_head(ctx: GraphContext, spec: ModelSpec, h_BSH: ir.Value) -> ir.Value:
    """Logits in float32 (plus ``lm_head_bias``), divided by ``logits_scaling``. In the compute
    dtype ``Gemm(transB=1)`` reads the ``[V, H]`` matrix in place (tied or not); quantized,
    ``lm_head`` is its own ``[H, V]`` blocked MatMul weight."""
    op = ctx.op
    h_TH = op.Reshape(h_BSH, ctx.const([-1, spec.hidden_size]))
    if ctx.is_blocked(wn.LM_HEAD):
        logits_TV = op.MatMul(h_TH, ctx.weight(wn.LM_HEAD))
    else:
        weight = ctx.weight(wn.EMBED if spec.tie_word_embeddings else wn.LM_HEAD)
        logits_TV = op.Gemm(h_TH, weight, transB=1)
    if spec.lm_head_bias:
        logits_TV = op.Add(logits_TV, ctx.weight(wn.bias(wn.LM_HEAD)))
    shape_BSV = op.Concat(op.Shape(h_BSH, start=0, end=2), ctx.const([spec.vocab_size]), axis=0)
    logits_BSV = ctx.to_float(op.Reshape(logits_TV, shape_BSV))
    if spec.logits_scaling != 1.0:
        logits_BSV = op.Div(logits_BSV, ctx.const(spec.logits_scaling, ir.DataType.FLOAT))
    return logits_BSV
