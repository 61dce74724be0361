"""LFM2-MoE (LiquidAI LFM2-8B-A1B, LFM2-24B-A2B): a hybrid of gated short convolutions
(``layer_types`` "conv": :mod:`moe_onnx.graphs.short_conv`, a ``past_conv.{i}`` state of
``conv_L_cache`` positions) and grouped-query attention with per-head q/k RMSNorm
("full_attention"); the first ``num_dense_layers`` feed-forwards dense (w1/w3/w2), the rest sparse:
sigmoid router, ``expert_bias`` [E] added for the choice only, the unbiased scores renormalised
(``norm_topk_prob``; transformers divides by sum + 1e-6, here by the sum: 5e-7 relative) times
``routed_scaling_factor``. The final norm is named ``embedding_norm``; embeddings tied by default
(``tie_embedding`` in the released config.json)."""

from moe_onnx.errors import CheckpointError
from moe_onnx.exporter.config import Config, dense_spec, moe_spec
from moe_onnx.exporter.family import Family, Names
from moe_onnx.spec import ShortConvSpec

MIXERS = {"conv": "conv", "full_attention": "attention"}


def layer_types(cfg: Config, n: int) -> tuple[str, ...]:
    """Each layer's mixer from ``layer_types`` (or the older ``full_attn_idxs``)."""
    types = cfg.get("layer_types")
    if types is None and cfg.get("full_attn_idxs") is not None:
        full = set(cfg.get("full_attn_idxs"))
        types = ["full_attention" if i in full else "conv" for i in range(n)]
    if not isinstance(types, list) or len(types) != n or any(t not in MIXERS for t in types):
        raise CheckpointError(f"{cfg.source}: 'layer_types' must list {n} entries of {sorted(MIXERS)}, "
                              f"got {types!r}")
    return tuple(MIXERS[t] for t in types)


def spec(cfg: Config):
    tied = cfg.get("tie_word_embeddings", cfg.get("tie_embedding", True))
    cfg = Config({**cfg.data, "rms_norm_eps": cfg.get("norm_eps", 1e-5), "tie_word_embeddings": tied},
                 cfg.source)
    n = cfg.int("num_hidden_layers")
    moe = moe_spec(cfg, "moe_intermediate_size", norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
                   router="sigmoid", selection_bias=bool(cfg.get("use_expert_bias", True)),
                   routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)))
    dense = cfg.int("num_dense_layers", 2)
    conv = ShortConvSpec(kernel=cfg.int("conv_L_cache", 3), bias=bool(cfg.get("conv_bias", False)))
    return dense_spec(cfg, moe=moe, moe_layers=tuple(i >= dense for i in range(n)), qk_norm="head",
                      layer_types=layer_types(cfg, n), short_conv=conv)


NAMES = Names(final_norm="embedding_norm.weight", input_norm="operator_norm.weight",
              post_norm="ffn_norm.weight", o_proj="self_attn.out_proj",
              q_norm="self_attn.q_layernorm.weight", k_norm="self_attn.k_layernorm.weight",
              mlp_gate_up=("feed_forward.w1", "feed_forward.w3"), mlp_down="feed_forward.w2",
              moe="feed_forward", router_bias="expert_bias", expert_gate_up=("w1", "w3"), expert_down="w2")
FAMILY = Family("lfm2_moe", spec, NAMES)
