"""granitemoehybrid beyond the shared matrix (parity, quantized, static cache, greedy generation and
the hybrid caches are in test_parity, test_quantize, test_static_cache, test_runtime and
test_hybrid): the hub's spellings of config.json, which Mamba2 weights are quantized, the refusals."""

import json

import onnx
import pytest
from models import assert_config_value_refused, make_model

import moe_onnx
from moe_onnx import manifest
from moe_onnx.exporter.verify import compare

HUB_TYPES = ["mamba", "attention", "mamba", "mamba"]  # save_pretrained writes linear_/full_attention


@pytest.mark.parametrize("key", ["layer_types", "layers_block_type"])
def test_the_hubs_config_spellings_export_with_parity(key, tmp_path):
    """Released config.json files spell the layers "mamba" / "attention" (older ones under
    ``layers_block_type``), leave ``time_step_limit`` out and may give ``mamba_d_head`` "auto"."""
    model = make_model("granitemoehybrid")
    model.save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "config.json"
    cfg = {k: v for k, v in json.loads(path.read_text()).items()
           if k not in ("layer_types", "time_step_limit")}
    path.write_text(json.dumps({**cfg, key: HUB_TYPES, "mamba_d_head": "auto"}))
    out = moe_onnx.export(tmp_path / "src", tmp_path / "out")
    spec = manifest.read(out).spec
    assert spec.layer_types == ("mamba", "attention", "mamba", "mamba") and spec.mamba.head_dim == 32
    report = compare(model, out, spec, lengths=(7, 4), decode_steps=2)
    assert report.max_rel <= 1e-4 and report.argmax_agree == 1.0, report


def test_int4_quantizes_the_mamba_projections_only(tmp_path):
    out = moe_onnx.export(make_model("granitemoehybrid"), tmp_path / "out", weights="int4")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    types = {t.name: t.data_type for t in graph.initializer if t.name.startswith("layers.0.mamba.")}
    quantized = {name for name in types if name + "_scale" in types}
    assert quantized == {"layers.0.mamba.in_proj", "layers.0.mamba.out_proj"}
    floats = {"conv", "conv_bias", "dt_bias", "a_neg", "d", "gated_norm"}
    assert {f"layers.0.mamba.{n}": onnx.TensorProto.FLOAT for n in floats}.items() <= types.items()


@pytest.mark.parametrize("field, value, message", [
    ("layer_types", ["mamba", "attention", "conv", "mamba"],
     "granitemoehybrid layer 2: layer type 'conv' is not supported"),
    ("layer_types", ["mamba"] * 4, "granitemoehybrid without an attention layer is not supported"),
    ("position_embedding_type", "alibi",
     "granitemoehybrid with position_embedding_type 'alibi' is not supported"),
    ("time_step_limit", [0.001, 100.0],
     "granitemoehybrid with time_step_limit [0.001, 100.0] is not supported"),
    ("mamba_n_groups", 3, "mamba_n_groups 3 must divide mamba_n_heads 4"),
    ("mamba_d_head", 16, "mamba_n_heads 4 x mamba_d_head 16 must be mamba_expand x hidden_size = 128"),
    # A checkpoint whose state sizes disagree with its config: named before anything is written.
    ("mamba_d_state", 32, "mamba.in_proj.weight' has shape [292, 64] but config.json implies [324, 64]"),
    ("mamba_d_conv", 3, "mamba.conv1d.weight' has shape [160, 1, 4] but config.json implies [160, 1, 3]"),
])
def test_granitemoehybrid_unsupported_config_value_is_one_line_naming_it(field, value, message, tmp_path):
    assert_config_value_refused("granitemoehybrid", field, value, message, tmp_path)
