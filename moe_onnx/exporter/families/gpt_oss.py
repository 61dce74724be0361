"""gpt-oss: attention sinks, q/k/v/o biases, sliding and full layers (``layer_types``), YaRN; a
router with a bias whose top-k logits are softmaxed, experts with biases and gpt-oss's clamped
SwiGLU over interleaved gate/up columns. Checkpoints ship the experts as MXFP4 (read dequantized,
see :mod:`moe_onnx.exporter.mxfp4`)."""

from moe_onnx.errors import CheckpointError
from moe_onnx.exporter.config import Config, dense_spec, moe_spec, sliding_layers
from moe_onnx.exporter.family import Family, Names

# transformers' GptOssConfig defaults, for hub configs that leave them out.
DEFAULTS = dict(attention_bias=True, rms_norm_eps=1e-5, sliding_window=128, rope_theta=150000.0,
                max_position_embeddings=131072, swiglu_alpha=1.702, swiglu_limit=7.0)
YARN = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
            original_max_position_embeddings=4096)


def spec(cfg: Config):
    cfg = Config({**DEFAULTS, **cfg.data}, cfg.source)
    cfg.data["hidden_act"] = "silu"  # unused: the experts' activation is the clamped SwiGLU below
    if not cfg.get("rope_parameters") and not cfg.get("rope_scaling"):
        cfg.data["rope_parameters"] = {**YARN, "rope_theta": cfg.get("rope_theta")}
    if not cfg.get("layer_types"):  # even layers slide, odd ones attend to everything
        cfg.data["layer_types"] = [("full_attention", "sliding_attention")[(i + 1) % 2]
                                   for i in range(cfg.int("num_hidden_layers"))]
    # softmax over the k largest (biased) logits = softmax -> top-k -> renormalise (as granitemoe).
    moe = moe_spec(cfg, "intermediate_size", norm_topk_prob=True, logit_bias=True, expert_bias=True,
                   swiglu_alpha=_positive(cfg, "swiglu_alpha"), swiglu_beta=1.0,
                   swiglu_limit=_positive(cfg, "swiglu_limit"))
    return dense_spec(cfg, moe=moe, attention_sinks=True, sliding_layers=sliding_layers(cfg))


def _positive(cfg: Config, key: str) -> float:
    value = cfg.get(key, DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise CheckpointError(f"{cfg.source}: {key!r} must be a positive number, got {value!r}")
    return float(value)


# Stored as in memory: router.weight/.bias, experts.gate_up_proj [E, H, 2F] (gate/up interleaved),
# down_proj [E, F, H], their _bias; the hub's MXFP4 experts are gate_up_proj_blocks/_scales.
NAMES = Names(router="router.weight", stacked_in_out=True, interleaved_gate_up=True)
FAMILY = Family("gpt_oss", spec, NAMES)
