from moe_onnx.exporter.config import Config, dense_spec
from moe_onnx.exporter.family import Architecture


def spec(cfg: Config):
    bias = bool(cfg.get("attention_bias", False))
    return dense_spec(cfg, qkv_bias=bias, o_bias=bias)


ARCH = Architecture("llama", spec)
