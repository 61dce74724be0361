"""The one sparse MoE block every MoE architecture uses: router, TopK, expert dispatch.

Legend: T tokens (batch x sequence, flattened), H hidden, E experts, K chosen per token,
F expert width, TK = T*K routed slots.

Dispatch implementations (``MOE_IMPLS``), all plain ONNX:
- ``dispatch`` (default): sort the T*K routed slots by expert once, Split the gathered rows by
  per-expert counts, then per expert only its two MatMuls (gate_up, down) on just its rows,
  with its own weights used in place; the activation runs once over all rows; a Gather by the
  inverse permutation puts rows back. Work and weight reads grow with K, not E; the graph has
  2 nodes per expert.
- ``gather``: gather the chosen experts' weight matrices per slot and batch-MatMul. Copies the
  K experts' weights per token: fine for one token, heavy for long prefill.
- ``dense``: every expert on every token, combined with the sparse gate — the baseline.
- ``fused``: ONNX Runtime's ``com.microsoft.MoE`` contrib op (routing included; gate/up rows
  interleaved as its CPU kernel requires), or with quantized experts ``com.microsoft.QMoE`` over
  the same integers and scales as ``dispatch`` (router in float). ONNX Runtime only; a peer to
  measure against. QMoE needs the hidden size and expert width to be multiples of the block size.

Router and expert options (``MoeSpec``): a logit bias (``logit_bias`` [E]); expert biases
(``gate_up_bias`` [E, 2F], ``down_bias`` [E, H]: dispatch gathers each sorted row's expert's bias
once per layer, not per expert); the clamped, shifted SwiGLU of :func:`moe_onnx.graphs.mlp.swiglu`.
The fused ops take all three (bias inputs, ``swiglu_limit``, ``activation_alpha``/``_beta``).
"""

from __future__ import annotations

import onnx_ir as ir

from moe_onnx import weight_names as wn
from moe_onnx.errors import ExportError
from moe_onnx.graphs.context import GraphContext
from moe_onnx.graphs.mlp import gated_mlp, swiglu
from moe_onnx.spec import MoeSpec

MOE_IMPLS = ("dispatch", "gather", "dense", "fused")
MS_DOMAIN = "com.microsoft"
ROUTE_SUFFIX = "route.experts"  # value ``layers.{i}.moe.route.experts``: chosen experts [T, K]
DEFAULT_MOE_IMPL = "dispatch"


def route(ctx: GraphContext, x_TH: ir.Value, moe: MoeSpec, prefix: str):
    """Router logits -> softmax (float32) -> TopK (or PhiMoE's sparsemixer) -> optional
    renormalisation. A selection bias (``router_bias`` [E]) shifts the probabilities TopK ranks,
    not the weights it returns; ``norm_min`` floors the renormalising sum.

    Returns (weights_TK in the compute dtype, experts_TK int64).
    """
    op = ctx.op
    logits_TE = router_logits(ctx, x_TH, moe, prefix)
    if moe.router == "sigmoid":
        weights_TK, experts_TK = sigmoid_groups(ctx, ctx.to_float(logits_TE), moe, prefix)
    elif moe.router == "sparsemixer":
        weights_TK, experts_TK = sparsemixer(ctx, ctx.to_float(logits_TE), moe)
    else:
        probs_TE = op.Softmax(ctx.to_float(logits_TE), axis=-1)
        if moe.n_group > 1 and moe.topk_group < moe.n_group:
            probs_TE = best_groups_only(ctx, probs_TE, moe)
        scores_TE = probs_TE
        if moe.selection_bias:  # the bias picks the experts; their unbiased probabilities weigh them
            scores_TE = op.Add(probs_TE, ctx.to_float(ctx.weight(prefix + wn.ROUTER_BIAS)))
        weights_TK, experts_TK = op.TopK(scores_TE, ctx.const([moe.top_k]), axis=-1, _outputs=2)
        if moe.selection_bias:
            weights_TK = op.GatherElements(probs_TE, experts_TK, axis=1)
    # A stable name lets tools expose the routing as an extra output (routing statistics).
    experts_TK.name = prefix + ROUTE_SUFFIX
    if moe.norm_topk_prob:
        sum_T1 = op.ReduceSum(weights_TK, ctx.const([-1]), keepdims=1)
        if moe.norm_min:
            sum_T1 = op.Max(sum_T1, ctx.const(moe.norm_min, ir.DataType.FLOAT))
        weights_TK = op.Div(weights_TK, sum_T1)
    if moe.routed_scaling_factor != 1.0:
        weights_TK = op.Mul(weights_TK, ctx.const(moe.routed_scaling_factor, ir.DataType.FLOAT))
    return ctx.from_float(weights_TK), experts_TK


