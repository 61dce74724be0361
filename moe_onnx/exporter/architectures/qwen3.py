from moe_onnx.errors import UnsupportedArchitectureError
from moe_onnx.exporter.config import Config, dense_spec
from moe_onnx.exporter.family import Architecture


def spec(cfg: Config):
    if cfg.get("use_sliding_window", False):
        raise UnsupportedArchitectureError("qwen3 with use_sliding_window=true is not supported")
    bias = bool(cfg.get("attention_bias", False))
    return dense_spec(cfg, qkv_bias=bias, o_bias=bias, qk_norm="head")


ARCH = Architecture("qwen3", spec)
