"""RoPE frequencies from config.json against transformers' own: YaRN in its variants, and the refusal."""

import numpy as np
import pytest
import transformers as tf
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from moe_onnx.errors import UnsupportedFamilyError
from moe_onnx.exporter.config import Config, rope_spec

YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64)


@pytest.mark.parametrize("params", [
    YARN,  # truncate (the default), beta_fast 32 / beta_slow 1 by default
    {**YARN, "truncate": False, "beta_fast": 16.0, "beta_slow": 2.0},  # gpt-oss style (unrounded ramp)
    {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},  # DeepSeek's ratio: attention factor 1.0
    {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5, "factor": 40.0, "rope_theta": 150000.0},
    {**YARN, "attention_factor": 1.25},  # given outright
    {**YARN, "factor": 1.0},  # no extension: attention factor 1
    {**YARN, "original_max_position_embeddings": 4096, "rope_theta": 500000.0, "truncate": False},
])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_yarn_matches_transformers(params, head_dim):
    config = tf.LlamaConfig(hidden_size=128, num_attention_heads=128 // head_dim, head_dim=head_dim,
                            max_position_embeddings=256, rope_parameters=dict(params))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    spec = rope_spec(Config(config.to_dict()), head_dim)
    assert spec.rope_type == "yarn" and spec.factor == params["factor"]
    np.testing.assert_allclose(np.array(spec.inv_freq, np.float32), inv_freq.numpy(), rtol=1e-6, atol=0)
    assert spec.attention_scaling == pytest.approx(attention_factor, rel=1e-12)
    if params["factor"] > 1:  # the test would not notice a YaRN that did nothing
        default = ROPE_INIT_FUNCTIONS["linear"](config)[0].numpy() * params["factor"]
        assert not np.allclose(spec.inv_freq, default, rtol=1e-3)


def test_yarn_from_legacy_rope_scaling_fields():
    """Hub configs (gpt-oss's among them) give ``rope_theta`` + ``rope_scaling``; the factor may be
    left out when ``max_position_embeddings`` / ``original_max_position_embeddings`` implies it."""
    legacy = Config({"rope_theta": 150000.0, "max_position_embeddings": 1024, "rope_scaling": {
        "rope_type": "yarn", "factor": None, "original_max_position_embeddings": 128, "truncate": False}})
    spec = rope_spec(legacy, 64)
    config = tf.LlamaConfig(hidden_size=128, num_attention_heads=2, head_dim=64, max_position_embeddings=1024,
                            rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=8.0,
                                                 original_max_position_embeddings=128, truncate=False))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    np.testing.assert_allclose(np.array(spec.inv_freq, np.float32), inv_freq.numpy(), rtol=1e-6, atol=0)
    assert (spec.factor, spec.attention_scaling) == (8.0, pytest.approx(attention_factor))


def test_unsupported_rope_type_is_refused_by_name():
    cfg = Config({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0}})
    with pytest.raises(UnsupportedFamilyError, match=r"rope_type 'longrope' is not supported \(.*yarn\)"):
        rope_spec(cfg, 16)