def sigmoid_groups(ctx: GraphContext, logits_TE: ir.Value, moe: MoeSpec, prefix: str):
    """glm4_moe's and deepseek_v3's choice (float32 ``[T, K]`` weights, int64 experts): sigmoid
    scores; the scores plus ``router_bias`` pick, from the ``topk_group`` best of ``n_group``
    groups (a group's score is the sum of its two best biased scores; the others are masked), the
    top k, which the unbiased scores weigh."""
    op = ctx.op
    f32 = ir.DataType.FLOAT
    scores_TE = op.Sigmoid(logits_TE)
    choice_TE = scores_TE
    if moe.selection_bias:
        choice_TE = op.Add(scores_TE, ctx.to_float(ctx.weight(prefix + wn.ROUTER_BIAS)))
    if moe.n_group > 1 and moe.topk_group < moe.n_group:
        G, per = moe.n_group, moe.num_experts // moe.n_group
        grouped_TGe = op.Reshape(choice_TE, ctx.const([-1, G, per]))
        best2, _ = op.TopK(grouped_TGe, ctx.const([2]), axis=2, _outputs=2)
        keep_TG = _best_groups(ctx, op.ReduceSum(best2, ctx.const([2]), keepdims=0), moe)
        keep_TG1 = op.Cast(op.Unsqueeze(keep_TG, ctx.const([2])), to=ir.DataType.BOOL)
        masked_TGe = op.Where(keep_TG1, grouped_TGe, ctx.const(float("-inf"), f32))
        choice_TE = op.Reshape(masked_TGe, ctx.const([-1, moe.num_experts]))
    _, experts_TK = op.TopK(choice_TE, ctx.const([moe.top_k]), axis=-1, _outputs=2)
    # axis 1, not -1: onnx's ReferenceEvaluator (1.23) mis-reads a negative GatherElements axis.
    return op.GatherElements(scores_TE, experts_TK, axis=1), experts_TK


def best_groups_only(ctx: GraphContext, probs_TE: ir.Value, moe: MoeSpec) -> ir.Value:
    """deepseek_v2's ``group_limited_greedy`` (float32 ``[T, E]``): the probabilities of all but
    the ``topk_group`` of ``n_group`` expert groups with the highest best probability are zeroed,
    as transformers masks them, so TopK picks within the kept groups (and weighs by the rest)."""
    op = ctx.op
    G, per = moe.n_group, moe.num_experts // moe.n_group
    probs_TGe = op.Reshape(probs_TE, ctx.const([-1, G, per]))
    keep_TG = _best_groups(ctx, op.ReduceMax(probs_TGe, ctx.const([2]), keepdims=0), moe)
    masked_TGe = op.Mul(probs_TGe, op.Unsqueeze(keep_TG, ctx.const([-1])))
    return op.Reshape(masked_TGe, ctx.const([-1, moe.num_experts]))


