from moe_onnx.exporter.config import Config, dense_spec, moe_spec, sparse_layers
from moe_onnx.exporter.family import Family


def spec(cfg: Config):
    moe = moe_spec(
        cfg,
        "moe_intermediate_size",
        shared_expert_size=cfg.int("shared_expert_intermediate_size", 0),
        shared_expert_gate=True,  # sigmoid(x @ w) scales the shared expert
    )
    return dense_spec(cfg, moe=moe, moe_layers=sparse_layers(cfg, cfg.int("num_hidden_layers")),
                      qkv_bias=bool(cfg.get("qkv_bias", True)), o_bias=False)


FAMILY = Family("qwen2_moe", spec)
