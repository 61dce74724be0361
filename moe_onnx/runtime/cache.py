"""The KV cache between steps: numpy arrays on CPU, device OrtValues on CUDA.

Legend: B batch, G kv heads, P cached positions, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort


@dataclass
class KVCache:
    """Per layer ``(key, value)``, each ``[B, G, P, D]``; on CUDA they never leave the device."""

    layers: list[tuple]  # numpy arrays (cpu) or onnxruntime.OrtValue (cuda)
    device: str = "cpu"

    @classmethod
    def empty(cls, num_layers: int, batch: int, kv_heads: int, head_dim: int, dtype, device: str) -> KVCache:
        zeros = np.zeros((batch, kv_heads, 0, head_dim), dtype=dtype)
        if device == "cuda":
            def make():
                return ort.OrtValue.ortvalue_from_numpy(zeros, "cuda", 0)
        else:
            def make():
                return zeros
        return cls([(make(), make()) for _ in range(num_layers)], device)

    @property
    def length(self) -> int:
        key = self.layers[0][0]
        shape = key.shape() if isinstance(key, ort.OrtValue) else key.shape
        return int(shape[2])

    @property
    def batch(self) -> int:
        key = self.layers[0][0]
        shape = key.shape() if isinstance(key, ort.OrtValue) else key.shape
        return int(shape[0])