def _best_groups(ctx: GraphContext, group_TG: ir.Value, moe: MoeSpec) -> ir.Value:
    """float32 ``[T, G]``: 1 for each of the ``topk_group`` groups with the highest score, 0 for the
    others: exactly ``topk_group`` per token, as transformers scatters torch.topk's indices (a tie
    is broken by TopK's order). Positive axes: onnxruntime 1.31 mis-shapes some reductions over a
    negative axis of an empty input (T = 0)."""
    op = ctx.op
    _, kept_Tk = op.TopK(group_TG, ctx.const([moe.topk_group]), axis=1, _outputs=2)
    hit_TkG = op.Cast(op.Equal(op.Unsqueeze(kept_Tk, ctx.const([2])), ctx.const(list(range(moe.n_group)))),
                      to=ir.DataType.FLOAT)
    return op.ReduceMax(hit_TkG, ctx.const([1]), keepdims=0)


def router_logits(ctx: GraphContext, x_TH: ir.Value, moe: MoeSpec, prefix: str) -> ir.Value:
    """``x @ router`` (+ ``logit_bias`` [E]): ``[T, E]`` in the compute dtype."""
    logits_TE = ctx.op.MatMul(x_TH, ctx.weight(prefix + wn.ROUTER))
    return ctx.op.Add(logits_TE, ctx.weight(prefix + wn.LOGIT_BIAS)) if moe.logit_bias else logits_TE


def expert_act(ctx: GraphContext, gate_up: ir.Value, moe: MoeSpec) -> ir.Value:
    """The experts' gated activation, clamped and shifted as ``moe`` says."""
    return swiglu(ctx, gate_up, moe.swiglu_alpha, moe.swiglu_beta, moe.swiglu_limit)


def sparsemixer(ctx: GraphContext, scores_TE: ir.Value, moe: MoeSpec) -> tuple[ir.Value, ir.Value]:
    """PhiMoE's top-2 as transformers computes it in eval mode (float32 ``[T, K=2]`` weights and
    int64 experts): the first expert is the argmax, its weight the softmax over the experts whose
    logit is within ``2 * jitter_eps`` (relative to ``max(|logit|, max)``) of the max; the
    second is the argmax with the first masked out, weighted alike against the second max."""
    op = ctx.op
    f32 = ir.DataType.FLOAT
    minus_inf = ctx.const(float("-inf"), f32)
    abs_TE = op.Abs(scores_TE)

    def pick(candidates_TE: ir.Value) -> tuple[ir.Value, ir.Value]:
        max_T1 = op.ReduceMax(candidates_TE, ctx.const([-1]), keepdims=1)
        expert_T1 = op.ArgMax(candidates_TE, axis=-1, keepdims=1)
        # As transformers: distances from the max of the original scores, scaled by max(|s|, max).
        far_TE = op.Greater(op.Div(op.Sub(max_T1, scores_TE), op.Max(abs_TE, max_T1)),
                            ctx.const(2.0 * moe.jitter_eps, f32))
        gates_TE = op.Softmax(op.Where(far_TE, minus_inf, candidates_TE), axis=-1)
        return op.GatherElements(gates_TE, expert_T1, axis=1), expert_T1

    weight1_T1, expert1_T1 = pick(scores_TE)
    first_TE = op.Equal(expert1_T1, ctx.const(list(range(moe.num_experts))))
    weight2_T1, expert2_T1 = pick(op.Where(first_TE, minus_inf, scores_TE))
    return op.Concat(weight1_T1, weight2_T1, axis=-1), op.Concat(expert1_T1, expert2_T1, axis=-1)


def combine(ctx: GraphContext, y_slots: ir.Value, weights_TK: ir.Value, K: int, H: int) -> ir.Value:
    """Weighted sum of each token's K expert outputs: ``[TK, H] -> [T, H]``."""
    op = ctx.op
    y_TKH = op.Reshape(y_slots, ctx.const([-1, K, H]))
    weighted = op.Mul(y_TKH, op.Unsqueeze(weights_TK, ctx.const([-1])))
    return op.ReduceSum(weighted, ctx.const([1]), keepdims=0)


