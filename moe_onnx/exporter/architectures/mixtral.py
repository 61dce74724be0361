from moe_onnx.exporter.config import Config, dense_spec
from moe_onnx.exporter.family import Architecture, Naming
from moe_onnx.spec import MoeSpec


def spec(cfg: Config):
    moe = MoeSpec(
        num_experts=cfg.int("num_local_experts"),
        top_k=cfg.int("num_experts_per_tok"),
        expert_size=cfg.int("intermediate_size"),
        norm_topk_prob=True,  # Mixtral always renormalises the top-k weights
    )
    return dense_spec(cfg, moe=moe, sliding_window=cfg.int("sliding_window", 0))


ARCH = Architecture(
    "mixtral", spec, Naming(moe_prefix="block_sparse_moe", expert_proj=("w1", "w3", "w2"))
)
