from moe_onnx.exporter.config import Config, dense_spec, moe_spec, multiplier_fields
from moe_onnx.exporter.family import Family, Names


def spec(cfg: Config, shared_expert_size: int = 0):
    # Granite softmaxes its k largest router logits: the same weights as softmax -> top-k ->
    # renormalise (softmax is monotonic; renormalising cancels the other experts' share).
    moe = moe_spec(cfg, "intermediate_size", norm_topk_prob=True, shared_expert_size=shared_expert_size)
    return dense_spec(cfg, moe=moe, **multiplier_fields(cfg))


# In memory (transformers 5): router.weight and stacked experts under the default names; stored
# (hub, save_pretrained): router.layer, input_linear [E, 2F, H] (gate | up), output_linear [E, H, F].
NAMES = Names(moe="block_sparse_moe", router="router.weight", renames=(
    ("block_sparse_moe.router.layer.weight", "block_sparse_moe.router.weight"),
    ("block_sparse_moe.input_linear.weight", "block_sparse_moe.experts.gate_up_proj"),
    ("block_sparse_moe.output_linear.weight", "block_sparse_moe.experts.down_proj"),
))
FAMILY = Family("granitemoe", spec, NAMES)
