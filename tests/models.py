"""Tiny random models of every supported architecture, built from transformers' config classes.

Settings are deliberately non-default (GQA, explicit head_dim, tied embeddings, k > 2,
norm_topk_prob both ways, shared experts, dense layers between MoE layers, q/k norms, Granite's
multipliers).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as tf

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=256,
    initializer_range=0.1,  # larger than default so routing and argmax are decisive
    rms_norm_eps=1e-6,
)

# qwen3_next's and qwen3_5_moe's shared sizes, and the smallest vision tower Qwen3.5's checkpoints carry.
QWEN3_NEXT = dict(
    num_hidden_layers=4, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=8,
    num_experts_per_tok=3, moe_intermediate_size=32, shared_expert_intermediate_size=48,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))
TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64,
                   num_position_embeddings=16, patch_size=4)

# case name -> (model_type, config class, model class, overrides)
CASES: dict[str, tuple[str, type, type, dict]] = {
    "llama": ("llama", tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        head_dim=24, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64))),
    "mistral": ("mistral", tf.MistralConfig, tf.MistralForCausalLM,
                dict(sliding_window=4, num_key_value_heads=1)),
    "qwen2": ("qwen2", tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    # YaRN (ramp rounded, the default truncate) with DeepSeek's mscale ratio: cos/sin scaled by 1.07.
    "qwen2_yarn": ("qwen2", tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32, mscale=1.0,
        mscale_all_dim=0.5))),
    "qwen3": ("qwen3", tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=32)),
    "mixtral": ("mixtral", tf.MixtralConfig, tf.MixtralForCausalLM,
                dict(num_local_experts=6, num_experts_per_tok=3)),
    "qwen2_moe": ("qwen2_moe", tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, dict(
        num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        norm_topk_prob=False, mlp_only_layers=[1])),
    "qwen2_moe_norm_step2": ("qwen2_moe", tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        norm_topk_prob=True, decoder_sparse_step=2, num_hidden_layers=4)),
    "qwen3_moe": ("qwen3_moe", tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, dict(
        num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32, norm_topk_prob=True, head_dim=32)),
    "olmoe": ("olmoe", tf.OlmoeConfig, tf.OlmoeForCausalLM, dict(
        num_experts=8, num_experts_per_tok=3, intermediate_size=32, norm_topk_prob=False, clip_qkv=3.0,
        pad_token_id=0, eos_token_id=1)),
    # Granite's multipliers, none at 1.0 (granite-3.0-1b-a400m's but for the logits), attention
    # scale 1/head_dim (muP). Untied: tied random models only repeat the last token.
    "granitemoe": ("granitemoe", tf.GraniteMoeConfig, tf.GraniteMoeForCausalLM, dict(
        num_local_experts=6, num_experts_per_tok=3, intermediate_size=32, embedding_multiplier=12.0,
        residual_multiplier=0.22, attention_multiplier=0.0625, logits_scaling=4.0)),
    "granitemoeshared": ("granitemoeshared", tf.GraniteMoeSharedConfig, tf.GraniteMoeSharedForCausalLM, dict(
        num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, shared_intermediate_size=48,
        attention_bias=True, embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.2,
        logits_scaling=0.5)),
    # LayerNorm with biases, sparsemixer top-2 (jitter_eps large enough that some tokens' softmaxes
    # keep several experts and some only the chosen one), q/k/v/o biases, lm_head bias.
    "phimoe": ("phimoe", tf.PhimoeConfig, tf.PhimoeForCausalLM, dict(
        num_local_experts=6, num_experts_per_tok=2, intermediate_size=32, router_jitter_noise=0.2,
        attention_bias=True, lm_head_bias=True)),
    # MoE at layers 1 and 3 of 6 (start 1, end 3, interval 2), 2 shared experts, a norm_min that
    # clamps, interleaved RoPE at a theta where it turns; a random e_score_correction_bias (below).
    "ernie4_5_moe": ("ernie4_5_moe", tf.Ernie4_5_MoeConfig, tf.Ernie4_5_MoeForCausalLM, dict(
        num_hidden_layers=6, moe_num_experts=8, moe_k=3, moe_intermediate_size=32, moe_num_shared_experts=2,
        moe_layer_start_index=1, moe_layer_end_index=3, moe_layer_interval=2, moe_norm_min=0.6,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # Sinks, q/k/v/o and router biases, expert biases (random, below); a window of 4 on layers 0 and 2 only
    # (not the default alternation) and YaRN with the unrounded ramp; the SwiGLU clamp at 0.6 (some
    # gates and ups clamp) and a non-default alpha.
    "gpt_oss": ("gpt_oss", tf.GptOssConfig, tf.GptOssForCausalLM, dict(
        head_dim=16, num_local_experts=6, num_experts_per_tok=3, intermediate_size=32, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], swiglu_limit=0.6,
        swiglu_alpha=1.5, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                               beta_fast=32.0, beta_slow=1.0, truncate=False,
                                               original_max_position_embeddings=64))),
    # Sigmoid router, 4 groups of 2 experts of which 2 kept (group masking matters), a selection bias
    # (random, below), routed scaling 2.5, 2 shared experts, layer 0 dense, partial rotary 0.5 (and
    # q/k/v biases, q/k norms).
    "glm4_moe": ("glm4_moe", tf.Glm4MoeConfig, tf.Glm4MoeForCausalLM, dict(
        n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, moe_intermediate_size=32,
        n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5, attention_bias=True,
        use_qk_norm=True, head_dim=16,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))),
    # Multi-head latent attention as in V2-Lite (no query rank), the v head narrower than the q/k head;
    # greedy softmax routing, 2 shared experts, layer 0 dense. num_key_value_heads = heads: transformers
    # repeats the expanded heads by heads // kv_heads.
    "deepseek_v2": ("deepseek_v2", tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM, dict(
        num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
        n_shared_experts=2, first_k_dense_replace=1,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # A query rank (q_a -> norm -> q_b) and attention biases; group_limited_greedy over 4 groups of 2 with 2
    # kept, routed scaling 2.5; YaRN whose mscale_all_dim scales the softmax (and mscale / mscale_all_dim
    # the cos/sin).
    "deepseek_v2_groups": ("deepseek_v2", tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM, dict(
        num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
        n_shared_experts=1, first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4,
        topk_group=2, routed_scaling_factor=2.5, attention_bias=True, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32, mscale=1.0,
            mscale_all_dim=0.8))),
    # DeepSeek-V3's MLA (a query rank, transformers' rope_interleave: the roped dims stored as pairs) with
    # glm4_moe's sigmoid router over 4 groups of 2, 2 kept, a selection bias, routed scaling 2.5, layer 0
    # dense; YaRN's mscale_all_dim on the softmax scale.
    "deepseek_v3": ("deepseek_v3", tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM, dict(
        num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
        n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0,
                             original_max_position_embeddings=32, mscale=1.0, mscale_all_dim=0.8))),
    # rope_interleave off (the roped dims in halves), no query rank, no groups, norm_topk_prob off.
    "deepseek_v3_halves": ("deepseek_v3", tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM, dict(
        num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
        n_shared_experts=2, first_k_dense_replace=0, n_group=1, topk_group=1, norm_topk_prob=False,
        rope_interleave=False, attention_bias=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # Hybrid: gated short convolutions (kernel 3) in layers 0, 2, 3, attention with per-head q/k norms in
    # layer 1; layer 0 dense, the rest sparse with a sigmoid router, a random selection bias (below) and
    # routed scaling 1.5.
    "lfm2_moe": ("lfm2_moe", tf.Lfm2MoeConfig, tf.Lfm2MoeForCausalLM, dict(
        num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "conv"], num_dense_layers=1,
        num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, conv_L_cache=3,
        routed_scaling_factor=1.5, tie_word_embeddings=False, norm_eps=1e-6)),
    # Gated attention, sliding (window 4, RoPE) and global (NoPE) layers alternating, sandwich norms, layer 0
    # dense, a sigmoid router with a random selection bias (below), route scale 1.5, 2 shared experts, muP.
    "afmoe": ("afmoe", tf.AfmoeConfig, tf.AfmoeForCausalLM, dict(
        num_hidden_layers=4, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
        num_shared_experts=2, num_dense_layers=1, head_dim=16, sliding_window=4, global_attn_every_n_layers=2,
        route_scale=1.5, mup_enabled=True)),
    # Hybrid: Mamba2 in layers 0, 2, 3 (4 heads of 32 = 2 x hidden, state 16, kernel 4, random A/D/dt bias
    # below), NoPE attention in layer 1; Granite's multipliers; 8 experts top-3 plus the shared MLP.
    "granitemoehybrid": ("granitemoehybrid", tf.GraniteMoeHybridConfig, tf.GraniteMoeHybridForCausalLM, dict(
        num_hidden_layers=4, layer_types=["mamba", "attention", "mamba", "mamba"], mamba_n_heads=4,
        mamba_d_head=32, mamba_expand=2, mamba_d_state=16, mamba_n_groups=1, mamba_d_conv=4,
        num_local_experts=8, num_experts_per_tok=3, intermediate_size=32, shared_intermediate_size=48,
        embedding_multiplier=6.0, residual_multiplier=0.3, attention_multiplier=0.1, logits_scaling=2.0,
        position_embedding_type="nope")),
    # Granite-4.0-H-Micro's kind: no experts (the shared MLP alone, dense), RoPE; 2 groups of B/C, attention
    # biases, attention first and last.
    "granitemoehybrid_dense_rope": ("granitemoehybrid", tf.GraniteMoeHybridConfig,
                                    tf.GraniteMoeHybridForCausalLM, dict(
        num_hidden_layers=4, layer_types=["attention", "mamba", "mamba", "attention"], mamba_n_heads=8,
        mamba_d_head=16, mamba_expand=2, mamba_d_state=8, mamba_n_groups=2, mamba_d_conv=3,
        num_local_experts=0, num_experts_per_tok=0, shared_intermediate_size=80, attention_bias=True,
        embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=3.0,
        position_embedding_type="rope")),
    # Hybrid: Gated DeltaNet (2 key heads, 4 value heads of 16, kernel 4) in layers 0-2, gated attention
    # with q/k/v/o biases (the gate's among q_proj's), per-head q/k norms and partial rotary 0.5 in layer 3;
    # 8 experts top-3 unrenormalised plus a gated shared expert, layer 1 dense; zero-centred norms,
    # DeltaNet's dt_bias and gated norm random (below).
    "qwen3_next": ("qwen3_next", tf.Qwen3NextConfig, tf.Qwen3NextForCausalLM, dict(
        QWEN3_NEXT, norm_topk_prob=False, mlp_only_layers=[1], attention_bias=True,
        full_attention_interval=4)),
    # The released layout: ConditionalGeneration, the text decoder under model.language_model beside a tiny
    # vision tower; DeltaNet's projections stored apart; attention in layers 1 and 3; mRoPE sections.
    "qwen3_5_moe": ("qwen3_5_moe", lambda **text: tf.Qwen3_5MoeConfig(text_config=text,
                                                                     vision_config=TINY_VISION),
                    tf.Qwen3_5MoeForConditionalGeneration, dict(
        QWEN3_NEXT, layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                             mrope_section=[2, 1, 1], mrope_interleaved=True))),
    # The text-only layout Qwen3_5MoeForCausalLM saves (model_type qwen3_5_moe_text); attention every 2nd
    # layer.
    "qwen3_5_moe_text": ("qwen3_5_moe_text", tf.Qwen3_5MoeTextConfig, tf.Qwen3_5MoeForCausalLM, dict(
        QWEN3_NEXT, full_attention_interval=2)),
}


def make_model(case: str, seed: int = 0, **overrides):
    """A tiny random model in eval mode (float32, eager attention)."""
    _, config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, **extra, **overrides})
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():  # transformers initialises biases (and LayerNorm's) to zero: test them
        for name, param in model.named_parameters():
            if name.endswith((".bias", ".e_score_correction_bias", "_proj_bias")):  # ERNIE's, gpt_oss's too
                param.normal_(0.0, 0.1)
            if name.endswith((".mlp.expert_bias", ".router.gate.weight")):  # afmoe's (initialised to zeros)
                param.normal_(0.0, 0.1 if name.endswith("bias") else COMMON["initializer_range"])
            if name.endswith((".mamba.A_log", ".mamba.D", ".mamba.dt_bias")):  # granitemoehybrid's constants
                param.uniform_(-1.0, 1.0)  # A in [-e, -1/e]
            if name.endswith("norm.weight") and not param.any():  # zero-centred norms (1 + w): qwen3_next's
                param.normal_(0.0, 0.1)
            if name.endswith((".linear_attn.dt_bias", ".linear_attn.norm.weight")):  # DeltaNet's constants
                param.normal_(1.0, 0.3)
        for name, buffer in model.named_buffers():  # glm4_moe's and deepseek_v3's selection bias
            if name.endswith((".e_score_correction_bias", ".expert_bias")):  # lfm2_moe's too
                buffer.normal_(0.0, 0.1)
    return model


def tokens_for_routes(routes, E: int, H: int, rng):
    """Hidden states ``[T, H]`` for a router whose logit e is feature e (an identity router):
    token t puts expert routes[t][0] first, routes[t][1] second, ..."""
    import numpy as np

    x = rng.standard_normal((len(routes), H)).astype(np.float32) * 0.1
    x[:, :E] = 0.0
    for t, chosen in enumerate(routes):
        for rank, e in enumerate(chosen):
            x[t, e] = 8.0 - 2.0 * rank
    return x


def run_router(moe, logits_TE):
    """The router of ``moe`` over given logits (an identity router matrix): weights and experts."""
    import numpy as np
    import onnx_ir as ir
    import onnxruntime as ort
    import onnxscript

    from moe_onnx.graphs.context import GraphContext
    from moe_onnx.graphs.moe import route

    class Identity:
        def tensor(self, name):
            return ir.tensor(np.eye(moe.num_experts, dtype=np.float32), name=name)

        def blocked(self, name):
            return None

    graph = ir.Graph(inputs=[], outputs=[], nodes=[], opset_imports={"": 21}, name="router")
    builder = onnxscript.GraphBuilder(graph)
    x = builder.input("x", ir.DataType.FLOAT, ["T", moe.num_experts])
    weights, experts = route(GraphContext(builder, Identity(), ir.DataType.FLOAT), x, moe, "l.")
    builder.add_output(weights, "weights")
    builder.add_output(experts, "experts")
    session = ort.InferenceSession(ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": logits_TE.astype(np.float32)})


TEXT_FILE = Path(json.__file__)  # any stdlib source: text every machine has

BYTE_LEVEL_TEXTS = ("def f(x):\n    return x + 1\n" * 20, "héllo wörld <|user|> <|assistant|>")


def byte_level_tokenizer(texts=BYTE_LEVEL_TEXTS, vocab_size: int = 300, special_tokens=("<eos>",)):
    """A byte-level BPE tokenizer (GPT-2 style, with its decoder) trained on ``texts``: any text
    encodes, multi-byte characters span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(special_tokens), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def export_with_tokenizer(case: str, tmp):
    """``case`` with a byte-level BPE tokenizer trained on :data:`TEXT_FILE`, saved as a checkpoint
    directory and exported from it: ``(model, export dir)``, for perplexity and routing tests."""
    import moe_onnx

    tokenizer = byte_level_tokenizer([TEXT_FILE.read_text()], vocab_size=128, special_tokens=())
    model = make_model(case, vocab_size=tokenizer.get_vocab_size())
    model.save_pretrained(tmp / "src")
    tokenizer.save(str(tmp / "src" / "tokenizer.json"))
    return model, moe_onnx.export(tmp / "src", tmp / "out")


def assert_config_value_refused(case: str, field: str, value, message: str, tmp) -> None:
    """``moe-onnx export`` of ``case`` with ``config.json``'s ``field`` set to ``value``: exit 2,
    one line containing ``message``, nothing written but the source."""
    from click.testing import CliRunner

    from moe_onnx.cli import main

    src, out = tmp / "src", tmp / "out"
    make_model(case).save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, field: value}))
    result = CliRunner().invoke(main, ["export", str(src), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error: ") and "\n" not in result.output.strip(), result.output
    assert message in result.output
    assert sorted(p.name for p in tmp.iterdir()) == ["src"]
