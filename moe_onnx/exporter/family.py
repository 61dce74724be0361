"""How a model family is described: its spec from config.json and where its tensors live.

A family module (``families/<model_type>.py``) declares a :class:`Family`: a function that fills
the typed spec from ``config.json``, and :class:`Names`, the checkpoint names of its tensors
(Llama's by default). The weight map (:mod:`moe_onnx.exporter.weight_map`) puts every graph
weight onto these names once, up front. A family with other names or a fused projection changes
only the fields that differ, in its own file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moe_onnx.exporter.config import Config
from moe_onnx.spec import ModelSpec


@dataclass(frozen=True)
class MlaNames:
    """Multi-head latent attention's tensors (deepseek_v2, deepseek_v3), relative to the layer;
    projections without ``.weight`` (their bias, with ``attention_bias``, beside it)."""

    q: str = "self_attn.q_proj"  # without a query rank (q_lora_rank null)
    q_a: str = "self_attn.q_a_proj"
    q_a_norm: str = "self_attn.q_a_layernorm.weight"
    q_b: str = "self_attn.q_b_proj"
    kv_a: str = "self_attn.kv_a_proj_with_mqa"  # [L + R, H]: the latent, then the roped key
    kv_a_norm: str = "self_attn.kv_a_layernorm.weight"
    kv_b: str = "self_attn.kv_b_proj"  # [N * (Dn + Dv), L]: per head its key rows, then its value rows


@dataclass(frozen=True)
class Names:
    """Checkpoint tensor names, Llama's by default.

    Layer-level names are relative to ``{model}layers.{i}.`` (``model.`` or nothing, whichever
    the checkpoint uses; ``model.language_model.`` in a multimodal checkpoint, whose other towers
    are not read); MoE names relative to ``{layer}{moe}.``; expert names relative to
    ``{moe}experts.{e}.``; shared-expert names relative to ``{layer}{moe}.`` or, where not found
    there, to the layer (Granite's ``shared_mlp`` sits beside its MoE module). A tuple of several
    names is a projection stored in parts that are concatenated along the output axis (q, k, v;
    gate, up); one name is a fused tensor. ``renames`` maps names as a family's checkpoints store
    them (the hub's, and transformers' ``save_pretrained``) onto the names above, which are those
    of the model in memory, as transformers' ``conversion_mapping`` does: each is the tail of a
    tensor name after a ``.``. A router's logit bias sits beside its weight (``router.bias``).
    """

    embed: str = "embed_tokens.weight"
    final_norm: str = "norm.weight"
    lm_head: str = "lm_head.weight"  # top level: never under ``model.``
    input_norm: str = "input_layernorm.weight"
    post_norm: str = "post_attention_layernorm.weight"
    post_mixer_norm: str = ""  # with ModelSpec.sandwich_norms
    post_ffn_norm: str = ""
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    o_proj: str = "self_attn.o_proj"
    attention_gate: str = ""  # gated attention's own projection [N*D, H] (afmoe's gate_proj)
    query_gate: bool = False  # gated attention's gate in q_proj [2*N*D, H]: per head its query, then its gate
    q_norm: str = "self_attn.q_norm.weight"
    k_norm: str = "self_attn.k_norm.weight"
    mlp_gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_down: str = "mlp.down_proj"
    # MoE
    moe: str = "mlp"
    router: str = "gate.weight"
    router_bias: str = "gate.e_score_correction_bias"  # [1, E] or [E], with MoeSpec.selection_bias
    expert_gate_up: tuple[str, ...] = ("gate_proj", "up_proj")
    expert_down: str = "down_proj"
    # transformers 5 stores (and in-memory models always hold) experts stacked in two tensors:
    stacked_gate_up: str = "experts.gate_up_proj"  # [E, 2F, H]
    stacked_down: str = "experts.down_proj"  # [E, H, F]
    shared_gate_up: tuple[str, ...] = ("shared_expert.gate_proj", "shared_expert.up_proj")
    shared_down: str = "shared_expert.down_proj"
    shared_gate: str = "shared_expert_gate.weight"
    renames: tuple[tuple[str, str], ...] = ()  # (stored tail, tail as named above)
    sinks: str = "self_attn.sinks"  # [N], with ModelSpec.attention_sinks
    stacked_gate_up_bias: str = "experts.gate_up_proj_bias"  # [E, 2F], with MoeSpec.expert_bias
    stacked_down_bias: str = "experts.down_proj_bias"  # [E, H]
    stacked_in_out: bool = False  # stacked experts stored [E, in, out] (gpt_oss) rather than [E, out, in]
    interleaved_gate_up: bool = False  # fused gate/up outputs alternate gate0, up0, gate1 ... (gpt_oss)
    zero_centred_norms: bool = False  # RMSNorms (q/k norms too) stored as w, applied as 1 + w (qwen3_next)
    mla: MlaNames = MlaNames()  # with ModelSpec.mla (o_proj: ``o_proj`` above)
    # A recurrent token mixer's module, relative to the layer, by its kind (spec.LAYER_TYPES).
    mixers: tuple[tuple[str, str], ...] = (("conv", "conv"), ("mamba", "mamba"),
                                           ("linear_attention", "linear_attn"))


@dataclass(frozen=True)
class Family:
    """One supported ``model_type``: a spec builder and the checkpoint names."""

    model_type: str
    spec: Callable[[Config], ModelSpec]
    names: Names = Names()
