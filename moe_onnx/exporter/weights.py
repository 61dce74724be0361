"""Graph weights from checkpoint tensors, in the compute dtype or block-quantized — lazily.

:class:`CheckpointWeights` is the graph's :class:`moe_onnx.graphs.context.WeightSource` over a
checkpoint: every weight the spec implies is mapped once, when it is made
(:func:`moe_onnx.exporter.weight_map.weight_map`: a missing tensor or a shape that disagrees with
``config.json`` is reported before anything is written); data is read only when the graph's
tensor is serialised, one at a time, and cast to the compute dtype.

With a :class:`QuantConfig` every matrix a MatMul or Gather reads (attention, dense MLP, each
expert, shared experts, embeddings, lm_head) is stored block-quantized along its input axis; the
router, the shared-expert gate, norms and biases stay in the compute dtype. The embedding table
of an int4 export is int8: ONNX's Gather takes no int4 (and only one row per token is read);
so is a tied lm_head, which must match the one PyTorch tensor it shares with the embeddings.
Each weight is quantized when it is serialised, its small scale kept until the scale is written.
A feed-forward width that is not a multiple of the block is padded to one with zeros (see
:func:`_whole_blocks`): OpenVINO converts no blocked DequantizeLinear with a partial last block.

A quantized MoE layer also offers its experts in the layout of ONNX Runtime's ``com.microsoft.QMoE``
(the ``fused`` impl): ``moe.qfc1`` / ``moe.qfc2`` and their ``_scale``, quantized by the very call
that quantizes ``experts.{e}.gate_up`` / ``experts.{e}.down`` for ``dispatch``, so both graphs hold
the same integers and scales, only rearranged (see :func:`_qmoe_expert`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moe_onnx import dtypes
from moe_onnx import weight_names as wn
from moe_onnx.errors import ExportError
from moe_onnx.exporter.checkpoint import Checkpoint
from moe_onnx.exporter.expert_recipes import interleaved_rows
from moe_onnx.exporter.family import Names
from moe_onnx.exporter.recipes import Recipe
from moe_onnx.exporter.weight_map import weight_map
from moe_onnx.graphs.context import Blocked
from moe_onnx.quantize import QuantConfig, quantize
from moe_onnx.spec import ModelSpec


class CheckpointWeights:
    """A :class:`moe_onnx.graphs.context.WeightSource` over a checkpoint."""

    def __init__(self, ckpt: Checkpoint, spec: ModelSpec, names: Names, dtype: str = "fp32",
                 quant: QuantConfig | None = None):
        self.spec, self.quant = spec, quant
        self.dtype = dtypes.get(dtype)
        self._scales: dict[str, np.ndarray] = {}  # quantized weight -> its scales, until written
        self.recipes: dict[str, Recipe] = weight_map(ckpt, spec, names, quantized=quant is not None)
        if quant:
            self.recipes = _whole_blocks(self.recipes, quant.block_size)
        self.axes = {n: a for n in self.recipes if (a := _quant_axis(n)) is not None} if quant else {}
        self._qmoe = self._qmoe_layouts() if quant else {}  # QMoE weight -> (expert weights, F or 0)

    def _qmoe_layouts(self) -> dict[str, tuple[list[str], int]]:
        """Each MoE layer's quantized experts as com.microsoft.QMoE's ``qfc1`` / ``qfc2``."""
        s, out = self.spec, {}
        for i in range(s.num_layers):
            if s.is_moe_layer(i):
                g, E = wn.moe(i), s.moe.num_experts
                out[g + wn.QFC1] = ([wn.expert(g, e) + wn.GATE_UP for e in range(E)], s.moe.expert_size)
                out[g + wn.QFC2] = ([wn.expert(g, e) + wn.DOWN for e in range(E)], 0)
        return out

    def blocked(self, name: str) -> Blocked | None:
        axis = self.axes.get(name)
        return None if axis is None else Blocked(axis, self.quant.block_size)

    def tensor(self, name: str) -> ir.TensorProtocol:
        base = name.removesuffix(wn.SCALE_SUFFIX)
        if base in self._qmoe:
            return self._qmoe_tensor(base, scale=name != base)
        if base in self.axes:
            return self._scale_tensor(base) if name != base else self._quantized_tensor(name)
        loader, shape = self._recipe(name)
        row = self.dtype

        def load() -> ir.TensorProtocol:
            return ir.tensor(np.ascontiguousarray(_cast(loader(), row, name)), name=name)

        return ir.LazyTensor(load, dtype=ir.DataType(row.onnx), shape=ir.Shape(shape), name=name)

    def _recipe(self, name: str) -> Recipe:
        try:
            return self.recipes[name]
        except KeyError:
            raise ExportError(f"the graph asked for weight {name!r}, which the spec does not have") from None

    def config(self, name: str) -> QuantConfig:
        """The quantization of ``name`` (a quantized weight)."""
        tied_head = name == wn.LM_HEAD and self.spec.tie_word_embeddings  # one tensor, one format
        return self.quant.for_gathered_table() if name == wn.EMBED or tied_head else self.quant

    def _quantize(self, name: str) -> np.ndarray:
        q, scale = quantize(self.recipes[name][0](), self.config(name), self.axes[name])
        self._scales[name] = scale
        return q

    def _quantized_tensor(self, name: str) -> ir.TensorProtocol:
        row = dtypes.integer(self.config(name).bits)

        def load() -> ir.TensorProtocol:
            return ir.tensor(np.ascontiguousarray(self._quantize(name).astype(row.numpy)), name=name)

        shape = self.recipes[name][1]
        return ir.LazyTensor(load, dtype=ir.DataType(row.onnx), shape=ir.Shape(shape), name=name)

    def _scale_tensor(self, base: str) -> ir.TensorProtocol:
        shape = list(self.recipes[base][1])
        axis = self.axes[base]
        shape[axis] = -(-shape[axis] // self.quant.block_size)
        row, name = self.dtype, wn.scale(base)

        def load() -> ir.TensorProtocol:
            if base not in self._scales:  # written before its weight: quantize (again) for it
                self._quantize(base)
            return ir.tensor(np.ascontiguousarray(_cast(self._scales.pop(base), row, name)), name=name)

        return ir.LazyTensor(load, dtype=ir.DataType(row.onnx), shape=ir.Shape(tuple(shape)), name=name)

    def _qmoe_tensor(self, base: str, scale: bool) -> ir.TensorProtocol:
        """``qfc1`` [E, 2F, H*bits/8] uint8 / ``qfc2`` [E, H, F*bits/8], or their scales
        [E, N, ceil(K/block)], in com.microsoft.QMoE's layout (see :func:`_qmoe_expert`)."""
        experts, F = self._qmoe[base]
        cfg = self.config(experts[0])
        K, N = self.recipes[experts[0]][1]  # a MatMul operand [in, out]
        name = wn.scale(base) if scale else base

        def expert(e: int) -> tuple[np.ndarray, np.ndarray]:
            w = experts[e]
            return _qmoe_expert(*quantize(self.recipes[w][0](), cfg, self.axes[w]), cfg.bits, F)

        def load_weights() -> ir.TensorProtocol:
            out = np.empty((len(experts), N, -(-K * cfg.bits // 8)), np.uint8)
            scales = np.empty((len(experts), N, -(-K // cfg.block_size)), np.float32)
            for e in range(len(experts)):  # one expert's float copy at a time
                out[e], scales[e] = expert(e)
            self._scales[base] = scales
            return ir.tensor(out, name=name)

        def load_scales() -> ir.TensorProtocol:
            if base not in self._scales:  # written before its weights: quantize (again) for it
                self._scales[base] = np.stack([expert(e)[1] for e in range(len(experts))])
            return ir.tensor(np.ascontiguousarray(_cast(self._scales.pop(base), self.dtype, name)), name=name)

        if scale:
            shape, dtype = (len(experts), N, -(-K // cfg.block_size)), ir.DataType(self.dtype.onnx)
            return ir.LazyTensor(load_scales, dtype=dtype, shape=ir.Shape(shape), name=name)
        shape = (len(experts), N, -(-K * cfg.bits // 8))
        return ir.LazyTensor(load_weights, dtype=ir.DataType.UINT8, shape=ir.Shape(shape), name=name)


_MATMUL_WEIGHTS = (wn.QKV, wn.O_PROJ, wn.GATE_UP, wn.DOWN, wn.LM_HEAD,  # [in, out]: blocks along axis 0
                   wn.Q_PROJ, wn.Q_A, wn.Q_B, wn.KV_A,  # MLA's
                   wn.IN_PROJ, wn.OUT_PROJ)  # recurrent mixers'

# MLA's halves of kv_b_proj, [N, Dn, L] and [N, L, Dv]: blocks along L, the checkpoint Linear's input
# (k_up's output axis: the queries are multiplied into the latent's space).
_HEAD_WEIGHTS = {wn.K_UP: 2, wn.V_UP: 1}


def _quant_axis(name: str) -> int | None:
    """The input axis of a weight that is quantized, or None for one that stays in float."""
    if name == wn.EMBED:
        return 1  # [V, H]: rows are gathered, blocks run along H
    tail = name.rsplit(".", 1)[-1]
    if tail in _HEAD_WEIGHTS:
        return _HEAD_WEIGHTS[tail]
    if tail not in _MATMUL_WEIGHTS:
        return None  # router, shared-expert gate, norms, biases, the fused op's fc1/fc2
    return 1 if wn.is_stacked_experts(name) else 0  # stacked [E, in, out] for gather / dense


_EXPERTS = wn.expert("", 0).removesuffix("0.")  # "experts.": what follows an MoE block's prefix


def _whole_blocks(recipes: dict[str, Recipe], block: int) -> dict[str, Recipe]:
    """``recipes`` with each feed-forward width F (dense, experts, shared expert) that is not a
    multiple of ``block`` padded to the next one: ``down`` [F, H] gets zero rows, ``gate_up``
    [H, 2F] and its bias zero columns at the end of each half. The padded units compute
    ``act(0) * 0 = 0`` (gpt_oss's clamped, shifted SwiGLU too: ``0 * sigmoid(0) * (0 + 1)``), so the
    logits do not change, and every blocked DequantizeLinear reads whole blocks. ONNX Runtime's
    MatMulNBits stores a partial block padded anyway."""
    out = dict(recipes)
    for down, (_, shape) in recipes.items():
        axis = _quant_axis(down)
        if not down.endswith("." + wn.DOWN) or shape[axis] % block == 0:
            continue
        width = shape[axis] + (-shape[axis] % block)
        out[down] = _padded(recipes[down], axis, width)
        prefix = down.removesuffix(wn.DOWN)
        block_prefix = prefix.partition(_EXPERTS)[0]  # an expert's gate_up bias is its block's [E, 2F]
        for name in (prefix + wn.GATE_UP, wn.bias(prefix + wn.GATE_UP), wn.bias(block_prefix + wn.GATE_UP)):
            if name in recipes and out[name] is recipes[name]:
                out[name] = _padded(recipes[name], -1, width, halves=True)
    return out


def _padded(recipe: Recipe, axis: int, width: int, halves: bool = False) -> Recipe:
    """``recipe`` with zeros appended along ``axis`` up to ``width`` (``halves``: to each half)."""
    load, shape = recipe
    parts = 2 if halves else 1

    def padded() -> np.ndarray:
        x = load()
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, width - x.shape[axis] // parts)
        return np.concatenate([np.pad(p, pad) for p in np.split(x, parts, axis=axis)], axis=axis)

    new_shape = list(shape)
    new_shape[axis] = parts * width
    return padded, tuple(new_shape)


def _cast(array: np.ndarray, row: dtypes.DType, name: str) -> np.ndarray:
    """``array`` in ``row``'s type; a finite value beyond its range is an error, never a silent inf."""
    with np.errstate(over="ignore"):
        out = array.astype(row.numpy, copy=False)
    if out.dtype != array.dtype and array.dtype.kind == "f" and row.bits < 32:
        overflow = np.isinf(out) & np.isfinite(array)
        if overflow.any():
            worst = float(np.abs(array[overflow]).max())
            raise ExportError(
                f"weight {name!r} holds {int(overflow.sum())} values beyond the {row.name} range "
                f"(largest |x| = {worst:.4g} > {row.max_finite:.4g}); export with --dtype fp32 or bf16"
            )
    return out


def _qmoe_expert(q: np.ndarray, scale: np.ndarray, bits: int, F: int) -> tuple[np.ndarray, np.ndarray]:
    """One expert's quantized MatMul operand ``q`` [K, N] (blocks along K, ``scale``
    [ceil(K/block), N]) in com.microsoft.QMoE's layout: ``([N, K*bits/8] uint8, [N, ceil(K/block)])``.

    Each output row holds its K inputs consecutively (``gate_up``'s rows interleaved gate/up when
    ``F``, as ``swiglu_fusion=1`` reads them); values are stored unsigned, ``q + 2^(bits-1)``, which
    is the op's implicit zero point when no zero points are given, so ``(u - 2^(bits-1)) * scale``
    is exactly ``q * scale``; int4 packs two per byte, the even K index in the low nibble.
    """
    rows = interleaved_rows if F else (lambda a, _: a.T)
    u = (rows(q, F).astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    if bits == 4:
        if u.shape[1] % 2:
            u = np.pad(u, ((0, 0), (0, 1)), constant_values=8)
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    return np.ascontiguousarray(u), np.ascontiguousarray(rows(scale, F))
