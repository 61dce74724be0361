"""Routing: the MoE block alone with forced routes, and near-tie routing through a whole export.

Forced routes: the router reads feature 0..E-1 of each token; setting token t's feature e high
sends t to expert e. This pins k = 1, one expert receiving every token, experts receiving none,
one token, many tokens, and k = E, for every dispatch implementation, against a numpy reference.

Near ties (a tiny Mixtral, E=6, k=3, exported and compared with transformers): when router
probabilities at the top-k boundary are equal or within 1e-6, which expert wins is not defined
by the model, and ONNX Runtime and PyTorch do pick differently. Measured (onnxruntime 1.31,
torch 2.13 CPU, transformers 5.23):

- Bit-equal probabilities (every router weight zero, so every logit is exactly 0): ONNX ``TopK``
  takes the lowest indices, experts 0, 1, 2 for every token, as the ONNX spec says ("the element
  with the lower index will appear first"); ``torch.topk`` takes 3, 4, 5 (its documentation:
  "the indices of tied elements are not guaranteed to be stable"). ONNX Runtime's fused
  ``com.microsoft.MoE`` takes one fixed set too, not 0, 1, 2 (3, 4, 5, as torch). So the logits
  of the plain comparison differ completely (relative 1.0).
- Equal in exact arithmetic is not equal in float32: two identical router rows give logits up
  to 2.4e-7 apart in PyTorch (its GEMM rounds the two columns differently), and rows 3e-8 apart
  give logit gaps below 5e-7. Either way each engine's rounding decides, and 1 to 3 of 48 tokens
  per layer got a different expert set (logits then differ by relative 0.13-0.15).
- In every case the export's output equals transformers' when transformers is made to use the
  experts the export chose (relative error < 1e-6), and the export's choice is a valid top-k of
  transformers' own probabilities on that path up to 1e-6. That is what the tests require: the
  ``dispatch``, ``gather`` and ``dense`` graphs expose their choice; for ``fused``, which hides
  it, the all-equal case checks its output is exactly one fixed 3-of-6 choice.
"""

import itertools

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxscript
import pytest
import torch
from models import make_model, tokens_for_routes

import moe_onnx
from moe_onnx.graphs.context import GraphContext
from moe_onnx.graphs.moe import MOE_IMPLS, ROUTE_SUFFIX, moe_block
from moe_onnx.spec import MoeSpec

H, F = 16, 8


class ArrayWeights:
    def __init__(self, arrays):
        self.arrays = arrays

    def tensor(self, name):
        return ir.tensor(self.arrays[name], name=name)

    def blocked(self, name):
        return None  # every weight in float32


def make_weights(moe: MoeSpec, rng):
    E = moe.num_experts
    router = np.zeros((H, E), np.float32)
    router[np.arange(E), np.arange(E)] = 1.0  # logit e = feature e
    gate_up = rng.standard_normal((E, H, 2 * F)).astype(np.float32)
    down = rng.standard_normal((E, F, H)).astype(np.float32)
    w = {"l.router": router, "l.gate_up": gate_up, "l.down": down}
    for e in range(E):
        w[f"l.experts.{e}.gate_up"], w[f"l.experts.{e}.down"] = gate_up[e], down[e]
    # com.microsoft.MoE layout: [E, 2F, H] with gate/up rows interleaved, and [E, H, F].
    fc1 = np.empty((E, 2 * F, H), np.float32)
    fc1[:, 0::2], fc1[:, 1::2] = gate_up[:, :, :F].transpose(0, 2, 1), gate_up[:, :, F:].transpose(0, 2, 1)
    w["l.fc1"], w["l.fc2"] = fc1, down.transpose(0, 2, 1).copy()
    return w


def run_block(moe: MoeSpec, impl: str, weights, x_TH):
    graph = ir.Graph(inputs=[], outputs=[], nodes=[], opset_imports={"": 21}, name="moe")
    builder = onnxscript.GraphBuilder(graph)
    ctx = GraphContext(builder, ArrayWeights(weights), ir.DataType.FLOAT)
    x = builder.input("x", ir.DataType.FLOAT, ["T", H])
    builder.add_output(moe_block(ctx, x, moe, "l.", impl, H), "y")
    graph.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    proto = ir.to_proto(ir.Model(graph, ir_version=10))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x_TH})[0]


