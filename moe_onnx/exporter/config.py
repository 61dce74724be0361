"""Reading ``config.json`` fields into the typed spec: the parts every family shares."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from moe_onnx.errors import CheckpointError, UnsupportedFamilyError
from moe_onnx.spec import ModelSpec, MoeSpec, RopeSpec


class Config:
    """A ``config.json`` dict with readable errors for missing or ill-typed fields."""

    def __init__(self, data: dict, source: str = "config.json"):
        self.data = data
        self.source = source

    @classmethod
    def load(cls, src: Path) -> Config:
        path = src / "config.json" if src.is_dir() else src.parent / "config.json"
        if not path.exists():
            raise CheckpointError(f"missing config.json in {path.parent}")
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} does not hold a JSON object")
        return cls(data, str(path))

    def get(self, key: str, default=None):
        value = self.data.get(key)
        return default if value is None else value

    def require(self, key: str):
        if self.data.get(key) is None:
            raise CheckpointError(f"{self.source}: required field {key!r} is missing")
        return self.data[key]

    def int(self, key: str, default: int | None = None) -> int:
        value = self.require(key) if default is None else self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{self.source}: {key!r} must be a non-negative integer, got {value!r}")
        return value


def num_experts(cfg: Config) -> int:
    """``num_experts`` (hub configs) or ``num_local_experts`` (transformers 5 attribute map)."""
    key = "num_experts" if cfg.get("num_experts") is not None else "num_local_experts"
    if cfg.get(key) is None:
        raise CheckpointError(f"{cfg.source}: required field 'num_experts' is missing")
    return cfg.int(key)


def rope_spec(cfg: Config, head_dim: int) -> RopeSpec:
    """Inverse frequencies from either the new ``rope_parameters`` or the old
    ``rope_theta`` + ``rope_scaling`` fields."""
    params = dict(cfg.get("rope_parameters", {}) or {})
    if not params:
        params = dict(cfg.get("rope_scaling", {}) or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    # Partial rotary (glm4_moe): RoPE on the first head_dim * factor dims of each head, the rest
    # passed through; the frequencies are those of a head that size (as transformers computes them).
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        raise CheckpointError(f"{cfg.source}: 'partial_rotary_factor' must be in (0, 1], got {partial!r}")
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2 or rotary_dim == 0:
        raise UnsupportedFamilyError(f"partial_rotary_factor {partial} gives an odd or empty rotary "
                                     f"dimension ({rotary_dim} of head_dim {head_dim})")
    head_dim = rotary_dim
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    scaling, factor = 1.0, float(params.get("factor") or 1.0)
    if rope_type in ("default", "dynamic"):
        # dynamic NTK only changes frequencies beyond the trained length.
        pass
    elif rope_type == "linear":
        inv_freq = inv_freq / np.float32(params["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3(inv_freq, params)
    elif rope_type == "yarn":
        inv_freq, scaling, factor = _yarn(params, theta, head_dim, cfg)
    else:
        raise UnsupportedFamilyError(
            f"rope_type {rope_type!r} is not supported (default, linear, dynamic, llama3, yarn)"
        )
    return RopeSpec(tuple(float(f) for f in inv_freq), scaling, rope_type, factor=factor)


def _llama3(inv_freq: np.ndarray, p: dict) -> np.ndarray:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(p: dict, theta: float, dim: int, cfg: Config) -> tuple[np.ndarray, float, float]:
    """YaRN as transformers' ``_compute_yarn_parameters``: (inverse frequencies of ``dim`` rotary
    dims, the cos/sin scaling ``attention_factor``, the factor). Frequencies below the
    ``beta_slow`` .. ``beta_fast`` rotations-per-original-context ramp are interpolated (divided by
    ``factor``), those above kept, those in between blended; float32 as torch computes them."""
    old_len = float(cfg.get("original_max_position_embeddings", p.get("original_max_position_embeddings")
                            or cfg.int("max_position_embeddings", 2048)))
    factor = float(p.get("factor") or cfg.int("max_position_embeddings", 2048) / old_len)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dim that turns ``rotations`` times in old_len
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high  # transformers' guard against a zero-width ramp
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)  # 1: extrapolate (the original frequency), 0: interpolate
    inv_freq = (1.0 / (np.float32(factor) * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq.astype(np.float32), float(attention_factor), factor


def attention_fields(cfg: Config) -> dict:
    """Fields every family reads the same way (Llama conventions): sizes, RoPE, norms, biases
    from ``attention_bias``, and the sliding window (Mistral's ``sliding_window``; Qwen's
    ``use_sliding_window`` switch, refused when on since Qwen applies it per layer)."""
    hidden = cfg.int("hidden_size")
    heads = cfg.int("num_attention_heads")
    if heads == 0 or hidden % heads and not cfg.get("head_dim"):
        raise CheckpointError(f"{cfg.source}: hidden_size {hidden} is not divisible by {heads} heads")
    kv_heads = cfg.int("num_key_value_heads", heads)
    if kv_heads == 0 or heads % kv_heads:
        raise CheckpointError(
            f"{cfg.source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    head_dim = cfg.int("head_dim", hidden // heads)
    if cfg.get("mlp_bias", False):
        raise UnsupportedFamilyError(f"{cfg.get('model_type')} with mlp_bias=true is not supported")
    _check_act(cfg)
    bias = bool(cfg.get("attention_bias", False))
    return dict(
        model_type=cfg.require("model_type"),
        vocab_size=cfg.int("vocab_size"),
        hidden_size=hidden,
        num_layers=cfg.int("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=rope_spec(cfg, head_dim),
        max_position_embeddings=cfg.int("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bias,
        o_bias=bias,
        sliding_window=_sliding_window(cfg),
    )


def multiplier_fields(cfg: Config) -> dict:
    """Granite's scalar multipliers: ``embedding_multiplier``, ``residual_multiplier``,
    ``logits_scaling`` (a divisor) and ``attention_multiplier``, which replaces 1/sqrt(head_dim)
    and is 1.0 when absent (as in transformers' Granite configs)."""
    def number(key: str) -> float:
        value = cfg.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CheckpointError(f"{cfg.source}: {key!r} must be a positive number, got {value!r}")
        return float(value)

    return dict(
        embedding_multiplier=number("embedding_multiplier"),
        residual_multiplier=number("residual_multiplier"),
        logits_scaling=number("logits_scaling"),
        attention_scale=number("attention_multiplier"),
    )


def _sliding_window(cfg: Config) -> int:
    if "use_sliding_window" in cfg.data:
        if cfg.get("use_sliding_window", False):
            raise UnsupportedFamilyError(
                f"{cfg.get('model_type')} with use_sliding_window=true is not supported"
            )
        return 0
    return cfg.int("sliding_window", 0)


def _check_act(cfg: Config) -> None:
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedFamilyError(f"hidden_act {act!r} is not supported (silu)")


def dense_spec(cfg: Config, **overrides) -> ModelSpec:
    """A Llama-like decoder; families pass what differs (``moe=``, ``qk_norm=`` ...)."""
    fields = attention_fields(cfg)
    fields["intermediate_size"] = cfg.int("intermediate_size")
    fields.update(overrides)
    return ModelSpec(**fields)


def moe_spec(cfg: Config, expert_size_field: str, **overrides) -> MoeSpec:
    """E experts (``num_experts`` or ``num_local_experts``), k = ``num_experts_per_tok``, expert
    width from ``expert_size_field``, ``norm_topk_prob`` as configured (False when absent)."""
    fields = dict(
        num_experts=num_experts(cfg),
        top_k=cfg.int("num_experts_per_tok"),
        expert_size=cfg.int(expert_size_field),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
    )
    fields.update(overrides)
    return MoeSpec(**fields)


def expert_groups(cfg: Config, family: str, experts: int) -> tuple[int, int]:
    """``(n_group, topk_group)`` of a group-limited router (DeepSeek's, GLM's), checked: the
    experts split evenly into the groups, and 1 <= topk_group <= n_group."""
    n_group, topk_group = cfg.int("n_group", 1), cfg.int("topk_group", 1)
    if n_group <= 0 or experts % n_group or not 0 < topk_group <= n_group:
        raise UnsupportedFamilyError(
            f"{family} with n_routed_experts {experts}, n_group {n_group}, topk_group {topk_group}: the "
            "experts must split evenly into the groups and 1 <= topk_group <= n_group")
    return n_group, topk_group


def sparse_layers(cfg: Config, num_layers: int) -> tuple[bool, ...]:
    """Qwen-MoE's rule: MoE where not in ``mlp_only_layers`` and (i+1) % decoder_sparse_step == 0."""
    step = cfg.int("decoder_sparse_step", 1) or 1
    dense_only = set(cfg.get("mlp_only_layers", []) or [])
    return tuple(i not in dense_only and (i + 1) % step == 0 for i in range(num_layers))


def moe_layer_range(cfg: Config) -> tuple[bool, ...]:
    """ERNIE's rule: MoE where ``moe_layer_start_index <= i <= moe_layer_end_index`` (-1: the last
    layer) and (i+1) % ``moe_layer_interval`` == 0."""
    n = cfg.int("num_hidden_layers")
    first, step = cfg.int("moe_layer_start_index", 1), cfg.int("moe_layer_interval", 1) or 1
    last = n - 1 if cfg.get("moe_layer_end_index", -1) == -1 else cfg.int("moe_layer_end_index")
    return tuple(first <= i <= last and (i + 1) % step == 0 for i in range(n))


def sliding_layers(cfg: Config) -> tuple[bool, ...]:
    """``layer_types`` (transformers 5): per layer, True for ``sliding_attention``, False for
    ``full_attention``; any other kind, or a list of the wrong length, is refused by name."""
    n = cfg.int("num_hidden_layers")
    kinds = cfg.get("layer_types") or []
    if len(kinds) != n:
        raise CheckpointError(f"{cfg.source}: 'layer_types' lists {len(kinds)} layers for {n} hidden layers")
    known = {"sliding_attention": True, "full_attention": False}
    for kind in kinds:
        if kind not in known:
            raise UnsupportedFamilyError(f"{cfg.get('model_type')} with layer_types value {kind!r} is not "
                                         f"supported ({', '.join(known)})")
    return tuple(known[k] for k in kinds)
