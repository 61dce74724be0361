"""``ExportOptions``: how a checkpoint is exported, one frozen value checked in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moe_onnx import dtypes
from moe_onnx.errors import ExportError
from moe_onnx.graphs.decoder import KV_CACHES, DecoderOptions
from moe_onnx.graphs.moe import DEFAULT_MOE_IMPL, MOE_IMPLS
from moe_onnx.quantize import QuantConfig


@dataclass(frozen=True)
class ExportOptions:
    """The options of :func:`moe_onnx.exporter.export`.

    ``dtype`` is the compute dtype (activations, KV cache); ``weights`` the storage of the
    weights: the compute dtype (None, the default) or ``int8``/``int4``, block-wise symmetric
    with one scale per ``block_size`` values, scales by ``quant_method`` (``rtn`` or ``search``;
    see :mod:`moe_onnx.quantize`). ``moe_impl`` is ``auto`` (the default sparse dispatch) or one
    of :data:`moe_onnx.graphs.moe.MOE_IMPLS`. ``kv_cache`` is ``concat`` (the default contract) or
    ``static`` (a preallocated buffer updated in place; opset 24; see :mod:`moe_onnx.contract`).
    ``kv_dtype`` stores that cache narrower than ``dtype`` (``fp16`` under ``fp32``: half its bytes
    and memory).

    ``verify`` runs the source model in PyTorch beside the export in ONNX Runtime and fails the
    export if the logits differ beyond the dtype's tolerance; ``verify_text`` (a text file) also
    prints both perplexities on it. ``force`` replaces a non-empty ``out``. ``progress`` shows the
    weights being written on stderr (tensors, bytes, rate, ETA); None: only when stderr is a
    terminal.
    """

    dtype: str = "fp32"
    weights: str | None = None
    block_size: int = 32
    quant_method: str = "rtn"
    moe_impl: str = "auto"
    kv_cache: str = "concat"
    kv_dtype: str | None = None
    verify: bool = False
    verify_text: str | Path | None = None
    force: bool = False
    progress: bool | None = None

    def quant(self) -> QuantConfig | None:
        """None when the weights stay in the compute dtype; a clear error for anything unknown."""
        dtypes.get(self.dtype)
        if self.weights is None or self.weights == self.dtype:
            return None
        if self.weights not in dtypes.QUANTIZED_DTYPES:
            raise ExportError(f"--weights {self.weights}: choose {', '.join(dtypes.QUANTIZED_DTYPES)}, "
                              f"or the compute dtype ({self.dtype})")
        if self.dtype == "bf16":
            raise ExportError("--weights int8/int4 with --dtype bf16 is not supported: ONNX Runtime has no "
                              "bfloat16 MatMulNBits kernel; use --dtype fp32 (CPU) or fp16 (CUDA)")
        return QuantConfig(dtypes.DTYPES[self.weights].bits, self.block_size, self.quant_method)

    def decoder(self) -> DecoderOptions:
        """The graph's options, ``auto`` resolved and the cache's dtype checked."""
        impl = DEFAULT_MOE_IMPL if self.moe_impl == "auto" else self.moe_impl
        if impl not in MOE_IMPLS:
            raise ExportError(f"unknown moe impl {self.moe_impl!r}; choose auto or one of "
                              f"{', '.join(MOE_IMPLS)}")
        if self.kv_cache not in KV_CACHES:
            raise ExportError(f"unknown kv cache {self.kv_cache!r}; choose one of {', '.join(KV_CACHES)}")
        return DecoderOptions(self.dtype, impl, self.kv_cache, self._kv_dtype())

    def _kv_dtype(self) -> str | None:
        """None when the cache keeps the compute dtype; else a narrower compute dtype with CPU kernels."""
        if self.kv_dtype is None or self.kv_dtype == self.dtype:
            return None
        name = self.kv_dtype
        kv, compute = dtypes.get(name), dtypes.get(self.dtype)
        if kv.bits >= compute.bits:
            raise ExportError(f"--kv-dtype {name} with --dtype {self.dtype}: the cache's dtype must be "
                              "narrower than the compute dtype (fp16 under fp32)")
        if not kv.cpu:
            raise ExportError(f"--kv-dtype {name} is not supported: ONNX Runtime's CPU provider has no "
                              f"{name} kernels for the cache's ops; use fp16")
        return name
