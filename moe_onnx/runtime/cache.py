"""The KV cache between steps: numpy arrays on CPU, device OrtValues on CUDA.

Legend: B batch, G kv heads, P cached positions, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnxruntime as ort


@dataclass(frozen=True)
class KVCache:
    """Per layer ``(key, value)``, each ``[B, G, P, D]``; on CUDA they never leave the device.

    Immutable: a step returns a new cache, so one cache may seed several continuations.
    Make an empty one with :meth:`moe_onnx.runtime.Session.empty_cache`.
    """

    layers: list[tuple]  # numpy arrays (cpu) or onnxruntime.OrtValue (device)
    device: str = "cpu"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, G, P, D)`` of every tensor in the cache."""
        key = self.layers[0][0]
        return tuple(key.shape() if isinstance(key, ort.OrtValue) else key.shape)

    @property
    def length(self) -> int:
        """Cached positions ``P``."""
        return int(self.shape[2])

    @property
    def batch(self) -> int:
        return int(self.shape[0])
