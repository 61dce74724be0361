"""Qwen3-Next (Qwen3-Next-80B-A3B): a hybrid of Gated DeltaNet (``layer_types`` "linear_attention":
:mod:`moe_onnx.graphs.deltanet`, states ``past_conv.{i}`` and ``past_recurrent.{i}``; by default
every ``full_attention_interval``-th layer is attention) and gated attention: ``q_proj`` holds
per head its query, then a gate that scales the head's output by its sigmoid before ``o_proj``;
per-head q/k RMSNorm, partial rotary (``partial_rotary_factor``, 0.25 when absent). Every RMSNorm
but DeltaNet's gated one is zero-centred (stored w, applied 1 + w; the loader adds the 1). Experts:
softmax top-k (``norm_topk_prob``, on unless set) plus a shared expert scaled by sigmoid(x @ w);
``mlp_only_layers`` and ``decoder_sparse_step`` dense. The MTP layer (``mtp.*``) is not read."""

from moe_onnx.errors import CheckpointError, UnsupportedFamilyError
from moe_onnx.exporter.config import Config, dense_spec, moe_spec, sparse_layers
from moe_onnx.exporter.family import Family, Names
from moe_onnx.spec import DeltaNetSpec

MIXERS = {"linear_attention": "linear_attention", "full_attention": "attention"}
# transformers' Qwen3NextConfig defaults, for configs that leave them out.
DEFAULTS = dict(partial_rotary_factor=0.25, linear_conv_kernel_dim=4, linear_key_head_dim=128,
                linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
                full_attention_interval=4, norm_topk_prob=True)


def layer_types(cfg: Config, n: int) -> tuple[str, ...]:
    """Each layer's mixer from ``layer_types``, or every ``full_attention_interval``-th attention."""
    types = cfg.get("layer_types")
    if types is None:
        every = cfg.int("full_attention_interval") or 1
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n or any(t not in MIXERS for t in types):
        raise CheckpointError(f"{cfg.source}: 'layer_types' must list {n} entries of {sorted(MIXERS)}, "
                              f"got {types!r}")
    return tuple(MIXERS[t] for t in types)


def deltanet_spec(cfg: Config) -> DeltaNetSpec:
    k_heads, v_heads = cfg.int("linear_num_key_heads"), cfg.int("linear_num_value_heads")
    if k_heads == 0 or v_heads % k_heads:
        raise CheckpointError(f"{cfg.source}: linear_num_value_heads {v_heads} is not a multiple of "
                              f"linear_num_key_heads {k_heads}")
    dims = {f: cfg.int(f"linear_{f}") for f in ("key_head_dim", "value_head_dim", "conv_kernel_dim")}
    return DeltaNetSpec(num_k_heads=k_heads, num_v_heads=v_heads, head_k_dim=dims["key_head_dim"],
                        head_v_dim=dims["value_head_dim"], conv_kernel=dims["conv_kernel_dim"],
                        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)))


def hybrid_fields(cfg: Config) -> dict:
    """What qwen3_next and qwen3_5_moe share beside the experts: the mixers and the gated attention."""
    gate = cfg.get("attn_output_gate", True)
    if gate is not True:  # vLLM reads it; transformers always gates
        raise UnsupportedFamilyError(f"{cfg.get('model_type')} with attn_output_gate={gate!r} is not "
                                     "supported")
    n = cfg.int("num_hidden_layers")
    return dict(qk_norm="head", attention_gate=True, layer_types=layer_types(cfg, n),
                deltanet=deltanet_spec(cfg))


def with_defaults(cfg: Config) -> Config:
    """``cfg`` with transformers' defaults where a field is absent (``partial_rotary_factor`` may
    also sit in ``rope_parameters``)."""
    data = {**DEFAULTS, **{k: v for k, v in cfg.data.items() if v is not None}}
    if "partial_rotary_factor" in (cfg.get("rope_parameters") or {}):
        data.pop("partial_rotary_factor")
    return Config(data, cfg.source)


def spec(cfg: Config):
    cfg = with_defaults(cfg)
    moe = moe_spec(cfg, "moe_intermediate_size", norm_topk_prob=bool(cfg.get("norm_topk_prob")),
                   shared_expert_size=cfg.int("shared_expert_intermediate_size"), shared_expert_gate=True)
    return dense_spec(cfg, moe=moe, moe_layers=sparse_layers(cfg, cfg.int("num_hidden_layers")),
                      **hybrid_fields(cfg))


NAMES = Names(query_gate=True, zero_centred_norms=True)
FAMILY = Family("qwen3_next", spec, NAMES)