def dispatch_experts(
    ctx: GraphContext, x_TH: ir.Value, experts_TK: ir.Value, moe: MoeSpec, prefix: str
) -> ir.Value:
    """Token dispatch: returns the expert output of each routed slot, ``[TK, H]`` (slot order)."""
    op = ctx.op
    E = moe.num_experts
    experts_TK1 = op.Reshape(experts_TK, ctx.const([-1]))
    # T*K and the slot positions are the same in every layer: built once per graph.
    n_slots, positions = ctx.shared(f"moe.slots.k{moe.top_k}", lambda: _slot_range(ctx, experts_TK1))
    # Ascending sort of the slots by expert id groups each expert's rows together.
    _, order = op.TopK(experts_TK1, n_slots, axis=0, largest=0, sorted=1, _outputs=2)
    token_of_slot = op.Div(order, ctx.const(moe.top_k))
    x_sorted = op.Gather(x_TH, token_of_slot, axis=0)
    one_hot = op.Equal(op.Unsqueeze(experts_TK1, ctx.const([1])), ctx.const(list(range(E))))
    counts_E = op.ReduceSum(op.Cast(one_hot, to=ir.DataType.INT64), ctx.const([0]), keepdims=0)

    rows = op.Split(x_sorted, counts_E, axis=0, _outputs=E)
    gate_up = [op.MatMul(rows[e], ctx.weight(wn.expert(prefix, e) + wn.GATE_UP)) for e in range(E)]
    gate_up_sorted = op.Concat(*gate_up, axis=0)
    if moe.expert_bias:  # each row's expert's bias, gathered once for all experts
        expert_sorted = op.Gather(experts_TK1, order, axis=0)
        gate_up_bias = ctx.weight(wn.bias(prefix + wn.GATE_UP))
        gate_up_sorted = op.Add(gate_up_sorted, op.Gather(gate_up_bias, expert_sorted))
    hidden = op.Split(expert_act(ctx, gate_up_sorted, moe), counts_E, axis=0, _outputs=E)
    down = [op.MatMul(hidden[e], ctx.weight(wn.expert(prefix, e) + wn.DOWN)) for e in range(E)]
    y_sorted = op.Concat(*down, axis=0)
    if moe.expert_bias:
        y_sorted = op.Add(y_sorted, op.Gather(ctx.weight(wn.bias(prefix + wn.DOWN)), expert_sorted))

    # Inverse permutation: slot s sits at position inverse[s] of the sorted order.
    inverse = op.ScatterElements(order, order, positions, axis=0)
    return op.Gather(y_sorted, inverse, axis=0)


def _slot_range(ctx: GraphContext, slots: ir.Value) -> tuple[ir.Value, ir.Value]:
    op = ctx.op
    n_slots = op.Shape(slots)
    return n_slots, op.Range(ctx.const(0), op.Squeeze(n_slots), ctx.const(1))


def gather_experts(
    ctx: GraphContext, x_TH: ir.Value, experts_TK: ir.Value, moe: MoeSpec, prefix: str
) -> ir.Value:
    """Weight gather: each slot multiplies by a gathered copy of its expert's weights."""
    op = ctx.op
    slots = op.Reshape(experts_TK, ctx.const([-1]))
    tokens = op.Div(op.Range(ctx.const(0), op.Size(slots), ctx.const(1)), ctx.const(moe.top_k))
    x_S1H = op.Unsqueeze(op.Gather(x_TH, tokens, axis=0), ctx.const([1]))
    w_gate_up = op.Gather(ctx.weight(prefix + wn.GATE_UP), slots, axis=0)
    gate_up_S1F = op.MatMul(x_S1H, w_gate_up)
    if moe.expert_bias:
        gate_up_bias = ctx.weight(wn.bias(prefix + wn.GATE_UP))
        gate_up_S1F = op.Add(gate_up_S1F, op.Unsqueeze(op.Gather(gate_up_bias, slots), ctx.const([1])))
    w_down = op.Gather(ctx.weight(prefix + wn.DOWN), slots, axis=0)
    y_S1H = op.MatMul(expert_act(ctx, gate_up_S1F, moe), w_down)
    y_SH = op.Squeeze(y_S1H, ctx.const([1]))
    return op.Add(y_SH, op.Gather(ctx.weight(wn.bias(prefix + wn.DOWN)), slots)) if moe.expert_bias else y_SH