def reference(moe: MoeSpec, weights, x_TH):
    logits = x_TH @ weights["l.router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y = np.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        chosen = np.argsort(-probs[t], kind="stable")[: moe.top_k]
        w = probs[t, chosen]
        if moe.norm_topk_prob:
            w = w / w.sum()
        for e, we in zip(chosen, w, strict=True):
            h = x_TH[t] @ weights["l.gate_up"][e]
            g, u = h[:F], h[F:]
            y[t] += we * ((g / (1 + np.exp(-g)) * u) @ weights["l.down"][e])
    return y


CASES = {
    # name: (E, k, routes per token)
    "k1_all_to_one_expert": (8, 1, [[3]] * 40),
    "k1_each_expert_once": (8, 1, [[e] for e in range(8)]),
    "k2_two_experts_unused": (8, 2, [[t % 6, (t + 1) % 6] for t in range(30)]),
    "one_token": (8, 2, [[5, 2]]),
    "many_tokens": (16, 4, [[(t * 7 + j * 3) % 16 for j in range(4)] for t in range(300)]),
    "k_equals_E": (4, 4, [[0, 1, 2, 3], [3, 2, 1, 0]] * 5),
}


@pytest.mark.parametrize("impl", MOE_IMPLS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("norm", [True, False])
def test_forced_routes(case, impl, norm):
    E, k, routes = CASES[case]
    rng = np.random.default_rng(0)
    moe = MoeSpec(num_experts=E, top_k=k, expert_size=F, norm_topk_prob=norm)
    weights = make_weights(moe, rng)
    x = tokens_for_routes(routes, E, H, rng)
    got = run_block(moe, impl, weights, x)
    want = reference(moe, weights, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_zero_tokens():
    moe = MoeSpec(num_experts=4, top_k=2, expert_size=F, norm_topk_prob=True)
    weights = make_weights(moe, np.random.default_rng(0))
    got = run_block(moe, "dispatch", weights, np.zeros((0, H), np.float32))
    assert got.shape == (0, H)


def test_dispatch_graph_reads_each_expert_once():
    """The sparse impl holds per-expert weights and 2 MatMuls per expert, nothing E x T sized."""
    E = 8
    moe = MoeSpec(num_experts=E, top_k=2, expert_size=F, norm_topk_prob=True)
    weights = make_weights(moe, np.random.default_rng(0))
    graph = ir.Graph(inputs=[], outputs=[], nodes=[], opset_imports={"": 21}, name="moe")
    builder = onnxscript.GraphBuilder(graph)
    ctx = GraphContext(builder, ArrayWeights(weights), ir.DataType.FLOAT)
    x = builder.input("x", ir.DataType.FLOAT, ["T", H])
    builder.add_output(moe_block(ctx, x, moe, "l.", "dispatch", H), "y")
    matmuls = [n for n in graph if n.op_type == "MatMul"]
    assert len(matmuls) == 1 + 2 * E  # router + gate_up/down per expert
    assert "l.gate_up" not in graph.initializers  # no stacked copy of all experts


# ---- near-tie routing through a whole export, against transformers (see the module docstring) ----

TIE_TOLERANCE = 1e-6  # router probabilities this close are a tie: either expert is a valid choice


def tied_mixtral(kind: str):
    """The tiny Mixtral of tests/models.py (E=6, k=3, 3 layers) with near-tied routers in every layer."""
    model = make_model("mixtral")
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight  # [E, H]
            if kind == "all_equal":
                w.zero_()  # every logit exactly 0: all six probabilities bit-equal
            elif kind == "duplicate_rows":
                w[4] = w[1]  # equal logits in exact arithmetic, not always in float32
            elif kind == "rows_3e-8_apart":
                w[4] = w[1] + 3e-8  # logits of experts 1 and 4 less than 1e-6 apart
    return model


def onnx_prefill_with_routes(out, ids):
    """Logits and each MoE layer's chosen experts ``[T, k]`` (routing exposed as extra outputs)."""
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    names = [n for node in proto.graph.node for n in node.output if n.endswith(ROUTE_SUFFIX)]
    names.sort(key=lambda n: int(n.split(".")[1]))  # layers.{i}.moe.route.experts
    for name in names:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    options = ort.SessionOptions()
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(out.resolve())
    )
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    B, S = ids.shape
    positions = np.tile(np.arange(S), (B, 1))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": positions,
             "num_logits_to_keep": np.array(0)}
    for past in session.get_inputs()[3:-1]:  # past_key_values.{i}.key/value: empty
        feeds[past.name] = np.zeros((B, past.shape[1], 0, past.shape[3]), np.float32)
    logits, *routes = session.run(["logits", *names], feeds)
    return logits, routes


def transformers_prefill(model, ids, forced=None):
    """Logits, and per layer (router probabilities [T, E], chosen experts [T, k]).

    With ``forced`` (per layer ``[T, k]``) every router uses those experts instead of its own
    ``torch.topk``, weighted by its own renormalised probabilities as Mixtral does.
    """
    seen = []
    gates = [layer.mlp.gate for layer in model.model.layers]

    def routed(gate, layer):
        def forward(hidden):
            logits = torch.nn.functional.linear(hidden.reshape(-1, gate.hidden_dim), gate.weight)
            probs = torch.softmax(logits.float(), dim=-1)
            if forced is None:
                chosen = torch.topk(probs, gate.top_k, dim=-1).indices
            else:
                chosen = torch.from_numpy(np.ascontiguousarray(forced[layer])).reshape(-1, gate.top_k)
            weights = probs.gather(-1, chosen)
            seen.append((probs.numpy().copy(), chosen.numpy().copy()))
            return logits, weights / weights.sum(-1, keepdim=True), chosen
        return forward

    for layer, gate in enumerate(gates):
        gate.forward = routed(gate, layer)
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    finally:
        for gate in gates:
            del gate.forward  # back to the class's own forward
    return logits, seen


def boundary_gaps(probs_TE, k):
    """Per token, the k-th largest probability minus the (k+1)-th."""
    top = -np.sort(-probs_TE, axis=-1)
    return top[:, k - 1] - top[:, k]


def rel_err(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


TIE_IDS = np.random.default_rng(0).integers(0, 128, size=(2, 24), dtype=np.int64)  # 48 tokens


@pytest.mark.parametrize("impl", ["dispatch", "gather", "dense"])
@pytest.mark.parametrize("kind", ["all_equal", "duplicate_rows", "rows_3e-8_apart"])
def test_near_tie_routing_is_a_valid_top_k_choice(kind, impl, tmp_path):
    model = tied_mixtral(kind)
    k = model.config.num_experts_per_tok
    out = moe_onnx.export(model, tmp_path / "out", moe_impl=impl)
    logits, routes = onnx_prefill_with_routes(out, TIE_IDS)
    assert len(routes) == model.config.num_hidden_layers

    # transformers made to take the export's choice, layer by layer: the same path, so the same logits
    forced_logits, forced = transformers_prefill(model, TIE_IDS, forced=routes)
    assert rel_err(logits, forced_logits) <= 1e-4
    assert (logits.argmax(-1) == forced_logits.argmax(-1)).all()

    ties = 0
    for layer, (chosen_TK, (probs_TE, _)) in enumerate(zip(routes, forced, strict=True)):
        assert chosen_TK.shape == (TIE_IDS.size, k)
        assert all(len(set(row)) == k for row in chosen_TK.tolist()), f"layer {layer}: an expert twice"
        # a valid top-k: no expert left out is more probable (beyond a tie) than one chosen
        picked = np.take_along_axis(probs_TE, chosen_TK, axis=-1).min(-1)
        is_chosen = np.zeros(probs_TE.shape, bool)
        np.put_along_axis(is_chosen, chosen_TK, True, axis=-1)
        worst = np.where(is_chosen, -np.inf, probs_TE).max(-1) - picked
        assert (worst <= TIE_TOLERANCE).all(), (
            f"layer {layer}: tokens {np.flatnonzero(worst > TIE_TOLERANCE)}"
        )
        ties += int((boundary_gaps(probs_TE, k) < TIE_TOLERANCE).sum())
        if kind == "all_equal":
            # bit-equal probabilities: ONNX TopK's rule, the lower index first
            assert (chosen_TK == np.arange(k)).all(), f"layer {layer}: {np.unique(chosen_TK, axis=0)}"
    assert ties > 0, "the case has no near-tie at the top-k boundary: it tests nothing"


def test_fused_moe_takes_one_fixed_choice_among_equal_experts(tmp_path):
    """com.microsoft.MoE hides its routing: with every probability equal, its output must be
    transformers' with one fixed 3-of-6 expert set in every layer (measured: 3, 4, 5)."""
    model = tied_mixtral("all_equal")
    E, k = model.config.num_local_experts, model.config.num_experts_per_tok
    out = moe_onnx.export(model, tmp_path / "out", moe_impl="fused")
    logits, routes = onnx_prefill_with_routes(out, TIE_IDS)
    assert routes == []
    layers, tokens = model.config.num_hidden_layers, TIE_IDS.size
    matching = []
    for subset in itertools.combinations(range(E), k):
        forced = [np.tile(np.array(subset), (tokens, 1))] * layers
        if rel_err(logits, transformers_prefill(model, TIE_IDS, forced=forced)[0]) <= 1e-4:
            matching.append(subset)
    assert len(matching) == 1, matching

