"""The MoE block alone, with routes forced through the router weights, against a numpy reference.

The router reads feature 0..E-1 of each token; setting token t's feature e high sends t to
expert e. This pins k = 1, one expert receiving every token, experts receiving none, one token,
many tokens, and k = E, for every dispatch implementation.
"""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import onnxscript
import pytest

from moe_onnx.graphs.context import GraphContext
from moe_onnx.graphs.moe import MOE_IMPLS, moe_block
from moe_onnx.spec import MoeSpec

H, F = 16, 8


class ArrayWeights:
    def __init__(self, arrays):
        self.arrays = arrays

    def tensor(self, name):
        return ir.tensor(self.arrays[name], name=name)


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


def tokens_for_routes(routes, E, rng):
    """Tokens whose features make expert routes[t][0] first, routes[t][1] second, ..."""
    x = rng.standard_normal((len(routes), H)).astype(np.float32) * 0.1
    x[:, :E] = 0.0
    for t, chosen in enumerate(routes):
        for rank, e in enumerate(chosen):
            x[t, e] = 8.0 - 2.0 * rank
    return x


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
    x = tokens_for_routes(routes, E, rng)
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