def dense_experts(
    ctx: GraphContext, x_TH: ir.Value, weights_TK, experts_TK, moe: MoeSpec, prefix: str
) -> ir.Value:
    """Every expert on every token, combined with the sparse gate (zeros for unchosen)."""
    op = ctx.op
    x_1TH = op.Unsqueeze(x_TH, ctx.const([0]))
    gate_up_ETF = op.MatMul(x_1TH, ctx.weight(prefix + wn.GATE_UP))
    if moe.expert_bias:
        gate_up_bias = ctx.weight(wn.bias(prefix + wn.GATE_UP))
        gate_up_ETF = op.Add(gate_up_ETF, op.Unsqueeze(gate_up_bias, ctx.const([1])))
    y_ETH = op.MatMul(expert_act(ctx, gate_up_ETF, moe), ctx.weight(prefix + wn.DOWN))
    if moe.expert_bias:
        y_ETH = op.Add(y_ETH, op.Unsqueeze(ctx.weight(wn.bias(prefix + wn.DOWN)), ctx.const([1])))
    shape_TE = op.Concat(op.Shape(x_TH, start=0, end=1), ctx.const([moe.num_experts]), axis=0)
    zeros_TE = op.Expand(ctx.const(0.0, ctx.dtype), shape_TE)
    gate_TE = op.ScatterElements(zeros_TE, experts_TK, weights_TK, axis=1)
    gate_ET1 = op.Unsqueeze(op.Transpose(gate_TE, perm=[1, 0]), ctx.const([-1]))
    return op.ReduceSum(op.Mul(y_ETH, gate_ET1), ctx.const([0]), keepdims=0)


def fused_experts(ctx: GraphContext, x_TH: ir.Value, moe: MoeSpec, prefix: str) -> ir.Value:
    """ONNX Runtime's fused MoE op: softmax, top-k, optional renormalisation and experts in one.

    Float experts: ``com.microsoft.MoE`` on ``fc1`` [E, 2F, H] / ``fc2`` [E, H, F]. Quantized
    experts: ``com.microsoft.QMoE`` on ``qfc1`` / ``qfc2`` (uint8, see
    :func:`moe_onnx.exporter.weights._qmoe_expert`) with block scales ``[E, N, K/block]``.
    """
    op = ctx.op
    ctx.builder.graph.opset_imports[MS_DOMAIN] = 1
    logits_TE = router_logits(ctx, x_TH, moe, prefix)
    # gate * sigmoid(alpha * gate) * (up + beta), gate <= limit and |up| <= limit when a limit is given.
    swiglu_attrs = dict(
        k=moe.top_k,
        activation_type="swiglu",
        swiglu_fusion=1,  # gate/up rows interleaved: the layout the CPU kernels accept
        activation_alpha=moe.swiglu_alpha,
        activation_beta=moe.swiglu_beta,
        normalize_routing_weights=int(moe.norm_topk_prob),
        **({"swiglu_limit": moe.swiglu_limit} if moe.swiglu_limit else {}),
    )
    fc1_bias, fc2_bias = (ctx.weight(wn.bias(prefix + wn.FC1)), ctx.weight(wn.bias(prefix + wn.DOWN))) \
        if moe.expert_bias else (None, None)
    blocked = ctx.weights.blocked(wn.expert(prefix, 0) + wn.GATE_UP)
    if blocked is None:
        y_TH = op.MoE(x_TH, logits_TE, ctx.weight(prefix + wn.FC1), fc1_bias, ctx.weight(prefix + wn.FC2),
                      fc2_bias, _domain=MS_DOMAIN, _version=1, **swiglu_attrs)
    else:
        # QMoE's CPU kernel renormalises the top-k weights even with normalize_routing_weights=0
        # (onnxruntime 1.31); given router_weights it gathers the chosen ones as they are.
        router_weights = [] if moe.norm_topk_prob else [
            None, None, None, None, None, None,  # fc3 weights/scales/bias, fc1..fc3 zero points
            ctx.from_float(op.Softmax(ctx.to_float(logits_TE), axis=-1)),
        ]
        y_TH = op.QMoE(
            x_TH, logits_TE,
            ctx.weight(prefix + wn.QFC1), ctx.weight(wn.scale(prefix + wn.QFC1)), fc1_bias,
            ctx.weight(prefix + wn.QFC2), ctx.weight(wn.scale(prefix + wn.QFC2)), fc2_bias,
            *router_weights,
            _domain=MS_DOMAIN, _version=1, **swiglu_attrs,
            expert_weight_bits=ctx.weights.tensor(wn.expert(prefix, 0) + wn.GATE_UP).dtype.bitwidth,
            block_size=blocked.block_size,
            weights_prepacked=0,  # plain [E, N, K*bits/8] initializers
            accuracy_level=4,  # int8 activations per block, as MatMulNBits does by default on CPU
        )
    # onnx has no schema for contrib ops: state the output type so inference can go on.
    y_TH.type, y_TH.shape = ir.TensorType(ctx.dtype), x_TH.shape
    return y_TH


