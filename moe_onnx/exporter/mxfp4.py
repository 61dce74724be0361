"""MXFP4 checkpoints (gpt-oss's hub format), read dequantized one expert at a time.

A tensor ``X`` is stored as ``X_blocks``, uint8 ``[..., R, G, 16]``: R output rows, each of G
blocks of 32 FP4 (E2M1) values, two per byte, the even index in the low nibble; and ``X_scales``,
uint8 ``[..., R, G]``: one E8M0 exponent per block, biased by 127. The value is
``FP4[nibble] * 2^(scale - 127)``. :class:`Mxfp4Checkpoint` shows ``X`` in place of the pair, as
transformers' ``Mxfp4Dequantize`` (``convert_moe_packed_tensors``) gives it: float32
``[..., G*32, R]`` (input axis first, as gpt-oss holds its experts). ``load_index`` reads and
dequantizes one expert's blocks and scales only, so no float copy of a whole layer, let alone the
model, is ever made for the ``dispatch`` graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_onnx.errors import CheckpointError
from moe_onnx.exporter.checkpoint import Checkpoint
from moe_onnx.exporter.config import Config

FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
BLOCK = 32  # values per scale
_BYTES = BLOCK // 2


def dequantizing(cfg: Config, ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` read through :class:`Mxfp4Checkpoint` when ``config.json`` says MXFP4
    (``quantization_config.quant_method``), else as it is."""
    packed = any(n.endswith(("_blocks", "_scales")) for n in ckpt.names())
    return Mxfp4Checkpoint(ckpt) if is_mxfp4(cfg) and packed else ckpt


def is_mxfp4(cfg: Config) -> bool:
    """Whether ``config.json`` declares MXFP4 weights."""
    quantization = cfg.get("quantization_config")
    return isinstance(quantization, dict) and quantization.get("quant_method") == "mxfp4"


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """uint8 ``[..., R, G, 16]`` blocks and ``[..., R, G]`` scales -> float32 ``[..., R, G*32]``."""
    values = np.empty((*blocks.shape[:-1], BLOCK), np.float32)
    values[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    values[..., 1::2] = FP4_VALUES[blocks >> 4]
    exponents = scales.astype(np.int32) - 127
    return np.ldexp(values, exponents[..., None]).reshape(*blocks.shape[:-2], -1)


class Mxfp4Checkpoint:
    """A :class:`Checkpoint` whose ``X_blocks`` / ``X_scales`` pairs read as the float tensor ``X``;
    other tensors pass through. Pairs that disagree with each other are named when it is made."""

    def __init__(self, inner: Checkpoint):
        self.inner = inner
        stored = inner.names()
        self._packed: dict[str, tuple[str, str]] = {}  # X -> (X_blocks, X_scales)
        for blocks in sorted(n for n in stored if n.endswith("_blocks")):
            base = blocks.removesuffix("_blocks")
            scales = base + "_scales"
            if scales not in stored:
                raise CheckpointError(f"MXFP4 tensor {blocks!r} has no scales: {scales!r} is missing")
            b, s = inner.shape(blocks), inner.shape(scales)
            if len(b) < 3 or b[-1] != _BYTES or tuple(b[:-1]) != tuple(s):
                raise CheckpointError(
                    f"MXFP4 tensor {blocks!r} has shape {list(b)} and its scales {scales!r} {list(s)}; "
                    f"expected [..., rows, blocks, {_BYTES}] and [..., rows, blocks]")
            self._packed[base] = (blocks, scales)
        for scales in sorted(n for n in stored if n.endswith("_scales")):
            if scales.removesuffix("_scales") not in self._packed:
                raise CheckpointError(f"MXFP4 scales {scales!r} have no blocks: "
                                      f"{scales.removesuffix('_scales') + '_blocks'!r} is missing")
        hidden = {n for pair in self._packed.values() for n in pair}
        self._names = (stored - hidden) | set(self._packed)

    def names(self) -> set[str]:
        return set(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._packed:
            return self.inner.shape(name)
        *prefix, rows, groups, _ = self.inner.shape(self._packed[name][0])
        return (*prefix, groups * BLOCK, rows)

    def load(self, name: str) -> np.ndarray:
        if name not in self._packed:
            return self.inner.load(name)
        blocks, scales = self._packed[name]
        return np.swapaxes(self._dequantize(name, self.inner.load(blocks), self.inner.load(scales)), -1, -2)

    def load_index(self, name: str, index: int) -> np.ndarray:
        if name not in self._packed:
            return self.inner.load_index(name, index)
        blocks, scales = self._packed[name]
        rows_RK = self._dequantize(name, *(self.inner.load_index(x, index) for x in (blocks, scales)))
        return np.ascontiguousarray(rows_RK.T)

    def files(self) -> list[Path]:
        return self.inner.files()

    def stored_as(self, name: str) -> str:
        """How ``name`` is stored, for messages: its blocks and scales, or '' for a plain tensor."""
        if name not in self._packed:
            return ""
        blocks, scales = self._packed[name]
        return f" (MXFP4 {blocks!r} {list(self.inner.shape(blocks))} + {scales!r})"

    def _dequantize(self, name: str, blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
        for tensor, array in zip(self._packed[name], (blocks, scales), strict=True):
            if array.dtype != np.uint8:
                raise CheckpointError(f"MXFP4 tensor {tensor!r} is {array.dtype}, not uint8")
        return dequantize(blocks, scales)


def stored_as(ckpt: Checkpoint, name: str) -> str:
    """`` (MXFP4 ...)`` / `` (FP8 ...)`` when ``ckpt`` reads ``name`` from a quantized pair, else ''."""
    return ckpt.stored_as(name) if hasattr(ckpt, "stored_as") else ""
