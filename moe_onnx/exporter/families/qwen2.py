from moe_onnx.exporter.config import Config, dense_spec
from moe_onnx.exporter.family import Family


def spec(cfg: Config):
    return dense_spec(cfg, qkv_bias=True, o_bias=False)  # Qwen2: q/k/v biases, none on o_proj


FAMILY = Family("qwen2", spec)
