"""What every graph block needs: the op builder, the weights, and the compute dtype.

Weights are named canonically (``layers.3.qkv``, ``layers.3.moe.experts.5.down`` ...), spelled by
:mod:`moe_onnx.weight_names` for the blocks and the exporter alike, in ONNX layout, i.e.
``[in, out]`` for a MatMul; the exporter's family modules map checkpoint names onto these. See
:mod:`moe_onnx.graphs.decoder` for the full list.

A weight the source stores quantized (int8/int4 blocks, see :mod:`moe_onnx.quantize`) becomes
two initializers, ``name`` (integers) and ``name_scale``, and the blocks see
``DequantizeLinear(name, name_scale, axis, block_size)`` in its place: ONNX Runtime fuses that
with the MatMul that reads it into ``MatMulNBits``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx_ir as ir
import onnxscript

from moe_onnx.weight_names import scale


@dataclass(frozen=True)
class Blocked:
    """A weight stored as integers with one scale per ``block_size`` values along ``axis``."""

    axis: int
    block_size: int


class WeightSource(Protocol):
    """Gives the tensor behind a canonical weight name, lazily (shape and dtype known up front)."""

    def tensor(self, name: str) -> ir.TensorProtocol: ...

    def blocked(self, name: str) -> Blocked | None:
        """How ``name`` is quantized, or None when it is stored in the compute dtype."""
        ...


@dataclass
class GraphContext:
    """The builder state shared by the blocks of one graph."""

    builder: onnxscript.GraphBuilder
    weights: WeightSource
    dtype: ir.DataType  # compute and weight dtype (FLOAT, FLOAT16 or BFLOAT16)
    opset: int = 21  # the graph's default-domain opset: blocks use newer standard ops where it allows
    kv_dtype: ir.DataType | None = None  # the KV cache's storage dtype; None = the compute dtype
    _weights: dict[str, ir.Value] = field(default_factory=dict)
    _shared: dict[str, object] = field(default_factory=dict)
    # Inside an If branch: constants are the branch's own Constant nodes, not references to the
    # outer graph's initializers (onnxruntime's WebGPU EP was handed such an outer-scope index in
    # CPU memory inside a subgraph, and refused it).
    _local_constants: dict | None = None

    @property
    def op(self) -> onnxscript.OpBuilder:
        return self.builder.op

    def weight(self, name: str) -> ir.Value:
        """The weight ``name`` in the compute dtype: its initializer, or its dequantization."""
        if name not in self._weights:
            blocked = self.weights.blocked(name)
            if blocked is None:
                self._weights[name] = self._initializer(name)
            else:
                q, scale = self._quantized(name)
                self._weights[name] = self.op.DequantizeLinear(q, scale, axis=blocked.axis,
                                                               block_size=blocked.block_size)
        return self._weights[name]

    def rows(self, name: str, ids_BS: ir.Value) -> ir.Value:
        """``Gather`` of the rows ``ids_BS`` of the ``[V, H]`` table ``name`` (embeddings); a
        quantized table is gathered as integers and only those rows are dequantized: by
        ``Cast`` times each block's scale repeated, not a blocked DequantizeLinear, which OpenVINO
        converts only on a static X (the gathered rows are [B, S, H])."""
        op, blocked = self.op, self.weights.blocked(name)
        if blocked is None:
            return op.Gather(self.weight(name), ids_BS, axis=0)
        q, scale = self._quantized(name)
        rows_BSH, scale_BSb = op.Gather(q, ids_BS, axis=0), op.Gather(scale, ids_BS, axis=0)
        repeated = op.Expand(op.Unsqueeze(scale_BSb, self.const([-1])), self.const([1, blocked.block_size]))
        scale_BSH = op.Reshape(repeated, self.const([0, 0, -1]))  # [B, S, b * block]
        width = q.shape[1]
        if width % blocked.block_size:  # a partial last block: its repeats run past H
            scale_BSH = op.Slice(scale_BSH, self.const([0]), self.const([width]), self.const([-1]))
        return op.Mul(op.Cast(rows_BSH, to=scale.dtype), scale_BSH)

    def is_blocked(self, name: str) -> bool:
        return self.weights.blocked(name) is not None

    def _quantized(self, name: str) -> tuple[ir.Value, ir.Value]:
        """The integer initializer of a quantized weight and its scales."""
        return self._initializer(name), self._initializer(scale(name))

    def _initializer(self, name: str) -> ir.Value:
        return self.builder.initializer(self.weights.tensor(name), name=name, qualify=False)

    def shared(self, key: str, make):
        """A value computed once per graph and reused by every layer (e.g. token-count ranges)."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def const(self, values, dtype: ir.DataType = ir.DataType.INT64) -> ir.Value:
        """A small constant (shape vectors, axes, scalars)."""
        if self._local_constants is None:
            return self.builder._get_or_create_constant(values, dtype)  # noqa: SLF001
        key = (repr(values), dtype)
        if key not in self._local_constants:
            array = np.asarray(values, dtype=dtype.numpy())
            self._local_constants[key] = self.op.Constant(value=ir.tensor(array))
        return self._local_constants[key]

    def to_float(self, x: ir.Value) -> ir.Value:
        """Cast to float32 where the compute dtype is narrower (norms, softmax)."""
        if self.dtype == ir.DataType.FLOAT:
            return x
        return self.op.Cast(x, to=ir.DataType.FLOAT)

    @property
    def kv(self) -> ir.DataType:
        return self.kv_dtype or self.dtype

    def to_kv(self, x: ir.Value) -> ir.Value:
        """Cast compute-dtype K/V to the cache's storage dtype (a no-op when they agree)."""
        return x if self.kv == self.dtype else self.op.Cast(x, to=self.kv)

    def from_kv(self, x: ir.Value) -> ir.Value:
        return x if self.kv == self.dtype else self.op.Cast(x, to=self.dtype)

    def from_float(self, x: ir.Value) -> ir.Value:
        if self.dtype == ir.DataType.FLOAT:
            return x
        return self.op.Cast(x, to=self.dtype)


def branches(ctx: GraphContext, cond: ir.Value, then_fn: Callable[[GraphContext], list[ir.Value]],
             else_fn: Callable[[GraphContext], list[ir.Value]], name: str, outputs: int) -> list[ir.Value]:
    """An ONNX ``If`` on the boolean scalar ``cond``: each branch built by its function from a
    context on the branch's own graph, reading the outer graph's values and weights (outer-scope
    references, so a weight is stored once), its values named under ``name``."""

    def branch(build: Callable[[GraphContext], list[ir.Value]], tag: str) -> ir.Graph:
        def trace(op) -> list[ir.Value]:
            return list(build(dataclasses.replace(ctx, builder=op.builder, _shared={}, _local_constants={})))

        declared = [ir.Value(name=f"{name}.{tag}.{i}") for i in range(outputs)]
        ctx.builder.push_module(f"{name}.{tag}")
        try:
            return ctx.builder.subgraph(trace, [], declared, name=f"{name}.{tag}")
        finally:
            ctx.builder.pop_module()

    return list(ctx.op.If(cond, then_branch=branch(then_fn, "then"), else_branch=branch(else_fn, "else"),
                          _outputs=outputs))
