"""DeepSeek-V2 / V2-Lite: multi-head latent attention (:mod:`moe_onnx.graphs.mla`; the cache holds
the latent and the roped key), with or without a query rank (``q_lora_rank``; null in V2-Lite);
RoPE on the ``qk_rope_head_dim`` dims by interleaved pairs (transformers' complex rotation) and,
with a scaled RoPE, YaRN's ``mscale_all_dim`` squared on the softmax scale; a softmax router,
``greedy`` or ``group_limited_greedy`` (a group's score is its best probability), its weights not
renormalised but times ``routed_scaling_factor``; ``n_shared_experts`` x ``moe_intermediate_size``
shared experts; the first ``first_k_dense_replace`` layers dense."""

import dataclasses
import math

from moe_onnx.errors import UnsupportedFamilyError
from moe_onnx.exporter.config import Config, dense_spec, expert_groups, moe_spec
from moe_onnx.exporter.family import Family, Names
from moe_onnx.spec import MlaSpec, ModelSpec, MoeSpec

# transformers' DeepseekV2Config defaults, for hub configs that leave a field out.
DEFAULTS = dict(kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                n_routed_experts=64, n_shared_experts=2, moe_intermediate_size=1407, first_k_dense_replace=0,
                routed_scaling_factor=1.0, topk_method="greedy")
TOPK_METHODS = ("greedy", "group_limited_greedy")


def spec(cfg: Config):
    cfg = Config({**DEFAULTS, **cfg.data}, cfg.source)
    _refuse_what_transformers_and_deepseek_disagree_on(cfg)
    method = cfg.get("topk_method")
    if method not in TOPK_METHODS:
        raise UnsupportedFamilyError(f"deepseek_v2 with topk_method {method!r} is not supported "
                                     f"({', '.join(TOPK_METHODS)})")
    experts, groups = cfg.int("n_routed_experts"), (1, 1)
    if method == "group_limited_greedy":
        groups = expert_groups(cfg, "deepseek_v2", experts)
    width = cfg.int("moe_intermediate_size")
    moe = moe_spec(Config({**cfg.data, "num_experts": experts}, cfg.source), "moe_intermediate_size",
                   norm_topk_prob=False, n_group=groups[0], topk_group=groups[1],
                   routed_scaling_factor=float(cfg.get("routed_scaling_factor")),
                   shared_expert_size=width * cfg.int("n_shared_experts"))
    return latent_attention_spec(cfg, moe, interleaved=True)  # pairs (x[2i], x[2i+1]): a complex rotation


def latent_attention_spec(cfg: Config, moe: MoeSpec, interleaved: bool,
                          deinterleave: bool = False) -> ModelSpec:
    """The spec of a DeepSeek decoder (deepseek_v3's too): MLA from the config's ranks and dims, its
    RoPE turning the ``qk_rope_head_dim`` dims by ``interleaved`` pairs or by halves (``deinterleave``:
    the checkpoint's pairs reordered into halves at load, as transformers' ``rope_interleave`` does at
    run time), dense MLPs for the first ``first_k_dense_replace`` layers and ``moe`` after."""
    mla = MlaSpec(kv_lora_rank=cfg.int("kv_lora_rank"), qk_nope_head_dim=cfg.int("qk_nope_head_dim"),
                  qk_rope_head_dim=cfg.int("qk_rope_head_dim"), v_head_dim=cfg.int("v_head_dim"),
                  q_lora_rank=cfg.int("q_lora_rank", 0), bias=bool(cfg.get("attention_bias", False)),
                  deinterleave_rope=deinterleave)
    # RoPE turns the qk_rope_head_dim dims (transformers' head_dim); num_key_value_heads means nothing here.
    overrides = {"head_dim": mla.qk_rope_head_dim, "num_key_value_heads": cfg.int("num_attention_heads")}
    dense = cfg.int("first_k_dense_replace")
    layers = tuple(i >= dense for i in range(cfg.int("num_hidden_layers")))
    out = dense_spec(Config({**cfg.data, **overrides}, cfg.source), moe=moe, moe_layers=layers, mla=mla,
                     num_kv_heads=1, head_dim=mla.qk_head_dim, qkv_bias=False, o_bias=mla.bias)
    rope = dataclasses.replace(out.rope, interleaved=interleaved)
    return dataclasses.replace(out, rope=rope, attention_scale=softmax_scale(cfg, rope.rope_type, mla))


def softmax_scale(cfg: Config, rope_type: str, mla: MlaSpec) -> float | None:
    """1/sqrt(qk_nope + qk_rope) (None: the spec's default over head_dim), times YaRN's
    ``mscale(factor, mscale_all_dim)`` squared when the RoPE is scaled, as transformers does (for
    deepseek_v3 too)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    m_all = params.get("mscale_all_dim") or 0
    if rope_type == "default" or not m_all:
        return None
    factor = float(params.get("factor") or 1.0)
    mscale = 1.0 if factor <= 1 else 0.1 * m_all * math.log(factor) + 1.0
    return mla.qk_head_dim**-0.5 * mscale * mscale


def _refuse_what_transformers_and_deepseek_disagree_on(cfg: Config) -> None:
    released = dict(norm_topk_prob=False, scoring_func="softmax", moe_layer_freq=1)
    refuse_unlike_released(cfg, "deepseek_v2", released)


def refuse_unlike_released(cfg: Config, family: str, released: dict) -> None:
    """Fields transformers ignores but DeepSeek's own modeling code reads: a value other than the
    released models' would make the two disagree, so it is refused by name."""
    for field, value in released.items():
        if cfg.get(field, value) != value:
            raise UnsupportedFamilyError(f"{family} with {field} {cfg.get(field)!r} is not supported "
                                         f"({value!r}, as the released models and transformers have it)")


NAMES = Names(shared_gate_up=("shared_experts.gate_proj", "shared_experts.up_proj"),
              shared_down="shared_experts.down_proj")
FAMILY = Family("deepseek_v2", spec, NAMES)
