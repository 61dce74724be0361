"""glm4_moe beyond the shared parity matrix (parity, every impl, greedy generation and the static
cache are in test_parity, test_runtime and test_static_cache; its routing against transformers'
router in test_families): the group router on forced scores, what inspect says, the refusals."""


import numpy as np
import pytest
from models import assert_config_value_refused, make_model, run_router

import moe_onnx
from moe_onnx.exporter.describe import describe


def test_inspect_names_the_router_and_the_partial_rotary(tmp_path):
    text = describe(moe_onnx.export(make_model("glm4_moe"), tmp_path / "out"))
    assert ("router       top-3 of sigmoid(router logits) + selection bias within the best 2 of 4 expert "
            "groups, weighted by the unbiased sigmoid (renormalised), times 2.5") in text
    assert "rope         partial: the first 8 of 16 dims of each head" in text


@pytest.mark.parametrize("field, value, message", [
    ("scoring_func", "softmax", "glm4_moe with scoring_func 'softmax' is not supported (sigmoid)"),
    ("n_group", 3, "glm4_moe with n_routed_experts 8, n_group 3, topk_group 2: the experts must split"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.5},
     "'partial_rotary_factor' must be in (0, 1], got 1.5"),
])
def test_glm4_moe_unsupported_config_value_is_one_line_naming_it(field, value, message, tmp_path):
    assert_config_value_refused("glm4_moe", field, value, message, tmp_path)


def test_sigmoid_groups_keep_exactly_topk_group_groups():
    """4 groups of 2, 2 kept, top-3: a group's score is the sum of its two best sigmoids; the
    chosen are weighed by their sigmoid, renormalised. Tied group scores still keep exactly 2 groups
    (as transformers scatters torch.topk's indices), and zero tokens route to nothing."""
    from moe_onnx.spec import MoeSpec

    moe = MoeSpec(num_experts=8, top_k=3, expert_size=4, norm_topk_prob=True, router="sigmoid", n_group=4,
                  topk_group=2)
    logits = np.array([[3.0, -2.0, 0.5, 0.4, 2.0, 1.9, -1.0, 4.0],  # sums: g0 .97, g1 1.22, g2 1.75, g3 1.25
                       [2.0, 0.0, 2.0, 0.0, 2.0, 0.0, -1.0, -1.0]])  # g0 = g1 = g2 > g3
    weights, experts = run_router(moe, logits)
    assert sorted(experts[0].tolist()) == [4, 5, 7]  # groups 2 and 3; expert 0 (3.0) is in a dropped group
    chosen = 1 / (1 + np.exp(-np.take_along_axis(logits, experts, -1)))
    np.testing.assert_allclose(weights, chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)
    groups = {e // 2 for e in experts[1].tolist()}
    assert len(groups) == 2 and 3 not in groups
    assert run_router(moe, np.zeros((0, 8)))[1].shape == (0, 3)
