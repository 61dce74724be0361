from moe_onnx.exporter.config import Config, dense_spec, num_experts
from moe_onnx.exporter.family import Architecture
from moe_onnx.spec import MoeSpec


def spec(cfg: Config):
    moe = MoeSpec(
        num_experts=num_experts(cfg),
        top_k=cfg.int("num_experts_per_tok"),
        expert_size=cfg.int("intermediate_size"),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
    )
    bias = bool(cfg.get("attention_bias", False))
    return dense_spec(
        cfg,
        moe=moe,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="full",  # q/k RMSNorm over the whole projection, before the head split
        clip_qkv=float(cfg.get("clip_qkv", 0.0)),
    )


ARCH = Architecture("olmoe", spec)
