"""A hybrid model's recurrent token mixers' graph weights from a checkpoint (the ``layer_types``
that are not attention; see :mod:`moe_onnx.graphs.short_conv` and its siblings for the layouts).

The checkpoint's tensors of layer ``i``'s mixer sit under ``{model}layers.{i}.{module}.``, the
module named by ``Names.mixers``.
"""

from __future__ import annotations

from moe_onnx import weight_names as wn
from moe_onnx.exporter.recipes import CheckpointReader, Recipe


def mixer_recipes(src: CheckpointReader, i: int, layer: str) -> dict[str, Recipe]:
    """The recipes of layer ``i``'s recurrent mixer, its checkpoint tensors under ``layer``."""
    kind = src.spec.mixer(i)
    p = f"{layer}{dict(src.names.mixers)[kind]}."
    g = wn.mixer(i, kind)
    if kind == "conv":
        return _short_conv(src, g, p)
    raise NotImplementedError(f"layer {i}: no weight map for token mixer {kind!r} yet")


def _short_conv(src: CheckpointReader, g: str, p: str) -> dict[str, Recipe]:
    s, r = src.spec, {}
    H, K = s.hidden_size, s.short_conv.kernel
    r[g + wn.IN_PROJ] = src.linear([3 * H], H, p, ("in_proj",))
    r[g + wn.CONV] = src.plain((H, 1, K), p + "conv.weight")
    r[g + wn.OUT_PROJ] = src.linear([H], H, p, ("out_proj",))
    if s.short_conv.bias:
        r[wn.bias(g + wn.IN_PROJ)] = src.bias([3 * H], p, ("in_proj",))
        r[wn.bias(g + wn.CONV)] = src.plain((H,), p + "conv.bias")
        r[wn.bias(g + wn.OUT_PROJ)] = src.bias([H], p, ("out_proj",))
    return r
