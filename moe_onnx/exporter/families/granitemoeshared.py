import dataclasses

from moe_onnx.exporter.config import Config
from moe_onnx.exporter.families import granitemoe
from moe_onnx.exporter.family import Family


def spec(cfg: Config):
    return granitemoe.spec(cfg, shared_expert_size=cfg.int("shared_intermediate_size", 0))


# Granite-MoE plus an ungated shared expert beside block_sparse_moe: shared_mlp.input_linear
# [2S, H] (gate | up) and output_linear [H, S].
NAMES = dataclasses.replace(granitemoe.NAMES, shared_gate_up=("shared_mlp.input_linear",),
                            shared_down="shared_mlp.output_linear")
FAMILY = Family("granitemoeshared", spec, NAMES)