def moe_block(
    ctx: GraphContext, x_TH: ir.Value, moe: MoeSpec, prefix: str, impl: str, hidden_size: int
) -> ir.Value:
    """The MoE feed-forward of one layer: ``[T, H] -> [T, H]``, shared expert included."""
    op = ctx.op
    if impl == "fused" and (moe.selection_bias or moe.norm_min or moe.routed_scaling_factor != 1.0):
        raise ExportError("--moe-impl fused cannot express a selection bias, a clamped renormalisation or "
                          "a scaling factor (ONNX Runtime's MoE op routes by softmax alone); use dispatch, "
                          "gather or dense")
    if impl == "fused" and moe.n_group > 1 and moe.topk_group < moe.n_group:
        raise ExportError("--moe-impl fused cannot express group-limited routing (n_group, topk_group: "
                          "ONNX Runtime's MoE op takes the top-k of all experts); use dispatch, gather or "
                          "dense")
    if impl == "fused" and moe.router != "softmax":
        raise ExportError(f"--moe-impl fused cannot express the {moe.router} router "
                          "(ONNX Runtime's MoE op routes by softmax); use dispatch, gather or dense")
    if impl == "fused":
        y_TH = fused_experts(ctx, x_TH, moe, prefix)
    elif impl == "dense":
        weights_TK, experts_TK = route(ctx, x_TH, moe, prefix)
        y_TH = dense_experts(ctx, x_TH, weights_TK, experts_TK, moe, prefix)
    else:
        weights_TK, experts_TK = route(ctx, x_TH, moe, prefix)
        pick = dispatch_experts if impl == "dispatch" else gather_experts
        y_slots = pick(ctx, x_TH, experts_TK, moe, prefix)
        y_TH = combine(ctx, y_slots, weights_TK, moe.top_k, hidden_size)
    if moe.shared_expert_size:
        shared_TH = gated_mlp(ctx, x_TH, wn.shared(prefix))
        if moe.shared_expert_gate:
            gate_T1 = op.Sigmoid(op.MatMul(x_TH, ctx.weight(prefix + wn.SHARED_GATE)))
            shared_TH = op.Mul(shared_TH, gate_T1)
        y_TH = op.Add(y_TH, shared_TH)
    return y_TH
