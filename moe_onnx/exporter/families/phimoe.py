from moe_onnx.errors import UnsupportedFamilyError
from moe_onnx.exporter.config import Config, dense_spec, moe_spec
from moe_onnx.exporter.family import Family, Names


def spec(cfg: Config):
    # sparsemixer always picks two experts; its weights are not renormalised.
    if cfg.int("num_experts_per_tok", 2) != 2:
        raise UnsupportedFamilyError("phimoe with num_experts_per_tok != 2 is not supported (sparsemixer: 2)")
    moe = moe_spec(cfg, "intermediate_size", norm_topk_prob=False, router="sparsemixer",
                   jitter_eps=float(cfg.get("router_jitter_noise", 0.01)))
    out = dense_spec(cfg, moe=moe, norm="layer", lm_head_bias=bool(cfg.get("lm_head_bias", False)))
    rope_type = out.rope.rope_type
    if rope_type != "default":  # phimoe scales cos/sin by short/long mscale otherwise
        raise UnsupportedFamilyError(f"phimoe with rope_type {rope_type!r} is not supported (default)")
    return out


# In memory (transformers 5): mlp.router and stacked experts; stored (hub, save_pretrained):
# block_sparse_moe.gate and experts.{e}.w1/w3/w2, as Mixtral's.
NAMES = Names(moe="block_sparse_moe", router="router.weight", expert_gate_up=("w1", "w3"), expert_down="w2",
              renames=(("block_sparse_moe.gate.weight", "block_sparse_moe.router.weight"),))
FAMILY = Family("phimoe", spec, NAMES)
