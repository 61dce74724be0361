"""The embedded default models: two MoE shapes, each with two dense twins.

- coarse: 8 experts, top-2 (Mixtral-like); fine: 64 experts, top-8 (OLMoE / Qwen3-MoE-like).
- ``dense-active``: a Llama with the same hidden size, layers and heads and an FFN of width
  k x F: the same active parameters per token. ``dense-total``: FFN width E x F, the same total
  parameters. Sizes keep every model's weights (>= 100 MB) far beyond this machine's 32 MiB L3.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoeShape:
    name: str
    experts: int
    top_k: int
    expert_width: int
    hidden: int = 512
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 8192


DEFAULT_SHAPES = (
    MoeShape("coarse", experts=8, top_k=2, expert_width=1408),
    MoeShape("fine", experts=64, top_k=8, expert_width=256),
)
TINY_SHAPES = (
    MoeShape("coarse", experts=4, top_k=2, expert_width=32, hidden=32, layers=1, heads=2, kv_heads=1, vocab=64),
    MoeShape("fine", experts=8, top_k=4, expert_width=8, hidden=32, layers=1, heads=2, kv_heads=1, vocab=64),
)


def build_models(shape: MoeShape, seed: int = 0) -> dict:
    """``{"<shape>-moe": MixtralForCausalLM, "<shape>-dense-active": ..., "<shape>-dense-total": ...}``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                  num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                  max_position_embeddings=4096, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    moe = MixtralForCausalLM(MixtralConfig(intermediate_size=shape.expert_width, num_local_experts=shape.experts,
                                           num_experts_per_tok=shape.top_k, **common))
    models = {f"{shape.name}-moe": moe}
    for twin, width in (("dense-active", shape.top_k), ("dense-total", shape.experts)):
        torch.manual_seed(seed)
        models[f"{shape.name}-{twin}"] = LlamaForCausalLM(LlamaConfig(intermediate_size=width * shape.expert_width, **common))
    for model in models.values():
        model.eval()
        model.config._attn_implementation = "sdpa"
    return models
