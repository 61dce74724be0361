"""What every graph block needs: the op builder, the weights, and the compute dtype.

Weights are named canonically (``layers.3.qkv``, ``layers.3.moe.experts.5.down`` ...) in ONNX
layout, i.e. ``[in, out]`` for a MatMul; the exporter's architecture modules map checkpoint
names onto these. See :mod:`moe_onnx.graphs.decoder` for the full list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import onnx_ir as ir
import onnxscript


class WeightSource(Protocol):
    """Gives the tensor behind a canonical weight name, lazily (shape and dtype known up front)."""

    def tensor(self, name: str) -> ir.TensorProtocol: ...


@dataclass
class GraphContext:
    """The builder state shared by the blocks of one graph."""

    builder: onnxscript.GraphBuilder
    weights: WeightSource
    dtype: ir.DataType  # compute and weight dtype (FLOAT, FLOAT16 or BFLOAT16)
    _weights: dict[str, ir.Value] = field(default_factory=dict)
    _shared: dict[str, object] = field(default_factory=dict)

    @property
    def op(self) -> onnxscript.OpBuilder:
        return self.builder.op

    def weight(self, name: str) -> ir.Value:
        """The initializer for a canonical weight name, registered once."""
        if name not in self._weights:
            tensor = self.weights.tensor(name)
            self._weights[name] = self.builder.initializer(tensor, name=name, qualify=False)
        return self._weights[name]

    def shared(self, key: str, make):
        """A value computed once per graph and reused by every layer (e.g. token-count ranges)."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def const(self, values, dtype: ir.DataType = ir.DataType.INT64) -> ir.Value:
        """A small constant (shape vectors, axes, scalars)."""
        return self.builder._get_or_create_constant(values, dtype)  # noqa: SLF001

    def to_float(self, x: ir.Value) -> ir.Value:
        """Cast to float32 where the compute dtype is narrower (norms, softmax)."""
        if self.dtype == ir.DataType.FLOAT:
            return x
        return self.op.Cast(x, to=ir.DataType.FLOAT)

    def from_float(self, x: ir.Value) -> ir.Value:
        if self.dtype == ir.DataType.FLOAT:
            return x
        return self.op.Cast(x, to=self.dtype)
