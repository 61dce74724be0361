"""Symmetric block-wise weight quantization (int8, int4), numpy only.

A weight is cut into blocks of ``block_size`` consecutive values along its *input* axis (the
axis a MatMul reduces over: rows of an ONNX ``[in, out]`` weight, columns of a torch Linear
``[out, in]`` or an embedding ``[V, H]``); each block has one float32 scale and no zero point:
``w ≈ q * scale`` with ``q`` in ``[-2^(b-1), 2^(b-1) - 1]``. This is exactly what ONNX's blocked
``DequantizeLinear(q, scale, axis, block_size)`` computes, and ONNX Runtime fuses that pattern
followed by a MatMul into its ``MatMulNBits`` kernel. An axis that is not a multiple of the block
gets a partial last block (ONNX's scale has ``ceil(K / block_size)`` rows).

Scales: ``rtn`` (round to nearest) takes ``max|w| / qmax`` per block; ``search`` also tries
smaller scales (clipping the largest values) and keeps, per block, the one with the least
squared error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from moe_onnx.errors import MoeOnnxError

BLOCK_SIZES = (16, 32, 64, 128, 256)
# ONNX Runtime session config: MatMulNBits in float32 arithmetic. Its default (level 4 on CPU)
# quantizes activations to int8 per block, as llama.cpp does: faster, ~1e-3 relative error.
FLOAT32_MATMULNBITS = ("session.qdq_matmulnbits_accuracy_level", "1")
# com.microsoft.QMoE takes its activation precision from its own accuracy_level attribute, not
# from that session config; int8 experts quantize activations at every level. This environment
# variable, read when a session is made, makes its CPU kernel compute in float32 (onnxruntime
# 1.31: moe_quantization_cpu.cc).
QMOE_FLOAT32_ENV = ("ORT_QMOE_CPU_QNBIT_GEMM", "fp32")


@contextlib.contextmanager
def float32_kernels(options):
    """Sessions made inside, with these onnxruntime ``options``, run quantized weights in float32
    arithmetic (MatMulNBits and QMoE): for checks of the graph against dequantized references."""
    options.add_session_config_entry(*FLOAT32_MATMULNBITS)
    name, value = QMOE_FLOAT32_ENV
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield options
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
METHODS = ("rtn", "search")
_CHUNK = 1 << 22  # values quantized per pass (bounds the float32 temporaries to ~16 MB each)
_SEARCH = np.linspace(0.80, 1.0, 11, dtype=np.float32)  # candidate fractions of the rtn scale


@dataclass(frozen=True)
class QuantConfig:
    """How weights are quantized: ``bits`` (8 or 4), ``block_size``, scale ``method``."""

    bits: int
    block_size: int = 32
    method: str = "rtn"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise MoeOnnxError(f"unsupported weight bits {self.bits}; choose 8 or 4")
        if self.block_size not in BLOCK_SIZES:
            raise MoeOnnxError(f"unsupported block size {self.block_size}; choose one of "
                               f"{', '.join(map(str, BLOCK_SIZES))}")
        if self.method not in METHODS:
            raise MoeOnnxError(f"unknown scale method {self.method!r}; choose {' or '.join(METHODS)}")

    def for_gathered_table(self) -> QuantConfig:
        """The quantization of a table rows are gathered from (the embeddings): int8 in an int4
        export, since ONNX's Gather takes no int4 (and only one row per token is read)."""
        return dataclasses.replace(self, bits=8) if self.bits == 4 else self

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


def quantize(w: np.ndarray, cfg: QuantConfig, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(q int8 array shaped like w, scale float32)``; ``scale`` has ``ceil(K / block)`` along ``axis``.

    ``w`` may be float16/bfloat16/float32. The work runs over column chunks of about
    ``_CHUNK`` values, so its float32 temporaries stay small next to the tensor itself.
    """
    if w.ndim < 2:
        raise MoeOnnxError(f"cannot quantize a {w.ndim}-D tensor of shape {list(w.shape)}: "
                           "block-wise quantization needs a matrix")
    moved = np.moveaxis(w, axis, 0)
    K, rest = moved.shape[0], moved.shape[1:]
    cols = moved.reshape(K, -1)
    R, B = cols.shape[1], cfg.block_size
    nb = -(-K // B)
    q = np.empty((K, R), np.int8)
    scale = np.empty((nb, R), np.float32)
    step = max(1, _CHUNK // max(K, 1))
    for c in range(0, R, step):
        q[:, c:c + step], scale[:, c:c + step] = _quantize_columns(cols[:, c:c + step], cfg, nb)
    q, scale = q.reshape(K, *rest), scale.reshape(nb, *rest)
    return np.moveaxis(q, 0, axis), np.moveaxis(scale, 0, axis)


def _quantize_columns(cols_KR: np.ndarray, cfg: QuantConfig, nb: int) -> tuple[np.ndarray, np.ndarray]:
    K, B = cols_KR.shape[0], cfg.block_size
    padded = np.zeros((nb * B, cols_KR.shape[1]), np.float32)
    padded[:K] = cols_KR
    blocks = padded.reshape(nb, B, -1)
    scale = _scales(blocks, np.abs(blocks).max(axis=1), cfg)
    safe = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(blocks / safe[:, None]), cfg.qmin, cfg.qmax).astype(np.int8)
    return q.reshape(nb * B, -1)[:K], scale.astype(np.float32)


def dequantize(q: np.ndarray, scale: np.ndarray, block_size: int, axis: int = 0) -> np.ndarray:
    """``q * scale`` with each scale repeated over its block (the last block may be partial)."""
    K = q.shape[axis]
    repeated = np.repeat(scale.astype(np.float32), block_size, axis=axis)
    return q.astype(np.float32) * np.take(repeated, np.arange(K), axis=axis)


def _scales(blocks: np.ndarray, amax: np.ndarray, cfg: QuantConfig) -> np.ndarray:
    rtn = amax / np.float32(cfg.qmax)
    if cfg.method == "rtn":
        return rtn
    best, best_err = rtn, None
    for f in _SEARCH:
        s = rtn * f
        safe = np.where(s == 0, 1.0, s)[:, None]
        err = ((np.clip(np.rint(blocks / safe), cfg.qmin, cfg.qmax) * safe - blocks) ** 2).sum(axis=1)
        if best_err is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = np.where(better, s, best), np.where(better, err, best_err)
    return best
