"""DeepSeek-V3 / V3.1 / R1 (and their smaller relatives on the same config class): deepseek_v2's
multi-head latent attention (:mod:`moe_onnx.graphs.mla`; the cache holds the latent and the roped
key) with a query rank, RoPE on the ``qk_rope_head_dim`` dims by halves (with transformers'
``rope_interleave``, the default, the checkpoint's pairs are reordered into halves once at load)
and YaRN's ``mscale_all_dim`` squared on the softmax scale; glm4_moe's router: sigmoid scores plus
``e_score_correction_bias`` choose the top-k within the best ``topk_group`` of ``n_group`` groups
(a group's score: the sum of its two best), the unbiased scores weigh them (renormalised with
``norm_topk_prob``) times ``routed_scaling_factor``; ``n_shared_experts`` x
``moe_intermediate_size`` shared experts; the first ``first_k_dense_replace`` layers dense. The
released checkpoints are FP8 with 128 x 128 block scales (read dequantized,
:mod:`moe_onnx.exporter.fp8`); their multi-token-prediction layers (``num_nextn_predict_layers``,
stored after the last decoder layer) are not part of the decoder and are not read."""

from moe_onnx.exporter.config import Config, expert_groups, moe_spec
from moe_onnx.exporter.families import deepseek_v2
from moe_onnx.exporter.family import Family

# transformers' DeepseekV3Config defaults, for hub configs that leave a field out.
DEFAULTS = dict(kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                n_routed_experts=256, n_shared_experts=1, moe_intermediate_size=2048, first_k_dense_replace=3,
                routed_scaling_factor=2.5, n_group=8, topk_group=4, norm_topk_prob=True, rope_interleave=True)
# What DeepSeek's own config.json says and its modeling code reads, but transformers assumes.
RELEASED = dict(scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1)


def spec(cfg: Config):
    cfg = Config({**DEFAULTS, **cfg.data}, cfg.source)
    deepseek_v2.refuse_unlike_released(cfg, "deepseek_v3", RELEASED)
    experts = cfg.int("n_routed_experts")
    n_group, topk_group = expert_groups(cfg, "deepseek_v3", experts)
    width = cfg.int("moe_intermediate_size")
    moe = moe_spec(Config({**cfg.data, "num_experts": experts}, cfg.source), "moe_intermediate_size",
                   norm_topk_prob=bool(cfg.get("norm_topk_prob")), router="sigmoid", selection_bias=True,
                   n_group=n_group, topk_group=topk_group,
                   routed_scaling_factor=float(cfg.get("routed_scaling_factor")),
                   shared_expert_size=width * cfg.int("n_shared_experts"))
    return deepseek_v2.latent_attention_spec(cfg, moe, interleaved=False,
                                             deinterleave=bool(cfg.get("rope_interleave")))


FAMILY = Family("deepseek_v3", spec, deepseek_v2.NAMES)
