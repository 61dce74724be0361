from moe_onnx.errors import UnsupportedArchitectureError
from moe_onnx.exporter.config import Config, dense_spec
from moe_onnx.exporter.family import Architecture


def spec(cfg: Config):
    if cfg.get("use_sliding_window", False):
        raise UnsupportedArchitectureError("qwen2 with use_sliding_window=true is not supported")
    return dense_spec(cfg, qkv_bias=True)


ARCH = Architecture("qwen2", spec)
