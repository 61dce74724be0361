"""gpt_oss beyond the shared parity matrix: what inspect says, routing statistics, fp16, the
refusals, and the spec's counts (its parity, every impl, int8/int4, greedy generation and MXFP4
checkpoints are in test_parity, test_quantize, test_qmoe, test_runtime and test_mxfp4)."""


import numpy as np
import pytest
import torch
import transformers as tf
from click.testing import CliRunner
from models import TEXT_FILE, assert_config_value_refused, export_with_tokenizer, make_model
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import moe_onnx
from moe_onnx import manifest
from moe_onnx.cli import main
from moe_onnx.evaluation import evaluate, token_windows, torch_quality
from moe_onnx.exporter import families
from moe_onnx.exporter.config import Config
from moe_onnx.exporter.verify import compare


def test_spec_counts_every_parameter_of_the_model():
    model = make_model("gpt_oss")
    spec = families.get("gpt_oss").spec(Config(model.config.to_dict()))
    assert spec.parameter_counts()["total"] == sum(p.numel() for p in model.parameters())
    assert spec.sliding_layers == (True, False, True) and [spec.window(i) for i in range(3)] == [4, 0, 4]


def test_hub_config_defaults_are_transformers_defaults():
    """gpt-oss-20b's config.json leaves out what GptOssConfig defaults: YaRN from rope_scaling, the
    SwiGLU's alpha, layer_types on older exports."""
    hub = {"model_type": "gpt_oss", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 32,
           "num_local_experts": 4, "num_experts_per_tok": 2, "experts_per_token": 2, "sliding_window": 128,
           "rope_theta": 150000, "initial_context_length": 4096, "max_position_embeddings": 131072,
           "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "rope_type": "yarn",
                            "original_max_position_embeddings": 4096, "truncate": False},
           "swiglu_limit": 7.0, "attention_bias": True, "rms_norm_eps": 1e-05}
    spec = families.get("gpt_oss").spec(Config(hub))
    ours = {k: v for k, v in hub.items() if k not in ("rope_scaling", "rope_theta", "experts_per_token",
                                                      "initial_context_length", "model_type")}
    theirs = tf.GptOssConfig(**ours, rope_parameters={**hub["rope_scaling"], "rope_theta": 150000.0})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](theirs)
    np.testing.assert_allclose(spec.rope.inv_freq, inv_freq.numpy(), rtol=1e-6)
    assert spec.rope.attention_scaling == pytest.approx(attention_factor)
    assert spec.sliding_layers == tuple(t == "sliding_attention" for t in theirs.layer_types)
    assert (spec.moe.swiglu_alpha, spec.moe.swiglu_limit, spec.rms_norm_eps) == (1.702, 7.0, 1e-5)


def test_inspect_names_the_family_specifics(tmp_path):
    out = moe_onnx.export(make_model("gpt_oss"), tmp_path / "out")
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for line in ("attention    sliding window 4 on layers 0, 2, full on the other 1; "
                 "a learned sink logit per head in each softmax",
                 "router       softmax over the top-3 router logits + bias; experts with biases",
                 "activation   gate * sigmoid(1.5 * gate) * (up + 1), gate <= 0.6, |up| <= 0.6",
                 "rope         yarn factor 4, cos/sin scaled by 1.139"):
        assert line in lines, result.output


def test_gpt_oss_fp16_export_is_close(tmp_path):
    model = make_model("gpt_oss", seed=2)
    out = moe_onnx.export(model, tmp_path / "out", dtype="fp16")
    report = compare(model, out, manifest.read(out).spec, lengths=(6, 3), decode_steps=2)
    assert report.max_rel <= 2e-2 and report.argmax_agree == 1.0, report


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_with_tokenizer("gpt_oss", tmp_path_factory.mktemp("gpt_oss_eval"))


def test_eval_routing_counts_and_perplexity_match_pytorch(exported):
    """``eval --routing``: tokens per expert from the graph equal the top-k of transformers' biased
    router logits; perplexity over windows longer than the sliding window agrees."""
    model, out = exported
    windows = token_windows(out / "tokenizer.json", [TEXT_FILE], 32)[:2]
    report = evaluate(out, [TEXT_FILE], window=32, max_windows=2, routing=True)
    reference = torch_quality(model, windows)
    assert abs(report.perplexity - reference.perplexity) / reference.perplexity < 1e-4
    with torch.no_grad():
        result = model(input_ids=torch.from_numpy(windows), output_router_logits=True)
    assert sorted(report.routing) == [0, 1, 2]
    for layer, logits in enumerate(result.router_logits):
        chosen = torch.topk(logits, 3, dim=-1).indices.reshape(-1).numpy()
        assert report.routing[layer] == np.bincount(chosen, minlength=6).tolist()


@pytest.mark.parametrize("field, value, message", [
    ("layer_types", ["sliding_attention", "chunked_attention", "full_attention"],
     "gpt_oss with layer_types value 'chunked_attention' is not supported "
     "(sliding_attention, full_attention)"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 10000.0},
     "rope_type 'longrope' is not supported (default, linear, dynamic, llama3, yarn)"),
    ("swiglu_limit", "7", "'swiglu_limit' must be a positive number, got '7'"),
])
def test_gpt_oss_unsupported_config_value_is_one_line_naming_it(field, value, message, tmp_path):
    assert_config_value_refused("gpt_oss", field, value, message, tmp_path)
