"""AFMoE (Arcee's Trinity-Nano, Trinity-Mini): attention only, but unlike Llama in five ways.
Gated attention (the heads' outputs times sigmoid(``gate_proj``) before ``o_proj``) with per-head
q/k RMSNorm; sliding-window layers (``layer_types``; by default every ``global_attn_every_n_layers``-th
layer is global) of which only the sliding ones use RoPE, the global ones none (NoPE); "dual
normalization": besides the norms before attention and before the feed-forward, a norm on each
one's output before its residual add; the first ``num_dense_layers`` feed-forwards dense, then a
sigmoid router whose ``expert_bias`` picks the experts, the unbiased scores renormalised (divided by
their sum + 1e-20) times ``route_scale``, plus ``num_shared_experts`` x ``moe_intermediate_size``
of ungated shared experts; muP (``mup_enabled``) scales the embeddings by sqrt(hidden_size)."""

import math

from moe_onnx.exporter.config import Config, dense_spec, moe_spec, sliding_layers
from moe_onnx.exporter.family import Family, Names

# transformers' AfmoeConfig defaults, for hub configs that leave them out.
DEFAULTS = dict(num_dense_layers=1, num_shared_experts=2, route_scale=1.0, global_attn_every_n_layers=4,
                sliding_window=1024, mup_enabled=False, rms_norm_eps=1e-5, head_dim=128)


def spec(cfg: Config):
    cfg = Config({**DEFAULTS, **cfg.data}, cfg.source)
    n = cfg.int("num_hidden_layers")
    if not cfg.get("layer_types"):
        every = cfg.int("global_attn_every_n_layers") or 1
        cfg.data["layer_types"] = ["sliding_attention" if (i + 1) % every else "full_attention"
                                   for i in range(n)]
    sliding = sliding_layers(cfg)
    width = cfg.int("moe_intermediate_size")
    moe = moe_spec(cfg, "moe_intermediate_size", norm_topk_prob=True, router="sigmoid", selection_bias=True,
                   routed_scaling_factor=float(cfg.get("route_scale")),
                   shared_expert_size=width * cfg.int("num_shared_experts"))
    dense = cfg.int("num_dense_layers")
    multiplier = math.sqrt(cfg.int("hidden_size")) if cfg.get("mup_enabled") else 1.0
    return dense_spec(cfg, moe=moe, moe_layers=tuple(i >= dense for i in range(n)), qk_norm="head",
                      sliding_layers=sliding, rope_layers=sliding, attention_gate=True, sandwich_norms=True,
                      embedding_multiplier=multiplier)


NAMES = Names(post_mixer_norm="post_attention_layernorm.weight", post_norm="pre_mlp_layernorm.weight",
              post_ffn_norm="post_mlp_layernorm.weight", attention_gate="self_attn.gate_proj",
              router="router.gate.weight", router_bias="expert_bias",
              shared_gate_up=("shared_experts.gate_proj", "shared_experts.up_proj"),
              shared_down="shared_experts.down_proj")
FAMILY = Family("afmoe", spec, NAMES)
