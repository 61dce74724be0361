from moe_onnx.exporter.config import Config, dense_spec, moe_spec
from moe_onnx.exporter.family import Family, Names


def spec(cfg: Config):
    # Mixtral always renormalises the top-k weights; its experts are as wide as a dense FFN.
    return dense_spec(cfg, moe=moe_spec(cfg, "intermediate_size", norm_topk_prob=True))


# Hub checkpoints: block_sparse_moe.{gate, experts.{e}.w1/w3/w2}; transformers 5 models use "mlp".
NAMES = Names(moe="block_sparse_moe", expert_gate_up=("w1", "w3"), expert_down="w2")
FAMILY = Family("mixtral", spec, NAMES)
