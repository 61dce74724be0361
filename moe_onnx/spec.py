"""The typed description of a decoder, filled once from ``config.json``.

Everything below the exporter's architecture modules reads this spec and nothing else:
graph blocks never see a Hugging Face config. Pure dataclasses, no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding: the final inverse frequencies (scaling already applied)."""

    inv_freq: tuple[float, ...]
    attention_scaling: float = 1.0  # multiplies cos/sin (YaRN); 1.0 otherwise
    rope_type: str = "default"
    interleaved: bool = False  # rotate pairs (x[2i], x[2i+1]) instead of the two halves (ernie4_5_moe)
    factor: float = 1.0  # the context-extension factor of linear, llama3 and yarn (shown by inspect)


@dataclass(frozen=True)
class MoeSpec:
    """A sparse MoE feed-forward: E experts of width F, k chosen per token."""

    num_experts: int
    top_k: int
    expert_size: int
    norm_topk_prob: bool
    shared_expert_size: int = 0  # 0 = no shared expert
    shared_expert_gate: bool = False  # sigmoid(x @ w) scales the shared expert (qwen2_moe)
    router: str = "softmax"  # "softmax" (then top-k) | "sparsemixer" (phimoe: top-2, masked softmaxes)
    jitter_eps: float = 0.0  # sparsemixer: drops experts whose logit is > 2*eps (relative) below the max
    selection_bias: bool = False  # a per-expert bias added to the probabilities for TopK only (ernie4_5_moe)
    norm_min: float = 0.0  # renormalisation divides by max(sum of the top-k, norm_min); 0 = no clamp
    logit_bias: bool = False  # a per-expert bias added to the router logits (gpt_oss)
    expert_bias: bool = False  # each expert's gate_up and down projections add a bias (gpt_oss)
    # The experts' activation: gate * sigmoid(swiglu_alpha * gate) * (up + swiglu_beta), gate clamped
    # above and up to [-limit, limit] first when swiglu_limit > 0 (gpt_oss: 1.702, 1, 7); plain SwiGLU
    # by default.
    swiglu_alpha: float = 1.0
    swiglu_beta: float = 0.0
    swiglu_limit: float = 0.0
    # router "sigmoid" (glm4_moe, deepseek_v3): sigmoid scores; with selection_bias the biased scores
    # pick the experts, only from the topk_group best of n_group groups (a group's score: the sum of
    # its two best), the unbiased scores weigh them, times routed_scaling_factor.
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # router "softmax" with n_group > 1 (deepseek_v2's group_limited_greedy): a group's score is its best
    # probability; the probabilities outside the topk_group best groups are zeroed before top-k.


@dataclass(frozen=True)
class MlaSpec:
    """Multi-head latent attention (deepseek_v2, deepseek_v3): keys and values come from one
    normalised latent of ``kv_lora_rank`` values per token plus a ``qk_rope_head_dim`` roped key
    shared by every head; the cache holds those two, never per-head K/V (see graphs/mla.py)."""

    kv_lora_rank: int  # C: the latent (kv_a_layernorm(kv_a_proj)[:C]) that kv_b_proj expands
    qk_nope_head_dim: int  # per head: the query/key dims without position, from the latent
    qk_rope_head_dim: int  # R: the roped dims, one key shared by every head
    v_head_dim: int
    q_lora_rank: int = 0  # q_a_proj -> RMSNorm -> q_b_proj; 0 = one q_proj (V2-Lite)
    bias: bool = False  # q_a_proj and kv_a_proj_with_mqa add a bias (attention_bias; o_proj: o_bias)
    norm_eps: float = 1e-6  # q_a/kv_a norms: transformers builds them with the default eps, not rms_norm_eps
    # deepseek_v3's rope_interleave: the checkpoint's roped dims are pairs (x0, x1), (x2, x3) ... that
    # transformers reorders to halves (x0, x2 ... | x1, x3 ...) before RoPE; the loader reorders the q and
    # kv_a columns once instead, so the graph turns halves and caches what transformers caches.
    deinterleave_rope: bool = False

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def parameters(self, H: int, N: int) -> int:
        """Weights of one attention sublayer (o_proj included, its bias not)."""
        C, R, q = self.kv_lora_rank, self.qk_rope_head_dim, self.q_lora_rank
        query = H * q + q + q * N * self.qk_head_dim if q else H * N * self.qk_head_dim
        latent = H * (C + R) + C + C * N * (self.qk_nope_head_dim + self.v_head_dim)
        return query + latent + N * self.v_head_dim * H + self.bias * (q + C + R)

    def float_parameters(self) -> int:
        """The norms and biases of one attention sublayer (kept in the compute dtype)."""
        C, R, q = self.kv_lora_rank, self.qk_rope_head_dim, self.q_lora_rank
        return q + C + self.bias * (q + C + R)


