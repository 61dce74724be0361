"""GLM-4.5 / GLM-4.5-Air: sigmoid router with a selection bias (``e_score_correction_bias``),
group-limited top-k (``n_group``, ``topk_group``), ``routed_scaling_factor``; shared experts;
the first ``first_k_dense_replace`` layers dense; partial rotary (``partial_rotary_factor``);
q/k/v biases (``attention_bias``) but none on o_proj; optional per-head q/k norms."""

from moe_onnx.errors import UnsupportedFamilyError
from moe_onnx.exporter.config import Config, dense_spec, expert_groups, moe_spec
from moe_onnx.exporter.family import Family, Names


def spec(cfg: Config):
    experts = cfg.int("n_routed_experts")
    n_group, topk_group = expert_groups(cfg, "glm4_moe", experts)
    scoring = cfg.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise UnsupportedFamilyError(f"glm4_moe with scoring_func {scoring!r} is not supported (sigmoid)")
    cfg = Config({"num_experts": experts, **cfg.data}, cfg.source)
    moe = moe_spec(cfg, "moe_intermediate_size", norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
                   router="sigmoid", selection_bias=True, n_group=n_group, topk_group=topk_group,
                   routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
                   shared_expert_size=cfg.int("moe_intermediate_size") * cfg.int("n_shared_experts", 0))
    dense = cfg.int("first_k_dense_replace", 0)
    layers = tuple(i >= dense for i in range(cfg.int("num_hidden_layers")))
    return dense_spec(cfg, moe=moe, moe_layers=layers, o_bias=False,
                      qk_norm="head" if cfg.get("use_qk_norm", False) else "none")


NAMES = Names(shared_gate_up=("shared_experts.gate_proj", "shared_experts.up_proj"),
              shared_down="shared_experts.down_proj")
FAMILY = Family("glm4_moe", spec, NAMES)
