"""The embedded default models: two MoE shapes, each with two dense twins.

- ``coarse``: 8 experts, top-2, expert width 1408 (Mixtral-like), a ``MixtralForCausalLM``.
- ``fine``: 64 experts, top-8, expert width 256 (OLMoE / Qwen3-MoE-like), a ``Qwen3MoeForCausalLM``.
- ``<shape>-dense-active``: a ``LlamaForCausalLM`` with the same hidden size, layers and heads
  and an FFN of width k x F, so the same parameters are active per token (the router aside).
- ``<shape>-dense-total``: FFN width E x F, the same total parameters.

Every model's weights (>= 100 MB in fp32) are far beyond a 32 MiB L3 (the EPYC these were chosen
on), so a decode step reads its weights from memory, as a real model's would. A CPU whose L3 holds
them (the 480 MiB one of 2026-12-04) keeps them in cache between steps instead: compare figures
within one run only.
"""

from __future__ import annotations

from dataclasses import dataclass

DENSE_FFN = "dense-ffn"  # the impl label of a model without MoE layers (the dense twins)


@dataclass(frozen=True)
class MoeShape:
    """One MoE shape: E experts of width F, k chosen per token, on a small transformer."""

    name: str
    experts: int
    top_k: int
    expert_width: int
    architecture: str = "mixtral"  # "mixtral" | "qwen3_moe"
    hidden: int = 512
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 8192

    @property
    def sparsity(self) -> float:
        """E / k: how many times less expert work a token needs than a dense run of every expert."""
        return self.experts / self.top_k


DEFAULT_SHAPES = (
    MoeShape("coarse", experts=8, top_k=2, expert_width=1408, architecture="mixtral"),
    MoeShape("fine", experts=64, top_k=8, expert_width=256, architecture="qwen3_moe"),
)
_TINY = dict(hidden=32, layers=1, heads=2, kv_heads=1, vocab=64)
TINY_SHAPES = (
    MoeShape("coarse", experts=4, top_k=2, expert_width=32, architecture="mixtral", **_TINY),
    MoeShape("fine", experts=8, top_k=4, expert_width=8, architecture="qwen3_moe", **_TINY),
)


def shape_named(name: str, tiny: bool = False) -> MoeShape:
    """The built-in shape ``name`` (``coarse`` | ``fine``); ``tiny``: its tiny twin (smoke tests)."""
    shapes = TINY_SHAPES if tiny else DEFAULT_SHAPES
    found = [s for s in shapes if s.name == name]
    if not found:
        raise ValueError(f"unknown shape {name!r}; choose from {', '.join(s.name for s in shapes)}")
    return found[0]


def _common(shape: MoeShape) -> dict:
    return dict(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                head_dim=shape.hidden // shape.heads, max_position_embeddings=4096,
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _moe_model(shape: MoeShape):
    import transformers as tf

    common = _common(shape)
    if shape.architecture == "mixtral":
        config = tf.MixtralConfig(intermediate_size=shape.expert_width, num_local_experts=shape.experts,
                                  num_experts_per_tok=shape.top_k, **common)
        return tf.MixtralForCausalLM(config)
    if shape.architecture == "qwen3_moe":
        config = tf.Qwen3MoeConfig(moe_intermediate_size=shape.expert_width, num_experts=shape.experts,
                                   num_experts_per_tok=shape.top_k, norm_topk_prob=True,
                                   decoder_sparse_step=1, mlp_only_layers=[], **common)
        return tf.Qwen3MoeForCausalLM(config)
    raise ValueError(f"unknown MoE architecture {shape.architecture!r}")


def model_names(shape: MoeShape) -> list[str]:
    """``<shape>-moe``, ``<shape>-dense-active``, ``<shape>-dense-total``."""
    return [f"{shape.name}-moe", f"{shape.name}-dense-active", f"{shape.name}-dense-total"]


def parameter_count(shape: MoeShape, name: str) -> int:
    """The parameters of :func:`build_model`'s ``name`` without building it (the bench's memory
    estimate): embeddings and lm_head, attention, norms, and the FFN or the experts and router."""
    H, D = shape.hidden, shape.hidden // shape.heads
    attention = H * shape.heads * D * 2 + H * shape.kv_heads * D * 2
    if name.endswith("-moe"):
        ffn = shape.experts * 3 * H * shape.expert_width + shape.experts * H
        ffn += 2 * D if shape.architecture == "qwen3_moe" else 0  # Qwen3's q_norm and k_norm
    else:
        width = shape.top_k if name.endswith("-dense-active") else shape.experts
        ffn = 3 * H * width * shape.expert_width
    return 2 * shape.vocab * H + shape.layers * (attention + ffn + 2 * H) + H


def build_model(shape: MoeShape, name: str, seed: int = 0):
    """One of :func:`model_names`: random weights, eval mode, SDPA attention."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if name == f"{shape.name}-moe":
        model = _moe_model(shape)
    else:
        width = shape.top_k if name == f"{shape.name}-dense-active" else shape.experts
        model = LlamaForCausalLM(LlamaConfig(intermediate_size=width * shape.expert_width, **_common(shape)))
    model.eval()
    model.config._attn_implementation = "sdpa"
    return model


def build_models(shape: MoeShape, seed: int = 0) -> dict:
    """``{"<shape>-moe": model, "<shape>-dense-active": model, "<shape>-dense-total": model}``
    (:func:`build_model` each; the bench builds one at a time instead)."""
    return {name: build_model(shape, name, seed) for name in model_names(shape)}