@dataclass(frozen=True)
class ShortConvSpec:
    """LFM2's gated short convolution (``layer_types`` "conv"): ``in_proj`` [H, 3H] gives B, C, x;
    ``y = out_proj(C * conv(B * x))``, a depthwise causal Conv1d of ``kernel`` taps over time.
    State ``past_conv.{i}`` [B, H, kernel]: the last ``kernel`` values of ``B * x``."""

    kernel: int  # conv_L_cache
    bias: bool = False  # conv_bias: in_proj, the conv and out_proj add a bias

    def parameters(self, H: int) -> tuple[int, int]:
        """One mixer's (matrix, float) parameters: in_proj and out_proj; the conv and biases."""
        return 4 * H * H, H * self.kernel + (5 * H if self.bias else 0)


@dataclass(frozen=True)
class Mamba2Spec:
    """A Mamba2 (SSD) mixer (granitemoehybrid ``layer_types`` "mamba"). ``in_proj`` gives the gate
    z [I], the conv input xBC [I + 2 n_groups N] and dt [heads]. States ``past_conv.{i}``
    [B, conv_dim, conv_kernel] and ``past_ssm.{i}`` [B, heads, head_dim, state_size]."""

    num_heads: int  # mamba_n_heads
    head_dim: int  # mamba_d_head; num_heads * head_dim = intermediate_size
    state_size: int  # mamba_d_state (N)
    n_groups: int  # mamba_n_groups: B and C are shared by num_heads / n_groups heads
    conv_kernel: int  # mamba_d_conv
    intermediate_size: int  # mamba_expand * hidden_size (I)
    conv_bias: bool = True  # mamba_conv_bias
    proj_bias: bool = False  # mamba_proj_bias: in_proj and out_proj
    norm_eps: float = 1e-6  # the gated RMSNorm's (rms_norm_eps)
    time_step_min: float = 0.0  # time_step_limit: dt clamped to [min, max] after softplus
    time_step_max: float = 0.0  # 0 = no upper limit (transformers' default limit is (0, inf))

    @property
    def conv_dim(self) -> int:
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    def parameters(self, H: int) -> tuple[int, int]:
        """One mixer's (matrix, float) parameters: in_proj and out_proj; the conv, dt_bias, A, D,
        the gated norm and biases."""
        inner, C, h = self.intermediate_size, self.conv_dim, self.num_heads
        proj = inner + C + h
        floats = C * self.conv_kernel + (C if self.conv_bias else 0) + 3 * h + inner
        return H * proj + inner * H, floats + ((proj + H) if self.proj_bias else 0)


@dataclass(frozen=True)
class DeltaNetSpec:
    """A Gated DeltaNet mixer (qwen3_next, qwen3_5_moe ``layer_types`` "linear_attention"). States
    ``past_conv.{i}`` [B, conv_dim, conv_kernel] and ``past_recurrent.{i}``
    [B, num_v_heads, head_k_dim, head_v_dim]."""

    num_k_heads: int  # linear_num_key_heads
    num_v_heads: int  # linear_num_value_heads
    head_k_dim: int  # linear_key_head_dim
    head_v_dim: int  # linear_value_head_dim
    conv_kernel: int  # linear_conv_kernel_dim
    norm_eps: float = 1e-6  # the gated RMSNorm's (rms_norm_eps)

    @property
    def conv_dim(self) -> int:
        return 2 * self.num_k_heads * self.head_k_dim + self.num_v_heads * self.head_v_dim

    def parameters(self, H: int) -> tuple[int, int]:
        """One mixer's (matrix, float) parameters: in_proj (q, k, v, z, b, a) and out_proj; the
        conv, dt_bias, A_log and the gated norm."""
        C, N, vd = self.conv_dim, self.num_v_heads, self.num_v_heads * self.head_v_dim
        return H * (C + vd + 2 * N) + vd * H, C * self.conv_kernel + 2 * N + self.head_v_dim


