"""The graph's weight names: one vocabulary for the blocks that read weights (:mod:`moe_onnx.graphs`)
and the exporter that supplies them (:mod:`moe_onnx.exporter.weights`).

A name is a prefix plus a tail: ``layer(3) + QKV`` is ``layers.3.qkv``; ``expert(moe(3), 5) + DOWN``
is ``layers.3.moe.experts.5.down``; ``bias(layer(3) + O_PROJ)`` is ``layers.3.o_proj_bias``. Shapes
and layouts are listed in :mod:`moe_onnx.graphs.decoder`. These are also the initializers' names
in the written graph, so a change here renames them.
"""

from __future__ import annotations

# The whole model's.
EMBED = "embed_tokens"
LM_HEAD = "lm_head"
FINAL_NORM = "norm"

# Under layer(i): norms and attention.
INPUT_NORM = "input_norm"
POST_NORM = "post_norm"
POST_MIXER_NORM = "post_mixer_norm"  # sandwich norms: on the token mixer's output
POST_FFN_NORM = "post_ffn_norm"  # and on the feed-forward's
QKV = "qkv"
O_PROJ = "o_proj"
SINKS = "sinks"
Q_NORM = "q_norm"
K_NORM = "k_norm"
# Multi-head latent attention's, in place of QKV.
Q_PROJ = "q_proj"
Q_A = "q_a"
Q_A_NORM = "q_a_norm"
Q_B = "q_b"
KV_A = "kv_a"
KV_A_NORM = "kv_a_norm"
K_UP = "k_up"
V_UP = "v_up"

# Under mixer(i): a recurrent token mixer's projections (MatMul [in, out]) and its depthwise conv.
IN_PROJ = "in_proj"
OUT_PROJ = "out_proj"
CONV = "conv"

# Under mlp(i), shared(moe(i)) and expert(moe(i), e); under moe(i) the experts stacked [E, ...].
GATE_UP = "gate_up"
DOWN = "down"

# Under moe(i): the router and the fused ops' layouts of the experts.
ROUTER = "router"
ROUTER_BIAS = "router_bias"  # the selection bias TopK ranks by (not the router Linear's bias)
LOGIT_BIAS = "logit_bias"  # the router Linear's bias
SHARED_GATE = "shared_gate"
FC1 = "fc1"  # com.microsoft.MoE
FC2 = "fc2"
QFC1 = "qfc1"  # com.microsoft.QMoE
QFC2 = "qfc2"

BIAS_SUFFIX = "_bias"
SCALE_SUFFIX = "_scale"  # a quantized weight's block scales


def bias(name: str) -> str:
    """The bias added after the weight ``name`` (a LayerNorm's, a projection's)."""
    return name + BIAS_SUFFIX


def scale(name: str) -> str:
    """The block scales of the quantized weight ``name``."""
    return name + SCALE_SUFFIX


def layer(i: int) -> str:
    return f"layers.{i}."


def mixer(i: int, kind: str) -> str:
    """Layer ``i``'s recurrent token mixer of ``kind`` (``conv``, ``mamba``, ``linear_attention``)."""
    return f"{layer(i)}{kind}."


def mlp(i: int) -> str:
    """Layer ``i``'s dense feed-forward."""
    return f"{layer(i)}mlp."


def moe(i: int) -> str:
    """Layer ``i``'s MoE block."""
    return f"{layer(i)}moe."


def expert(moe_prefix: str, e: int) -> str:
    return f"{moe_prefix}experts.{e}."


def shared(moe_prefix: str) -> str:
    """The shared expert of an MoE block."""
    return f"{moe_prefix}shared."


def is_stacked_experts(name: str) -> bool:
    """Whether ``name`` is an MoE block's experts stacked ``[E, in, out]`` (gather, dense)."""
    return name.endswith((".moe." + GATE_UP, ".moe." + DOWN))
