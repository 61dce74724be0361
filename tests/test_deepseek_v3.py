"""deepseek_v3 beyond the shared matrices (parity, every impl, greedy generation, quantized weights
and the static cache are in test_parity, test_runtime, test_quantize and test_static_cache; its
latent cache against transformers' and parameter counts in test_deepseek_v2, its router against
transformers' in test_glm4_moe, an FP8 checkpoint with its multi-token-prediction layer in
test_fp8): the released model's figures from its hub config, inspect, and the refusals."""

import numpy as np
import pytest
from models import assert_config_value_refused, make_model

import moe_onnx
from moe_onnx.exporter.config import Config
from moe_onnx.exporter.describe import describe
from moe_onnx.exporter.families import deepseek_v3

# DeepSeek-V3's config.json as the hub ships it (FP8, YaRN in the legacy form, DeepSeek's own fields).
V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def test_v3_is_671b_with_37b_active_and_caches_576_values_per_token_and_layer():
    """The spec from the hub config gives DeepSeek's published sizes (671 B, 37 B active, the
    multi-token-prediction layer not counted); the cache per token and layer is the 512 latent + 64
    roped key where expanded K/V would be 128 heads x (192 + 128); the router is the sigmoid one
    over 8 groups of 32 (4 kept); YaRN's mscale_all_dim squared scales the softmax."""
    spec = deepseek_v3.spec(Config(dict(V3)))
    assert spec.parameter_counts() == {"total": 671_026_419_200, "active_per_token": 36_625_625_600}
    assert spec.kv_dims() == ((1, 512), (1, 64))
    assert spec.num_heads * (spec.head_dim + spec.mla.v_head_dim) == 40960
    assert spec.mla.deinterleave_rope and not spec.rope.interleaved
    assert spec.attention_scale == pytest.approx(192**-0.5 * (0.1 * np.log(40) + 1) ** 2)
    moe = spec.moe
    assert (moe.router, moe.selection_bias, moe.n_group, moe.topk_group) == ("sigmoid", True, 8, 4)
    assert (moe.num_experts, moe.top_k, moe.shared_expert_size) == (256, 8, 2048)
    assert moe.routed_scaling_factor == 2.5
    assert spec.moe_layers == (False,) * 3 + (True,) * 58


def test_inspect_names_the_latent_cache_the_reordered_rope_and_the_router(tmp_path):
    text = describe(moe_onnx.export(make_model("deepseek_v3"), tmp_path / "out"))
    assert ("attention    multi-head latent: queries by q_a (rank 24) -> norm -> q_b; the cache holds 40 "
            "values per token and layer") in text
    assert "the roped dims' stored pairs reordered to halves at export" in text
    assert ("router       top-3 of sigmoid(router logits) + selection bias within the best 2 of 4 expert "
            "groups, weighted by the unbiased sigmoid (renormalised), times 2.5") in text
    halves = describe(moe_onnx.export(make_model("deepseek_v3_halves"), tmp_path / "halves"))
    assert "reordered" not in halves and "queries by q_proj" in halves


@pytest.mark.parametrize("field, value, message", [
    ("scoring_func", "softmax", "deepseek_v3 with scoring_func 'softmax' is not supported ('sigmoid'"),
    ("topk_method", "greedy", "deepseek_v3 with topk_method 'greedy' is not supported ('noaux_tc'"),
    ("moe_layer_freq", 2, "deepseek_v3 with moe_layer_freq 2 is not supported (1"),
    ("n_group", 3, "deepseek_v3 with n_routed_experts 8, n_group 3, topk_group 2: the experts must split"),
])
def test_deepseek_v3_unsupported_config_value_is_one_line_naming_it(field, value, message, tmp_path):
    assert_config_value_refused("deepseek_v3", field, value, message, tmp_path)
