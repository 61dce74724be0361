"""Canonical graph weights from checkpoint tensors: renamed, transposed, fused, cast — lazily.

Each canonical name (see :mod:`moe_onnx.graphs.decoder`) maps to a recipe over checkpoint
tensors. Shapes are checked against the spec when the graph asks for a weight, before anything
is written; data is read only when the tensor is serialised, one tensor at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from moe_onnx import dtypes
from moe_onnx.errors import CheckpointError
from moe_onnx.exporter.checkpoint import Checkpoint
from moe_onnx.exporter.family import Naming
from moe_onnx.spec import ModelSpec

Loader = Callable[[], np.ndarray]


class CheckpointWeights:
    """A :class:`moe_onnx.graphs.context.WeightSource` over a checkpoint."""

    def __init__(self, ckpt: Checkpoint, spec: ModelSpec, naming: Naming, dtype: str = "fp32"):
        self.ckpt, self.spec, self.naming, self.dtype = ckpt, spec, naming, dtype
        self._names = ckpt.names()
        self._prefix = "" if "model.embed_tokens.weight" not in self._names and "embed_tokens.weight" in self._names else "model."

    def tensor(self, name: str) -> ir.TensorProtocol:
        loader, shape = self._recipe(name)
        row = dtypes.get(self.dtype)
        np_dtype, ir_dtype = row.numpy, ir.DataType(row.onnx)

        def load() -> ir.TensorProtocol:
            return ir.tensor(np.ascontiguousarray(loader().astype(np_dtype, copy=False)), name=name)

        return ir.LazyTensor(load, dtype=ir_dtype, shape=ir.Shape(shape), name=name)

    # -- checkpoint access with readable errors --------------------------------------------
    def _find(self, *candidates: str) -> str:
        for name in candidates:
            if name in self._names:
                return name
        raise CheckpointError(f"tensor {candidates[0]!r} is missing from the checkpoint")

    def _checked(self, name: str, shape: tuple[int, ...]) -> str:
        actual = tuple(self.ckpt.shape(name))
        if actual != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {list(actual)} but config.json implies {list(shape)}"
            )
        return name

    def _plain(self, shape, *candidates: str) -> tuple[Loader, tuple]:
        name = self._checked(self._find(*candidates), shape)
        return (lambda: self.ckpt.load(name)), shape

    def _linear_t(self, out_in: tuple[int, int], *candidates: str) -> tuple[Loader, tuple]:
        """A torch Linear weight ``[out, in]`` as a MatMul operand ``[in, out]``."""
        name = self._checked(self._find(*candidates), out_in)
        return (lambda: self.ckpt.load(name).T), (out_in[1], out_in[0])

    def _concat(self, parts: list[tuple[Loader, tuple]], axis: int) -> tuple[Loader, tuple]:
        shape = list(parts[0][1])
        shape[axis] = sum(p[1][axis] for p in parts)
        return (lambda: np.concatenate([p[0]() for p in parts], axis=axis)), tuple(shape)

    # -- the recipes ------------------------------------------------------------------------
    def _recipe(self, name: str) -> tuple[Loader, tuple]:
        s, m = self.spec, self._prefix
        if name == "embed_tokens":
            return self._plain((s.vocab_size, s.hidden_size), m + "embed_tokens.weight")
        if name == "lm_head":
            return self._plain((s.vocab_size, s.hidden_size), "lm_head.weight")
        if name == "norm":
            return self._plain((s.hidden_size,), m + "norm.weight")
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if not match:
            raise KeyError(name)
        i, rest = int(match.group(1)), match.group(2)
        p = f"{m}layers.{i}."
        if rest.startswith("moe."):
            return self._moe_recipe(p, rest[4:])
        return self._layer_recipe(p, rest)

    def _layer_recipe(self, p: str, rest: str) -> tuple[Loader, tuple]:
        s = self.spec
        H, N, G, D, F = s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size
        a = p + "self_attn."
        if rest in ("input_norm", "post_norm"):
            hf = "input_layernorm" if rest == "input_norm" else "post_attention_layernorm"
            return self._plain((H,), f"{p}{hf}.weight")
        if rest == "qkv":
            sizes = {"q": N * D, "k": G * D, "v": G * D}
            return self._concat([self._linear_t((n, H), f"{a}{x}_proj.weight") for x, n in sizes.items()], 1)
        if rest == "qkv_bias":
            sizes = {"q": N * D, "k": G * D, "v": G * D}
            return self._concat([self._plain((n,), f"{a}{x}_proj.bias") for x, n in sizes.items()], 0)
        if rest == "o_proj":
            return self._linear_t((H, N * D), a + "o_proj.weight")
        if rest == "o_proj_bias":
            return self._plain((H,), a + "o_proj.bias")
        if rest in ("q_norm", "k_norm"):
            heads = N if rest == "q_norm" else G
            return self._plain((heads * D,) if s.qk_norm == "full" else (D,), f"{a}{rest}.weight")
        if rest == "mlp.gate_up":
            g, u, _ = ("gate_proj", "up_proj", "down_proj")
            return self._concat([self._linear_t((F, H), f"{p}mlp.{x}.weight") for x in (g, u)], 1)
        if rest == "mlp.down":
            return self._linear_t((H, F), p + "mlp.down_proj.weight")
        raise KeyError(rest)

    def _moe_recipe(self, p: str, rest: str) -> tuple[Loader, tuple]:
        moe = self.spec.moe
        assert moe is not None
        H, E, S = self.spec.hidden_size, moe.num_experts, moe.shared_expert_size
        prefixes = [p + x + "." for x in (self.naming.moe_prefix, *self.naming.moe_prefix_aliases)]
        if rest == "router":
            return self._linear_t((E, H), *[x + "gate.weight" for x in prefixes])
        if rest.startswith("shared."):
            x = self.naming.shared_prefix
            proj = rest[len("shared."):]
            if proj == "gate_up":
                parts = [self._linear_t((S, H), *[f"{q}{x}.{n}.weight" for q in prefixes]) for n in ("gate_proj", "up_proj")]
                return self._concat(parts, 1)
            return self._linear_t((H, S), *[f"{q}{x}.down_proj.weight" for q in prefixes])
        if rest == "shared_gate":
            return self._linear_t((1, H), *[f"{q}{self.naming.shared_gate}.weight" for q in prefixes])
        match = re.fullmatch(r"experts\.(\d+)\.(gate_up|down)", rest)
        if match:
            return self._expert(prefixes, int(match.group(1)), match.group(2))
        if rest in ("fc1", "fc2"):
            return self._fused_op_weight(prefixes, rest)
        if rest in ("gate_up", "down"):
            experts = [self._expert(prefixes, e, rest) for e in range(E)]
            return (lambda: np.stack([ex[0]() for ex in experts])), (E, *experts[0][1])
        raise KeyError(rest)

    def _fused_op_weight(self, prefixes: list[str], which: str) -> tuple[Loader, tuple]:
        """``com.microsoft.MoE`` layout: fc1 [E, 2F, H] with gate/up rows interleaved, fc2 [E, H, F]."""
        E, F, H = self.spec.moe.num_experts, self.spec.moe.expert_size, self.spec.hidden_size
        experts = [self._expert(prefixes, e, "gate_up" if which == "fc1" else "down") for e in range(E)]

        def fc1_row(load: Loader) -> np.ndarray:
            gate_up_H2F = load()
            rows = np.empty((2 * F, H), gate_up_H2F.dtype)
            rows[0::2], rows[1::2] = gate_up_H2F[:, :F].T, gate_up_H2F[:, F:].T
            return rows

        if which == "fc1":
            return (lambda: np.stack([fc1_row(ex[0]) for ex in experts])), (E, 2 * F, H)
        return (lambda: np.stack([ex[0]().T for ex in experts])), (E, H, F)

    def _expert(self, prefixes: list[str], e: int, which: str) -> tuple[Loader, tuple]:
        """One expert's ``gate_up`` [H, 2F] or ``down`` [F, H], from per-expert or fused tensors."""
        moe = self.spec.moe
        H, E, F = self.spec.hidden_size, moe.num_experts, moe.expert_size
        gate, up, down = self.naming.expert_proj
        per_expert = [f"{q}experts.{e}.{gate}.weight" for q in prefixes]
        if not any(n in self._names for n in per_expert):
            fused_name = "gate_up_proj" if which == "gate_up" else "down_proj"
            fused = [f"{q}experts.{fused_name}" for q in prefixes]
            if any(n in self._names for n in fused):
                shape = (E, 2 * F, H) if which == "gate_up" else (E, H, F)
                name = self._checked(self._find(*fused), shape)
                return (lambda: self.ckpt.load_index(name, e).T), (shape[2], shape[1])
        if which == "gate_up":
            parts = [self._linear_t((F, H), *[f"{q}experts.{e}.{x}.weight" for q in prefixes]) for x in (gate, up)]
            return self._concat(parts, 1)
        return self._linear_t((H, F), *[f"{q}experts.{e}.{down}.weight" for q in prefixes])
