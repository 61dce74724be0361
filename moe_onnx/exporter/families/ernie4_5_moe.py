import dataclasses

from moe_onnx.errors import UnsupportedFamilyError
from moe_onnx.exporter.config import Config, dense_spec, moe_layer_range, moe_spec
from moe_onnx.exporter.family import Family, Names


def spec(cfg: Config):
    if cfg.get("use_bias", False):  # a bias on every projection, the MLPs' included
        raise UnsupportedFamilyError("ernie4_5_moe with use_bias=true is not supported")
    # Hub configs name E and k moe_num_experts / moe_k. Selection: top-k of softmax + bias (the
    # e_score_correction_bias); weights: the unbiased softmax of those k, over max(sum, moe_norm_min).
    cfg = Config({"num_experts": cfg.get("moe_num_experts"), "num_experts_per_tok": cfg.get("moe_k"),
                  **cfg.data}, cfg.source)
    shared = cfg.int("moe_intermediate_size") * cfg.int("moe_num_shared_experts", 0)
    moe = moe_spec(cfg, "moe_intermediate_size", norm_topk_prob=True, selection_bias=True,
                   norm_min=float(cfg.get("moe_norm_min", 1e-12)), shared_expert_size=shared)
    out = dense_spec(cfg, moe=moe, moe_layers=moe_layer_range(cfg),
                     tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)))
    return dataclasses.replace(out, rope=dataclasses.replace(out.rope, interleaved=True))  # GPT-J pairs


# In memory the bias sits under the router (gate.moe_statics); stored (hub, save_pretrained) beside it.
BIAS = "moe_statics.e_score_correction_bias"
NAMES = Names(shared_gate_up=("shared_experts.gate_proj", "shared_experts.up_proj"),
              shared_down="shared_experts.down_proj", router_bias="gate." + BIAS,
              renames=(("mlp." + BIAS, "mlp.gate." + BIAS),))
FAMILY = Family("ernie4_5_moe", spec, NAMES)
