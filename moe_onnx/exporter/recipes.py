"""Reading a checkpoint by the names in a family's :class:`Names`, with readable errors.

A *recipe* is how one graph weight is made: a loader (called only when the tensor is written)
and its shape, known up front. :class:`CheckpointReader` finds tensors under their names or the
family's renames, checks every shape against ``config.json`` when a recipe is made, and builds
the usual ones: a tensor as stored, a torch Linear as a MatMul operand ``[in, out]`` (fused from
its parts), a bias.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from moe_onnx.errors import CheckpointError, ExportError
from moe_onnx.exporter.checkpoint import Checkpoint
from moe_onnx.exporter.family import Names
from moe_onnx.exporter.mxfp4 import stored_as
from moe_onnx.spec import ModelSpec

Loader = Callable[[], np.ndarray]
Recipe = tuple[Loader, tuple[int, ...]]  # how to make a graph weight, and its shape


class CheckpointReader:
    """The tensors of ``ckpt`` under the names of ``names``, checked against ``spec``'s shapes."""

    def __init__(self, ckpt: Checkpoint, spec: ModelSpec, names: Names):
        self.ckpt, self.spec, self.names = ckpt, spec, names
        stored = ckpt.names()
        self._stored = _renamed(stored, names.renames)  # name in Names' terms -> stored name
        self.have = stored | self._stored.keys()
        bare = names.embed in self.have and f"model.{names.embed}" not in self.have
        self.model = "" if bare else "model."  # where the decoder's tensors sit
        if f"model.language_model.{names.embed}" in self.have:  # a multimodal checkpoint's text decoder
            self.model = "model.language_model."

    def find(self, *candidates: str) -> str:
        """The stored name of the first of ``candidates`` the checkpoint has."""
        for name in candidates:
            if name in self.have:
                return self._stored.get(name, name)
        raise CheckpointError(f"tensor {candidates[0]!r} is missing from the checkpoint")

    def one_of(self, prefixes: list[str], probe: str) -> str:
        """The first prefix under which ``probe`` exists (else the first, for the error message)."""
        return next((q for q in prefixes if q + probe in self.have), prefixes[0])

    def checked(self, name: str, shape: tuple[int, ...]) -> str:
        actual = tuple(self.ckpt.shape(name))
        if actual != tuple(shape):
            raise CheckpointError(f"tensor {name!r}{stored_as(self.ckpt, name)} has shape {list(actual)} "
                                  f"but config.json implies {list(shape)}")
        return name

    def plain(self, shape: tuple[int, ...], *candidates: str, transpose: bool = False) -> Recipe:
        """The first of ``candidates`` as stored (``shape``), or transposed."""
        name = self.checked(self.find(*candidates), shape)
        if transpose:  # a torch Linear [out, in] as a MatMul operand [in, out]
            return (lambda: self.ckpt.load(name).T), shape[::-1]
        return (lambda: self.ckpt.load(name)), shape

    def norm(self, shape: tuple[int, ...], *candidates: str) -> Recipe:
        """An RMSNorm's weight; one stored zero-centred (``Names.zero_centred_norms``: applied as
        ``1 + w``) gets its 1 added here, once, so the graph's norm stays ``x_normed * weight``."""
        load, shape = self.plain(shape, *candidates)
        if not self.names.zero_centred_norms:
            return load, shape
        return (lambda: np.add(load(), 1.0, dtype=np.float32)), shape

    def _parts(self, outs: list[int], prefix: str, parts: tuple[str, ...], suffix: str, tail: tuple) -> list:
        """Names and shapes of a projection stored as ``len(outs)`` parts or as one fused tensor."""
        if len(parts) == len(outs):
            return [(self.checked(self.find(prefix + x + suffix), (o, *tail)), o)
                    for x, o in zip(parts, outs, strict=True)]
        if len(parts) == 1:
            return [(self.checked(self.find(prefix + parts[0] + suffix), (sum(outs), *tail)), sum(outs))]
        raise ExportError(f"{prefix}{parts}: {len(parts)} parts for a projection of {len(outs)}")

    def linear(self, outs: list[int], in_dim: int, prefix: str, parts: tuple[str, ...]) -> Recipe:
        """Torch Linear weights ``[out_j, in]`` concatenated and transposed to ``[in, sum(out_j)]``."""
        named = self._parts(outs, prefix, parts, ".weight", (in_dim,))
        if len(named) == 1:
            return (lambda: self.ckpt.load(named[0][0]).T), (in_dim, sum(outs))
        return (lambda: np.concatenate([self.ckpt.load(x).T for x, _ in named], axis=1)), (in_dim, sum(outs))

    def bias(self, outs: list[int], prefix: str, parts: tuple[str, ...]) -> Recipe:
        """The biases of the Linear parts ``parts``, concatenated ``[sum(out_j)]``."""
        named = self._parts(outs, prefix, parts, ".bias", ())
        return (lambda: np.concatenate([self.ckpt.load(x) for x, _ in named])), (sum(outs),)


def bias_of(weight: str) -> str:
    """``x.weight`` -> ``x.bias``: a LayerNorm's or Linear's bias beside its weight."""
    return weight.removesuffix(".weight") + ".bias"


def halves(pairs: np.ndarray) -> np.ndarray:
    """Interleaved columns a0, b0, a1, b1 ... as the two halves ``[a | b]`` (gpt_oss's gate/up,
    RoPE's pairs)."""
    return np.concatenate([pairs[..., 0::2], pairs[..., 1::2]], axis=-1)


def _renamed(have: set[str], renames: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Each checkpoint name whose tail ``renames`` maps, by its name in :class:`Names`' terms."""
    out = {}
    for name in have:
        for stored, named in renames:
            if name == stored or name.endswith("." + stored):
                out[name[: len(name) - len(stored)] + named] = name
    return out
