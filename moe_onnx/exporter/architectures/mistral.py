from moe_onnx.exporter.config import Config, dense_spec
from moe_onnx.exporter.family import Architecture


def spec(cfg: Config):
    return dense_spec(cfg, sliding_window=cfg.int("sliding_window", 0))


ARCH = Architecture("mistral", spec)
