"""Qwen3.5-MoE / Qwen3.6-MoE (Qwen3.5-35B-A3B ...), released as ``Qwen3_5MoeForConditionalGeneration``:
its text decoder is :mod:`qwen3_next`'s hybrid (Gated DeltaNet and gated attention, zero-centred
RMSNorms, a gated shared expert) with DeltaNet's projections stored apart (``in_proj_qkv``,
``in_proj_z``, ``in_proj_b``, ``in_proj_a``), every layer sparse and the top-k always renormalised.
The text fields sit in ``text_config`` and the decoder's tensors under ``model.language_model.``;
the vision tower beside them (``model.visual.*``) and the MTP layer (``mtp.*``) are not read: the
export takes token ids only. Its multimodal RoPE (``mrope_section``) turns each section by the
temporal, height or width position; for text all three are the token's position, so it is plain
(partial) RoPE. The text-only layout ``Qwen3_5MoeForCausalLM`` saves is :mod:`qwen3_5_moe_text`."""

from moe_onnx.exporter.config import Config, dense_spec, moe_spec
from moe_onnx.exporter.families.qwen3_next import NAMES, hybrid_fields, with_defaults
from moe_onnx.exporter.family import Family


def text_config(cfg: Config) -> Config:
    """The decoder's fields: ``text_config`` (the top level's ``tie_word_embeddings`` governs, as in
    transformers), or the config itself (the text-only layout)."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        return cfg
    tied = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return Config({**text, "model_type": cfg.require("model_type"), "tie_word_embeddings": tied}, cfg.source)


def spec(cfg: Config):
    cfg = with_defaults(text_config(cfg))
    n = cfg.int("num_hidden_layers")
    moe = moe_spec(cfg, "moe_intermediate_size", norm_topk_prob=True,
                   shared_expert_size=cfg.int("shared_expert_intermediate_size"), shared_expert_gate=True)
    # No dense feed-forward anywhere: intermediate_size is not a field of this config.
    cfg = Config({**cfg.data, "intermediate_size": 0}, cfg.source)
    return dense_spec(cfg, moe=moe, moe_layers=(True,) * n, **hybrid_fields(cfg))


FAMILY = Family("qwen3_5_moe", spec, NAMES)
