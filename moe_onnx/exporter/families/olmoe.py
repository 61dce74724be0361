from moe_onnx.exporter.config import Config, dense_spec, moe_spec
from moe_onnx.exporter.family import Family


def spec(cfg: Config):
    return dense_spec(
        cfg,
        moe=moe_spec(cfg, "intermediate_size"),
        qk_norm="full",  # q/k RMSNorm over the whole projection, before the head split
        clip_qkv=float(cfg.get("clip_qkv", 0.0)),
    )


FAMILY = Family("olmoe", spec)
