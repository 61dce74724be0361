"""A hybrid model's recurrent token mixers' graph weights from a checkpoint (the ``layer_types``
that are not attention; see :mod:`moe_onnx.graphs.short_conv` and its siblings for the layouts).

The checkpoint's tensors of layer ``i``'s mixer sit under ``{model}layers.{i}.{module}.``, the
module named by ``Names.mixers``.
"""

from __future__ import annotations

import numpy as np

from moe_onnx import weight_names as wn
from moe_onnx.exporter.recipes import CheckpointReader, Recipe
from moe_onnx.graphs.deltanet import deltanet_sources
from moe_onnx.graphs.mamba2 import mamba2_sources


def mixer_recipes(src: CheckpointReader, i: int, layer: str) -> dict[str, Recipe]:
    """The recipes of layer ``i``'s recurrent mixer, its checkpoint tensors under ``layer``."""
    kind = src.spec.mixer(i)
    p = f"{layer}{dict(src.names.mixers)[kind]}."
    g = wn.mixer(i, kind)
    if kind == "conv":
        return _short_conv(src, g, p)
    if kind == "mamba":
        return _mamba(src, g, p)
    if kind == "linear_attention":
        return _deltanet(src, g, p)
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


def _mamba(src: CheckpointReader, g: str, p: str) -> dict[str, Recipe]:
    """Mamba2's weights as :func:`moe_onnx.graphs.mamba2.mamba2_sources` lays them out, each
    stored shape checked against config.json now."""
    r = {}
    for name, source in mamba2_sources(src.spec.mamba, src.spec.hidden_size).items():
        stored = src.checked(src.find(p + source.tensor), source.shape)

        def load(stored=stored, source=source) -> np.ndarray:
            return source.make(src.ckpt.load(stored))

        r[g + name] = load, source.graph_shape
    return r


def _deltanet(src: CheckpointReader, g: str, p: str) -> dict[str, Recipe]:
    """Gated DeltaNet's weights as :func:`moe_onnx.graphs.deltanet.deltanet_sources` lays them out,
    from qwen3_next's fused ``in_proj_qkvz`` / ``in_proj_ba`` where the checkpoint has them, else
    from qwen3_5_moe's separate projections; each stored shape checked against config.json now."""
    layout = "qwen3_next" if p + "in_proj_qkvz.weight" in src.have else "qwen3_5_moe"
    r = {}
    for name, source in deltanet_sources(src.spec.deltanet, layout, src.spec.hidden_size).items():
        stored = [src.checked(src.find(p + tensor), shape) for tensor, shape in source.parts]

        def load(stored=stored, source=source) -> np.ndarray:
            return source.make(*map(src.ckpt.load, stored))

        r[g + name] = load, source.shape
    return r
