"""FP8 checkpoints (DeepSeek-V3's and GLM-4.5-FP8's hub format), read dequantized tensor by tensor.

A linear weight ``X.weight`` is stored as ``float8_e4m3fn`` ``[..., rows, cols]`` beside
``X.weight_scale_inv``, float32 (or E8M0 bytes) ``[..., ceil(rows / bm), ceil(cols / bn)]``: one
scale per ``bm × bn`` block (``quantization_config.weight_block_size``, [128, 128] in the models
that ship it), edge blocks partial. The value is ``fp8 * scale`` (the scale is already the
inverse of the quantizer's), as transformers' ``Fp8Dequantize`` computes it.
:class:`Fp8Checkpoint` shows the float32 ``X.weight`` in place of the pair; one tensor (or, for
stacked experts, one expert) is dequantized at a time, never the model.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np

from moe_onnx.errors import CheckpointError
from moe_onnx.exporter.checkpoint import Checkpoint
from moe_onnx.exporter.config import Config

SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv


def is_fp8(cfg: Config) -> bool:
    """Whether ``config.json`` declares block-wise FP8 weights."""
    quantization = cfg.get("quantization_config")
    return isinstance(quantization, dict) and quantization.get("quant_method") == "fp8"


def dequantizing(cfg: Config, ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` read through :class:`Fp8Checkpoint` when ``config.json`` says FP8, else as it is."""
    if not is_fp8(cfg):
        return ckpt
    block = cfg.get("quantization_config").get("weight_block_size") or [128, 128]
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise CheckpointError(f"{cfg.source}: quantization_config.weight_block_size must be two positive "
                              f"integers, got {block!r}")
    return Fp8Checkpoint(ckpt, (block[0], block[1]))


def dequantize(weight: np.ndarray, scales: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """``[..., rows, cols]`` FP8 values (any float type) times their ``[..., R, C]`` block scales."""
    rows, cols = weight.shape[-2:]
    if scales.dtype == np.uint8:  # E8M0 exponents (MXFP8-style scales)
        scales = np.ldexp(np.float32(1.0), scales.astype(np.int32) - 127)
    by_rows = np.repeat(scales.astype(np.float32), block[0], axis=-2)[..., :rows, :]
    return weight.astype(np.float32) * np.repeat(by_rows, block[1], axis=-1)[..., :cols]


class Fp8Checkpoint:
    """A :class:`Checkpoint` whose FP8 ``X.weight`` read as float32, scaled by ``X.weight_scale_inv``;
    other tensors pass through. A pair whose grid disagrees with the weight's shape and the block
    size, an FP8 weight without scales or scales without a weight are named when it is made."""

    def __init__(self, inner: Checkpoint, block: tuple[int, int]):
        self.inner, self.block = inner, block
        stored = inner.names()
        self._scales: dict[str, str] = {}  # X.weight -> X.weight_scale_inv
        for scales in sorted(n for n in stored if n.endswith(SCALE_SUFFIX)):
            weight = scales.removesuffix(SCALE_SUFFIX)
            if weight not in stored:
                raise CheckpointError(f"FP8 scales {scales!r} have no weight: {weight!r} is missing")
            w, s = inner.shape(weight), inner.shape(scales)
            grid = [*w[:-2], -(-w[-2] // block[0]), -(-w[-1] // block[1])] if len(w) >= 2 else None
            if grid is None or list(s) != grid:
                raise CheckpointError(
                    f"FP8 tensor {weight!r} has shape {list(w)} but its scales {scales!r} have shape "
                    f"{list(s)}; {block[0]}x{block[1]} blocks need {grid or '[..., rows, cols]'}")
            self._scales[weight] = scales
        self._names = stored - set(self._scales.values())

    def names(self) -> set[str]:
        return set(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(name)

    def load(self, name: str) -> np.ndarray:
        if name not in self._scales:
            return self._plain(name, self.inner.load(name))
        return dequantize(self.inner.load(name), self.inner.load(self._scales[name]), self.block)

    def load_index(self, name: str, index: int) -> np.ndarray:
        if name not in self._scales:
            return self._plain(name, self.inner.load_index(name, index))
        weight, scales = (self.inner.load_index(x, index) for x in (name, self._scales[name]))
        return dequantize(weight, scales, self.block)

    def files(self) -> list[Path]:
        return self.inner.files()

    def stored_as(self, name: str) -> str:
        """How ``name`` is stored, for messages: FP8 with its scales, or ''."""
        return f" (FP8 with {self._scales[name]!r})" if name in self._scales else ""

    def _plain(self, name: str, array: np.ndarray) -> np.ndarray:
        if array.dtype == ml_dtypes.float8_e4m3fn:
            raise CheckpointError(f"FP8 tensor {name!r} has no scales: {name + SCALE_SUFFIX!r} is missing")
        return array