LAYER_TYPES = ("attention", "conv", "mamba", "linear_attention")  # a layer's token mixer


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer: dense or MoE, per layer."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float  # the eps of either norm
    rope: RopeSpec
    max_position_embeddings: int
    intermediate_size: int  # dense MLP width (layers that are not MoE)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float = 0.0  # 0 = no clipping (olmoe's clip_qkv)
    qk_norm: str = "none"  # "none" | "head" (per head, qwen3) | "full" (whole projection, olmoe)
    sliding_window: int = 0  # 0 = full attention
    attention_scale: float | None = None  # multiplies q @ k^T; None = 1/sqrt(head_dim)
    embedding_multiplier: float = 1.0  # scales the embedded tokens (Granite)
    residual_multiplier: float = 1.0  # scales each sublayer's output before the residual add (Granite)
    logits_scaling: float = 1.0  # logits are divided by it (Granite)
    norm: str = "rms"  # "rms" | "layer" (LayerNorm with a bias, phimoe)
    lm_head_bias: bool = False
    moe: MoeSpec | None = None
    moe_layers: tuple[bool, ...] = field(default=())  # per layer: True where the FFN is MoE
    attention_sinks: bool = False  # a learned logit per head joins each softmax's denominator (gpt_oss)
    sliding_layers: tuple[bool, ...] = ()  # per layer: True where sliding_window applies; () = every layer
    # Multi-head latent attention replaces q/k/v (num_kv_heads 1: one latent for every head; head_dim
    # the query/key head, qk_nope + qk_rope).
    mla: MlaSpec | None = None
    # Hybrid models: each layer's token mixer (one of LAYER_TYPES; () = attention in every layer)
    # and the spec of the recurrent mixers they use. Only "attention" layers have a KV cache.
    layer_types: tuple[str, ...] = ()
    # A norm on the token mixer's output and one on the feed-forward's, each before its residual add
    # (afmoe's "dual normalization"), besides the usual norms before them.
    sandwich_norms: bool = False
    # Gated attention (afmoe, qwen3_next): the heads' outputs times sigmoid(x @ gate) [H, N*D] before
    # o_proj; the gate's columns follow q, k and v in the fused ``qkv`` weight.
    attention_gate: bool = False
    # Per attention layer whether RoPE applies (afmoe: its sliding layers only; NoPE models: none);
    # () = every layer.
    rope_layers: tuple[bool, ...] = ()
    short_conv: ShortConvSpec | None = None
    mamba: Mamba2Spec | None = None
    deltanet: DeltaNetSpec | None = None

    def __post_init__(self) -> None:
        if not self.moe_layers:
            object.__setattr__(self, "moe_layers", (self.moe is not None,) * self.num_layers)

    def window(self, i: int) -> int:
        """Layer ``i``'s sliding window, 0 for full attention."""
        return self.sliding_window if not self.sliding_layers or self.sliding_layers[i] else 0

    def mixer_parameters(self, i: int) -> tuple[int, int]:
        """Recurrent layer ``i``'s token mixer's (matrix, float) parameters."""
        kind = self.mixer(i)
        mixer = {"conv": self.short_conv, "mamba": self.mamba, "linear_attention": self.deltanet}[kind]
        assert mixer is not None, f"layer {i} is a {kind} layer but the spec has no {kind} mixer"
        return mixer.parameters(self.hidden_size)

    def uses_rope(self, i: int) -> bool:
        """Whether layer ``i``'s attention turns its queries and keys (RoPE)."""
        return not self.rope_layers or self.rope_layers[i]

    def mixer(self, i: int) -> str:
        """Layer ``i``'s token mixer: "attention" or a recurrent one (see LAYER_TYPES)."""
        return self.layer_types[i] if self.layer_types else "attention"

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """The layers with a KV cache."""
        return tuple(i for i in range(self.num_layers) if self.mixer(i) == "attention")

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each recurrent state input (``past_conv.{i}`` ...) and its shape without the batch, in
        graph order (see :mod:`moe_onnx.contract`)."""
        shapes = {}
        for i in range(self.num_layers):
            kind = self.mixer(i)
            if kind == "conv":
                assert self.short_conv is not None
                shapes[f"past_conv.{i}"] = (self.hidden_size, self.short_conv.kernel)
            elif kind == "mamba":
                m = self.mamba
                assert m is not None
                shapes[f"past_conv.{i}"] = (m.conv_dim, m.conv_kernel)
                shapes[f"past_ssm.{i}"] = (m.num_heads, m.head_dim, m.state_size)
            elif kind == "linear_attention":
                d = self.deltanet
                assert d is not None
                shapes[f"past_conv.{i}"] = (d.conv_dim, d.conv_kernel)
                shapes[f"past_recurrent.{i}"] = (d.num_v_heads, d.head_k_dim, d.head_v_dim)
        return shapes

    def kv_dims(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Per layer, the ``(heads, dim)`` of the cached key and of the cached value: ``(G, D)``
        both, or MLA's latent ``(1, kv_lora_rank)`` and roped key ``(1, qk_rope_head_dim)``."""
        if self.mla is not None:
            return (1, self.mla.kv_lora_rank), (1, self.mla.qk_rope_head_dim)
        return (self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.head_dim)

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and self.moe_layers[i]

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters and parameters active per token (k of E experts)."""
        H, d = self.hidden_size, self.head_dim
        attn = H * d * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * d * H
        attn += H * self.num_heads * d if self.attention_gate else 0
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if self.o_bias:
            attn += H
        if self.attention_sinks:
            attn += self.num_heads
        if self.qk_norm == "head":
            attn += 2 * d
        elif self.qk_norm == "full":
            attn += d * (self.num_heads + self.num_kv_heads)
        if self.mla is not None:
            attn = self.mla.parameters(H, self.num_heads) + (H if self.o_bias else 0)
        norm_size = 2 * H if self.norm == "layer" else H  # weight, and bias for LayerNorm
        norms = (4 if self.sandwich_norms else 2) * norm_size
        dense_ffn = 3 * H * self.intermediate_size
        mixers = sum(attn if self.mixer(i) == "attention" else sum(self.mixer_parameters(i))
                     for i in range(self.num_layers))
        total = active = mixers + self.num_layers * norms + norm_size
        embed = self.vocab_size * H
        total += embed if self.tie_word_embeddings else 2 * embed
        head_bias = self.vocab_size if self.lm_head_bias else 0
        total += head_bias
        # The embedding table is read one row per token; the lm_head is read whole.
        active += H + self.vocab_size * H + head_bias
        for i in range(self.num_layers):
            if not self.is_moe_layer(i):
                total += dense_ffn
                active += dense_ffn
                continue
            m = self.moe
            assert m is not None
            expert = 3 * H * m.expert_size + ((2 * m.expert_size + H) if m.expert_bias else 0)
            shared = 3 * H * m.shared_expert_size + (H if m.shared_expert_gate else 0)
            router = H * m.num_experts + m.num_experts * (int(m.selection_bias) + int(m.logit_bias))
            total += m.num_experts * expert + shared + router
            active += m.top_k * expert + shared + router
        return {"total": total, "active_per_token": active}

    def float_parameters_per_token(self) -> int:
        """Active parameters that quantized exports keep in the compute dtype: norms, biases,
        q/k norms, routers and shared-expert gates (everything but the matrices)."""
        H, d = self.hidden_size, self.head_dim
        norm_size = 2 * H if self.norm == "layer" else H
        attention = d * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0
        attention += H if self.o_bias else 0
        attention += self.num_heads if self.attention_sinks else 0
        qk_norm_params = {"none": 0, "head": 2 * d, "full": d * (self.num_heads + self.num_kv_heads)}
        attention += qk_norm_params[self.qk_norm]
        attention += self.mla.float_parameters() if self.mla is not None else 0
        mixers = sum(attention if self.mixer(i) == "attention" else self.mixer_parameters(i)[1]
                     for i in range(self.num_layers))
        norms = self.num_layers * (4 if self.sandwich_norms else 2) * norm_size
        total = mixers + norms + norm_size + (self.vocab_size if self.lm_head_bias else 0)
        if self.moe is not None:
            gate = self.moe.num_experts * H + (H if self.moe.shared_expert_gate else 0)
            gate += self.moe.num_experts * (int(self.moe.selection_bias) + int(self.moe.logit_bias))
            gate += self.moe.top_k * (2 * self.moe.expert_size + H) if self.moe.expert_bias else 0
            total += self.num_moe_layers * gate
        return total

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        d = dict(d)
        d.pop("hidden_act", None)  # exports before 2026-12 recorded it; nothing read it
        d["rope"] = RopeSpec(**{**d["rope"], "inv_freq": tuple(d["rope"]["inv_freq"])})
        d["moe"] = MoeSpec(**d["moe"]) if d.get("moe") else None
        d["moe_layers"] = tuple(d.get("moe_layers", ()))
        d["sliding_layers"] = tuple(d.get("sliding_layers", ()))
        d["rope_layers"] = tuple(d.get("rope_layers", ()))
        d["mla"] = MlaSpec(**d["mla"]) if d.get("mla") else None
        d["layer_types"] = tuple(d.get("layer_types", ()))
        for key, kind in (("short_conv", ShortConvSpec), ("mamba", Mamba2Spec), ("deltanet", DeltaNetSpec)):
            d[key] = kind(**d[key]) if d.get(key) else None
        return cls(**d)
