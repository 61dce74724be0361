"""Granite-4.0-H (IBM ``granitemoehybrid``: H-Tiny, H-Small; H-Micro and H-1B dense): Mamba2 (SSD)
layers (``layer_types`` "mamba": :mod:`moe_onnx.graphs.mamba2`, states ``past_conv.{i}`` and
``past_ssm.{i}``) between grouped-query attention layers ("attention") that turn no position in
(``position_embedding_type`` "nope" or absent) or use RoPE ("rope"); Granite's multipliers; each
feed-forward granitemoeshared's, the top-k-softmax router plus an ungated ``shared_mlp``, or with
``num_local_experts`` 0 that ``shared_mlp`` alone, dense. transformers reads the hub's "mamba" /
"attention" as "linear_attention" / "full_attention" and ``save_pretrained`` writes those: both
spellings are read, under ``layer_types`` or the older ``layers_block_type``."""

import dataclasses
import math

from moe_onnx.errors import CheckpointError, UnsupportedFamilyError
from moe_onnx.exporter.config import Config, dense_spec, multiplier_fields, num_experts
from moe_onnx.exporter.families import granitemoe, granitemoeshared
from moe_onnx.exporter.family import Family
from moe_onnx.spec import Mamba2Spec

MIXERS = {"mamba": "mamba", "linear_attention": "mamba", "attention": "attention",
          "full_attention": "attention"}
# transformers' GraniteMoeHybridConfig defaults, for configs that leave fields out.
DEFAULTS = dict(mamba_n_heads=128, mamba_n_groups=1, mamba_d_state=256, mamba_d_head="auto", mamba_d_conv=4,
                mamba_expand=2, mamba_conv_bias=True, mamba_proj_bias=False, num_local_experts=8,
                num_experts_per_tok=2, shared_intermediate_size=1024, position_embedding_type="nope")


def spec(cfg: Config):
    cfg = Config({**DEFAULTS, **{k: v for k, v in cfg.data.items() if v is not None}}, cfg.source)
    n, shared = cfg.int("num_hidden_layers"), cfg.int("shared_intermediate_size")
    hybrid = dict(layer_types=layer_types(cfg, n), mamba=mamba(cfg), rope_layers=rope_layers(cfg, n))
    if num_experts(cfg) == 0:  # the shared MLP alone, as a dense feed-forward
        return dense_spec(cfg, intermediate_size=shared, **multiplier_fields(cfg), **hybrid)
    return dataclasses.replace(granitemoe.spec(cfg, shared_expert_size=shared), **hybrid)


def layer_types(cfg: Config, n: int) -> tuple[str, ...]:
    """Each layer's mixer; transformers makes every layer Mamba2 when none are listed."""
    types = cfg.get("layer_types", cfg.get("layers_block_type", ["mamba"] * n))
    if not isinstance(types, list) or len(types) != n:
        raise CheckpointError(f"{cfg.source}: 'layer_types' must list {n} layers, got {types!r}")
    for i, kind in enumerate(types):
        if kind not in MIXERS:
            raise UnsupportedFamilyError(f"granitemoehybrid layer {i}: layer type {kind!r} is not supported "
                                         f"({', '.join(MIXERS)})")
    if "attention" not in (kinds := tuple(MIXERS[t] for t in types)):
        raise UnsupportedFamilyError("granitemoehybrid without an attention layer is not supported")
    return kinds


def rope_layers(cfg: Config, n: int) -> tuple[bool, ...]:
    """() (RoPE everywhere) for "rope", no layer for NoPE."""
    kind = cfg.get("position_embedding_type")
    if kind not in ("nope", "rope"):
        raise UnsupportedFamilyError(f"granitemoehybrid with position_embedding_type {kind!r} is not "
                                     "supported (nope, rope)")
    return () if kind == "rope" else (False,) * n


def mamba(cfg: Config) -> Mamba2Spec:
    hidden, heads, groups = cfg.int("hidden_size"), cfg.int("mamba_n_heads"), cfg.int("mamba_n_groups")
    inner = cfg.int("mamba_expand") * hidden
    head_dim = inner // max(heads, 1) if cfg.get("mamba_d_head") == "auto" else cfg.int("mamba_d_head")
    if heads == 0 or heads * head_dim != inner:
        raise CheckpointError(f"{cfg.source}: mamba_n_heads {heads} x mamba_d_head {head_dim} must be "
                              f"mamba_expand x hidden_size = {inner}")
    if groups == 0 or heads % groups:
        raise CheckpointError(f"{cfg.source}: mamba_n_groups {groups} must divide mamba_n_heads {heads}")
    low, high = time_step_limit(cfg)
    return Mamba2Spec(num_heads=heads, head_dim=head_dim, state_size=cfg.int("mamba_d_state"),
                      n_groups=groups, conv_kernel=cfg.int("mamba_d_conv"), intermediate_size=inner,
                      conv_bias=bool(cfg.get("mamba_conv_bias")), proj_bias=bool(cfg.get("mamba_proj_bias")),
                      norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), time_step_min=low, time_step_max=high)


def time_step_limit(cfg: Config) -> tuple[float, float]:
    """``time_step_limit`` as Mamba2Spec's (min, max), max 0 for none. Only the default (0, inf) is
    supported: transformers (and mamba_ssm) clamp dt in a prefill but not in a decode step, which no
    one graph for both can follow. ``save_pretrained`` writes the infinity as {"__float__": "Infinity"}."""
    limit = cfg.get("time_step_limit", [0.0, math.inf])
    try:
        low, high = (float(x["__float__"] if isinstance(x, dict) else x) for x in limit)
    except (TypeError, ValueError, KeyError):
        raise CheckpointError(f"{cfg.source}: 'time_step_limit' must be two numbers, got {limit!r}") from None
    if (low, high) != (0.0, math.inf):
        raise UnsupportedFamilyError(f"granitemoehybrid with time_step_limit {limit!r} is not supported (the "
                                     "default (0, inf)): transformers clamps dt in prefill but not in decode")
    return low, 0.0


# granitemoeshared's names; its shared_mlp is a dense layer's whole feed-forward (num_local_experts 0).
NAMES = dataclasses.replace(granitemoeshared.NAMES, mlp_gate_up=("shared_mlp.input_linear",),
                            mlp_down="shared_mlp.output_linear")
FAMILY = Family("granitemoehybrid", spec, NAMES)
