from moe_onnx.exporter.config import Config, dense_spec, moe_spec, sparse_layers
from moe_onnx.exporter.family import Family


def spec(cfg: Config):
    layers = sparse_layers(cfg, cfg.int("num_hidden_layers"))
    return dense_spec(cfg, moe=moe_spec(cfg, "moe_intermediate_size"), moe_layers=layers, qk_norm="head")


FAMILY = Family("qwen3_moe", spec)
