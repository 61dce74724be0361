"""The one table of element types: every dtype the project writes, feeds or reads is a row here.

A row says how one element type is named on the command line and in the manifest, what numpy,
ONNX and ONNX Runtime call it, how wide it is, and what it is allowed to be used for:
``compute`` (activations, KV cache, ``--dtype``), ``weight`` (how weights are stored). A weight
format that differs from the compute dtype (int8 or int4 weights under fp32/fp16 activations) is
one new row with ``weight=True, compute=False``. numpy (ml_dtypes on demand) only: the runtime uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_onnx.errors import MoeOnnxError

_ML_DTYPES = {"bfloat16", "int4"}  # numpy has no such types: ml_dtypes defines them


@dataclass(frozen=True)
class DType:
    """One element type and what each library calls it."""

    name: str  # on the command line and in the manifest
    numpy_name: str  # the numpy (or, for bf16 and int4, ml_dtypes) scalar type's name
    onnx: int  # onnx.TensorProto element type (== onnx_ir.DataType value)
    ort: str  # onnxruntime's type string for inputs and outputs
    bits: int
    compute: bool  # allowed as --dtype: activations, KV cache, norms' inputs
    weight: bool  # allowed as a weight storage format
    cpu: bool = True  # onnxruntime's CPU provider has kernels for it
    tolerance: float = 0.0  # --verify: max relative logits error against PyTorch (compute dtypes)

    @property
    def bytes(self) -> float:
        return self.bits / 8

    @property
    def numpy(self) -> type:
        """The numpy scalar type. ml_dtypes is imported only when a row needs it: its import takes
        0.6 s here, a third of what ``moe-onnx run`` spends before onnxruntime starts."""
        if self.numpy_name not in _ML_DTYPES:
            return getattr(np, self.numpy_name)
        import ml_dtypes

        return getattr(ml_dtypes, self.numpy_name)

    @property
    def max_finite(self) -> float:
        import ml_dtypes

        info = ml_dtypes.finfo(self.numpy) if self.is_float else ml_dtypes.iinfo(self.numpy)
        return float(info.max)

    @property
    def is_float(self) -> bool:
        return self.compute  # every compute dtype is a float; the integer rows are weight formats


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("fp32", "float32", 1, "tensor(float)", 32, compute=True, weight=True, tolerance=1e-4),
        DType("fp16", "float16", 10, "tensor(float16)", 16, compute=True, weight=True, tolerance=2e-2),
        DType("bf16", "bfloat16", 16, "tensor(bfloat16)", 16, compute=True, weight=True,
              cpu=False, tolerance=8e-2),
        # Weight-only formats: block-wise symmetric integers with a float scale per block
        # (moe_onnx.quantize), dequantized in the graph by DequantizeLinear.
        DType("int8", "int8", 3, "tensor(int8)", 8, compute=False, weight=True),
        DType("int4", "int4", 22, "tensor(int4)", 4, compute=False, weight=True),
    )
}
COMPUTE_DTYPES: tuple[str, ...] = tuple(n for n, d in DTYPES.items() if d.compute)
WEIGHT_DTYPES: tuple[str, ...] = tuple(n for n, d in DTYPES.items() if d.weight)
QUANTIZED_DTYPES: tuple[str, ...] = tuple(n for n, d in DTYPES.items() if d.weight and not d.compute)


def get(name: str, role: str = "compute") -> DType:
    """The row for ``name``, checked for ``role`` (``compute`` or ``weight``); a clear error otherwise."""
    allowed = COMPUTE_DTYPES if role == "compute" else WEIGHT_DTYPES
    if name not in allowed:
        raise MoeOnnxError(f"unknown {role} dtype {name!r}; choose one of {', '.join(allowed)}")
    return DTYPES[name]


def integer(bits: int) -> DType:
    """The quantized weight format of ``bits`` bits."""
    return next(DTYPES[n] for n in QUANTIZED_DTYPES if DTYPES[n].bits == bits)


def by_ort(type_string: str) -> DType:
    """The row for an onnxruntime type string such as ``tensor(float16)``."""
    for d in DTYPES.values():
        if d.ort == type_string:
            return d
    raise MoeOnnxError(f"onnxruntime type {type_string!r} is not a moe-onnx dtype")
