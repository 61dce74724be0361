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

from dataclasses import dataclass

import numpy as np

from moe_onnx.errors import MoeOnnxError

BLOCK_SIZES = (16, 32, 64, 128, 256)
# ONNX Runtime session config: MatMulNBits in float32 arithmetic. Its default (level 4 on CPU)
# quantizes activations to int8 per block, as llama.cpp does: faster, ~1e-3 relative error.
FLOAT32_MATMULNBITS = ("session.qdq_matmulnbits_accuracy_level", "1")
METHODS = ("rtn", "search")
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

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


def quantize(w: np.ndarray, cfg: QuantConfig, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(q int8 array shaped like w, scale float32)``; ``scale`` has ``ceil(K / block)`` along ``axis``.

    ``w`` may be float16/bfloat16/float32; the arithmetic is float32 one block row at a time
    through numpy's vectorised ops (no float64 copy of the whole tensor).
    """
    if w.ndim < 2:
        raise MoeOnnxError(f"cannot quantize a {w.ndim}-D tensor of shape {list(w.shape)}: "
                           "block-wise quantization needs a matrix")
    moved = np.moveaxis(np.asarray(w, dtype=np.float32), axis, 0)
    K, rest = moved.shape[0], moved.shape[1:]
    B = cfg.block_size
    nb = -(-K // B)
    padded = np.zeros((nb * B, *rest), np.float32)
    padded[:K] = moved
    blocks = padded.reshape(nb, B, *rest)
    amax = np.abs(blocks).max(axis=1)
    scale = _scales(blocks, amax, cfg)
    safe = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(blocks / safe[:, None]), cfg.qmin, cfg.qmax).astype(np.int8)
    q = q.reshape(nb * B, *rest)[:K]
    return np.moveaxis(q, 0, axis), np.moveaxis(scale.astype(np.float32), 0, axis)


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
