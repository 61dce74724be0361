"""Qwen3.5-MoE's text-only layout, as ``Qwen3_5MoeForCausalLM`` saves it: :mod:`qwen3_5_moe` with
the text fields at the top level and the decoder's tensors under ``model.``."""

from moe_onnx.exporter.families.qwen3_5_moe import NAMES, spec
from moe_onnx.exporter.family import Family

FAMILY = Family("qwen3_5_moe_text", spec, NAMES)
