"""qwen3_next and qwen3_5_moe beyond the shared matrix (parity from a saved checkpoint of each layout,
quantized, static cache, greedy generation and the hybrids' runtime tests are in test_parity,
test_quantize, test_static_cache, test_runtime and test_hybrid): how config.json is read, and the
refusals, each one line before anything is written."""

import json

import pytest
from click.testing import CliRunner
from models import assert_config_value_refused, make_model

from moe_onnx.cli import main
from moe_onnx.exporter import families
from moe_onnx.exporter.config import Config


def test_hub_configs_read_as_transformers_reads_them():
    """Qwen3-Next's hub config.json: no layer_types (every 4th layer attention), partial rotary at the
    top level; Qwen3.5's: the decoder in text_config, mRoPE sections in rope_parameters."""
    next_cfg = make_model("qwen3_next").config.to_dict()
    for key in ("layer_types", "rope_parameters", "partial_rotary_factor"):
        next_cfg.pop(key, None)
    spec = families.get("qwen3_next").spec(Config({**next_cfg, "num_hidden_layers": 8, "rope_theta": 1e7,
                                                   "partial_rotary_factor": 0.25, "mlp_only_layers": []}))
    assert spec.layer_types == ("linear_attention",) * 3 + ("attention",) + ("linear_attention",) * 3 + (
        "attention",)
    assert 2 * len(spec.rope.inv_freq) == 4  # a quarter of head_dim 16
    assert spec.attention_gate and spec.deltanet.num_v_heads == 4
    released = make_model("qwen3_5_moe").config.to_dict()
    spec = families.get("qwen3_5_moe").spec(Config(released))
    assert spec.model_type == "qwen3_5_moe" and spec.layer_types[1] == "attention"
    assert spec.moe.norm_topk_prob and all(spec.moe_layers) and not spec.tie_word_embeddings


@pytest.mark.parametrize("field, value, message", [
    # The DeltaNet state sizes config.json implies disagree with the stored projections.
    ("linear_value_head_dim", 8,
     "linear_attn.in_proj_qkvz.weight' has shape [192, 64] but config.json implies [128, 64]"),
    ("linear_num_key_heads", 3, "linear_num_value_heads 4 is not a multiple of linear_num_key_heads 3"),
    ("layer_types", ["linear_attention", "mamba", "linear_attention", "full_attention"],
     "'layer_types' must list 4 entries of ['full_attention', 'linear_attention']"),
    ("attn_output_gate", False, "qwen3_next with attn_output_gate=False is not supported"),
])
def test_qwen3_next_config_that_disagrees_is_one_line_naming_it(field, value, message, tmp_path):
    assert_config_value_refused("qwen3_next", field, value, message, tmp_path)


def test_qwen3_5_moe_text_config_is_checked_against_the_language_model(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_model("qwen3_5_moe").save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["linear_conv_kernel_dim"] = 3
    (src / "config.json").write_text(json.dumps(cfg))
    result = CliRunner().invoke(main, ["export", str(src), "-o", str(out)])
    assert result.exit_code == 2 and "\n" not in result.output.strip(), result.output
    assert ("'model.language_model.layers.0.linear_attn.conv1d.weight' has shape [128, 1, 4] but config.json "
            "implies [128, 1, 3]") in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
