from moe_onnx.exporter.config import Config, dense_spec
from moe_onnx.exporter.family import Family


def spec(cfg: Config):
    return dense_spec(cfg, qk_norm="head")  # RMSNorm of each q/k head


FAMILY = Family("qwen3", spec)
