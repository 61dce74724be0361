"""The KV cache between steps: numpy arrays on CPU, device OrtValues on CUDA.

Legend: B batch, G kv heads, P cached positions, D head_dim. Key and value may differ in G and D
(an export's ``kv_dims``: MLA caches a latent as the key and the roped key part as the value).
A hybrid model's recurrent layers carry fixed-size states instead (``past_conv.{i}`` ...,
:mod:`moe_onnx.contract`), held beside the attention layers' keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnxruntime as ort


@dataclass(frozen=True)
class KVCache:
    """Per layer ``(key, value)``, each ``[B, G, P, D]`` (its own G and D); on CUDA they never
    leave the device.

    A step returns a new cache, so one cache may seed several continuations. A static export's
    cache (``valid`` set) is a buffer ``[B, G, C, D]`` of which the first ``valid`` positions
    count; steps write into it in place, so continuing from an older cache overwrites what the
    newer caches of the same buffer hold beyond its length (each cache stays right for itself
    until then; seeding several continuations one after another works).
    Make an empty one with :meth:`moe_onnx.runtime.Session.empty_cache`.
    """

    layers: list[tuple]  # numpy arrays (cpu) or onnxruntime.OrtValue (device; static: any device)
    device: str = "cpu"
    valid: int | None = None  # static cache: positions in use; None: every position of the tensors
    # The recurrent layers' states [B, ...] in graph order (the session's state inputs); () for a
    # model without recurrent layers. Each step returns new ones (never updated in place).
    states: tuple = ()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The keys' ``(B, G, P, D)``: the cached positions, whatever a static buffer's capacity."""
        B, G, P, D = self._tensor_shape()
        return (B, G, P if self.valid is None else self.valid, D)

    @property
    def capacity(self) -> int:
        """Positions the tensors hold: ``P``, or a static buffer's ``C``."""
        return int(self._tensor_shape()[2])

    def _tensor_shape(self) -> tuple[int, int, int, int]:
        key = self.layers[0][0]
        return tuple(key.shape() if isinstance(key, ort.OrtValue) else key.shape)

    @property
    def length(self) -> int:
        """Cached positions ``P``."""
        return int(self.shape[2])

    @property
    def batch(self) -> int:
        return int(self.shape[0])
