from moe_onnx.errors import UnsupportedArchitectureError
from moe_onnx.exporter.config import Config, dense_spec, num_experts, sparse_layers
from moe_onnx.exporter.family import Architecture
from moe_onnx.spec import MoeSpec


def spec(cfg: Config):
    if cfg.get("use_sliding_window", False):
        raise UnsupportedArchitectureError("qwen2_moe with use_sliding_window=true is not supported")
    moe = MoeSpec(
        num_experts=num_experts(cfg),
        top_k=cfg.int("num_experts_per_tok"),
        expert_size=cfg.int("moe_intermediate_size"),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        shared_expert_size=cfg.int("shared_expert_intermediate_size", 0),
        shared_expert_gate=True,
    )
    layers = sparse_layers(cfg, cfg.int("num_hidden_layers"))
    return dense_spec(cfg, moe=moe, moe_layers=layers, qkv_bias=bool(cfg.get("qkv_bias", True)))


ARCH = Architecture("qwen2_moe", spec)
