"""Graph weights from checkpoint tensors: renamed, transposed, fused, cast — lazily.

:class:`CheckpointWeights` maps every graph weight the spec implies (names listed in
:mod:`moe_onnx.graphs.decoder`) onto the family's checkpoint names (:class:`Names`) once, when
it is made: a missing tensor or a shape that disagrees with ``config.json`` is reported before
anything is written. Data is read only when the graph's tensor is serialised, one at a time.

With a :class:`QuantConfig` every matrix a MatMul or Gather reads (attention, dense MLP, each
expert, shared experts, embeddings, lm_head) is stored block-quantized along its input axis; the
router, the shared-expert gate, norms and biases stay in the compute dtype. The embedding table
of an int4 export is int8: ONNX's Gather takes no int4 (and only one row per token is read);
so is a tied lm_head, which must match the one PyTorch tensor it shares with the embeddings.
Each weight is quantized when it is serialised, its small scale kept until the scale is written.

A quantized MoE layer also offers its experts in the layout of ONNX Runtime's ``com.microsoft.QMoE``
(the ``fused`` impl): ``moe.qfc1`` / ``moe.qfc2`` and their ``_scale``, quantized by the very call
that quantizes ``experts.{e}.gate_up`` / ``experts.{e}.down`` for ``dispatch``, so both graphs hold
the same integers and scales, only rearranged (see :func:`_qmoe_expert`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from moe_onnx import dtypes
from moe_onnx import weight_names as wn
from moe_onnx.errors import CheckpointError, ExportError
from moe_onnx.exporter.checkpoint import Checkpoint
from moe_onnx.exporter.family import Names
from moe_onnx.exporter.mxfp4 import stored_as
from moe_onnx.graphs.context import Blocked
from moe_onnx.quantize import QuantConfig, quantize
from moe_onnx.spec import ModelSpec

Loader = Callable[[], np.ndarray]
Recipe = tuple[Loader, tuple[int, ...]]  # how to make a graph weight, and its shape


class CheckpointWeights:
    """A :class:`moe_onnx.graphs.context.WeightSource` over a checkpoint."""

    def __init__(self, ckpt: Checkpoint, spec: ModelSpec, names: Names, dtype: str = "fp32",
                 quant: QuantConfig | None = None):
        self.ckpt, self.spec, self.names, self.quant = ckpt, spec, names, quant
        self.dtype = dtypes.get(dtype)
        self._scales: dict[str, np.ndarray] = {}  # quantized weight -> its scales, until written
        self._qmoe: dict[str, tuple[list[str], int]] = {}  # QMoE weight -> (expert weights, F or 0)
        stored = ckpt.names()
        self._stored = _renamed(stored, names.renames)  # name in Names' terms -> stored name
        self._have = stored | self._stored.keys()
        bare = names.embed in self._have and f"model.{names.embed}" not in self._have
        self._model = "" if bare else "model."  # where the decoder's tensors sit
        self.recipes: dict[str, Recipe] = {}
        self._map_model()
        self.axes = {n: a for n in self.recipes if (a := _quant_axis(n)) is not None} if quant else {}

    def blocked(self, name: str) -> Blocked | None:
        axis = self.axes.get(name)
        return None if axis is None else Blocked(axis, self.quant.block_size)

    def tensor(self, name: str) -> ir.TensorProtocol:
        base = name.removesuffix(wn.SCALE_SUFFIX)
        if base in self._qmoe:
            return self._qmoe_tensor(base, scale=name != base)
        if base in self.axes:
            return self._scale_tensor(base) if name != base else self._quantized_tensor(name)
        loader, shape = self._recipe(name)
        row = self.dtype

        def load() -> ir.TensorProtocol:
            return ir.tensor(np.ascontiguousarray(_cast(loader(), row, name)), name=name)

        return ir.LazyTensor(load, dtype=ir.DataType(row.onnx), shape=ir.Shape(shape), name=name)

    def _recipe(self, name: str) -> Recipe:
        try:
            return self.recipes[name]
        except KeyError:
            raise ExportError(f"the graph asked for weight {name!r}, which the spec does not have") from None

    def config(self, name: str) -> QuantConfig:
        """The quantization of ``name`` (a quantized weight)."""
        tied_head = name == wn.LM_HEAD and self.spec.tie_word_embeddings  # one tensor, one format
        return self.quant.for_gathered_table() if name == wn.EMBED or tied_head else self.quant

    def _quantize(self, name: str) -> np.ndarray:
        q, scale = quantize(self.recipes[name][0](), self.config(name), self.axes[name])
        self._scales[name] = scale
        return q

    def _quantized_tensor(self, name: str) -> ir.TensorProtocol:
        row = dtypes.integer(self.config(name).bits)

        def load() -> ir.TensorProtocol:
            return ir.tensor(np.ascontiguousarray(self._quantize(name).astype(row.numpy)), name=name)

        shape = self.recipes[name][1]
        return ir.LazyTensor(load, dtype=ir.DataType(row.onnx), shape=ir.Shape(shape), name=name)

    def _scale_tensor(self, base: str) -> ir.TensorProtocol:
        shape = list(self.recipes[base][1])
        axis = self.axes[base]
        shape[axis] = -(-shape[axis] // self.quant.block_size)
        row, name = self.dtype, wn.scale(base)

        def load() -> ir.TensorProtocol:
            if base not in self._scales:  # written before its weight: quantize (again) for it
                self._quantize(base)
            return ir.tensor(np.ascontiguousarray(_cast(self._scales.pop(base), row, name)), name=name)

        return ir.LazyTensor(load, dtype=ir.DataType(row.onnx), shape=ir.Shape(tuple(shape)), name=name)

    def _qmoe_tensor(self, base: str, scale: bool) -> ir.TensorProtocol:
        """``qfc1`` [E, 2F, H*bits/8] uint8 / ``qfc2`` [E, H, F*bits/8], or their scales
        [E, N, ceil(K/block)], in com.microsoft.QMoE's layout (see :func:`_qmoe_expert`)."""
        experts, F = self._qmoe[base]
        cfg = self.config(experts[0])
        K, N = self.recipes[experts[0]][1]  # a MatMul operand [in, out]
        name = wn.scale(base) if scale else base

        def expert(e: int) -> tuple[np.ndarray, np.ndarray]:
            w = experts[e]
            return _qmoe_expert(*quantize(self.recipes[w][0](), cfg, self.axes[w]), cfg.bits, F)

        def load_weights() -> ir.TensorProtocol:
            out = np.empty((len(experts), N, -(-K * cfg.bits // 8)), np.uint8)
            scales = np.empty((len(experts), N, -(-K // cfg.block_size)), np.float32)
            for e in range(len(experts)):  # one expert's float copy at a time
                out[e], scales[e] = expert(e)
            self._scales[base] = scales
            return ir.tensor(out, name=name)

        def load_scales() -> ir.TensorProtocol:
            if base not in self._scales:  # written before its weights: quantize (again) for it
                self._scales[base] = np.stack([expert(e)[1] for e in range(len(experts))])
            return ir.tensor(np.ascontiguousarray(_cast(self._scales.pop(base), self.dtype, name)), name=name)

        if scale:
            shape, dtype = (len(experts), N, -(-K // cfg.block_size)), ir.DataType(self.dtype.onnx)
            return ir.LazyTensor(load_scales, dtype=dtype, shape=ir.Shape(shape), name=name)
        shape = (len(experts), N, -(-K * cfg.bits // 8))
        return ir.LazyTensor(load_weights, dtype=ir.DataType.UINT8, shape=ir.Shape(shape), name=name)

    # -- the map, built once ------------------------------------------------------------------
    def _map_model(self) -> None:
        s, n, m = self.spec, self.names, self._model
        self.recipes[wn.EMBED] = self._plain((s.vocab_size, s.hidden_size), m + n.embed)
        self.recipes[wn.FINAL_NORM] = self._plain((s.hidden_size,), m + n.final_norm)
        if self.quant:  # a MatMul operand [H, V], quantized along H, from either tensor
            source = m + n.embed if s.tie_word_embeddings else n.lm_head
            self.recipes[wn.LM_HEAD] = self._plain((s.vocab_size, s.hidden_size), source, transpose=True)
        elif not s.tie_word_embeddings:
            self.recipes[wn.LM_HEAD] = self._plain((s.vocab_size, s.hidden_size), n.lm_head)
        if s.lm_head_bias:
            self.recipes[wn.bias(wn.LM_HEAD)] = self._plain((s.vocab_size,), _bias_of(n.lm_head))
        if s.norm == "layer":
            self.recipes[wn.bias(wn.FINAL_NORM)] = self._plain((s.hidden_size,), m + _bias_of(n.final_norm))
        for i in range(s.num_layers):
            layer = f"{m}layers.{i}."
            self._map_attention(i, layer)
            if s.is_moe_layer(i):
                moe_prefixes = [f"{layer}{x}." for x in dict.fromkeys((n.moe, "mlp"))]
                self._map_moe(wn.moe(i), moe_prefixes, layer)
            else:
                H, F = s.hidden_size, s.intermediate_size
                self.recipes[wn.mlp(i) + wn.GATE_UP] = self._linear([F, F], H, layer, n.mlp_gate_up)
                self.recipes[wn.mlp(i) + wn.DOWN] = self._linear([H], F, layer, (n.mlp_down,))

    def _map_attention(self, i: int, p: str) -> None:
        s, n, r = self.spec, self.names, self.recipes
        H, N, G, D = s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim
        g = wn.layer(i)
        r[g + wn.INPUT_NORM] = self._plain((H,), p + n.input_norm)
        r[g + wn.POST_NORM] = self._plain((H,), p + n.post_norm)
        if s.norm == "layer":
            r[wn.bias(g + wn.INPUT_NORM)] = self._plain((H,), p + _bias_of(n.input_norm))
            r[wn.bias(g + wn.POST_NORM)] = self._plain((H,), p + _bias_of(n.post_norm))
        if s.mla is not None:
            self._map_mla(g, p)
            return
        qkv_outs = [N * D, G * D, G * D]
        r[g + wn.QKV] = self._linear(qkv_outs, H, p, n.qkv)
        if s.qkv_bias:
            r[wn.bias(g + wn.QKV)] = self._bias(qkv_outs, p, n.qkv)
        r[g + wn.O_PROJ] = self._linear([H], N * D, p, (n.o_proj,))
        if s.o_bias:
            r[wn.bias(g + wn.O_PROJ)] = self._bias([H], p, (n.o_proj,))
        if s.attention_sinks:
            r[g + wn.SINKS] = self._plain((N,), p + n.sinks)
        if s.qk_norm != "none":
            full = s.qk_norm == "full"  # one norm over the whole projection, else per head
            r[g + wn.Q_NORM] = self._plain((N * D,) if full else (D,), p + n.q_norm)
            r[g + wn.K_NORM] = self._plain((G * D,) if full else (D,), p + n.k_norm)

    def _map_mla(self, g: str, p: str) -> None:
        """Multi-head latent attention (:mod:`moe_onnx.graphs.mla`): ``kv_b_proj`` [N(Dn+Dv), L]
        becomes its key half ``k_up`` [N, Dn, L] and its value half ``v_up`` [N, L, Dv]."""
        s, n, r, m = self.spec, self.names.mla, self.recipes, self.spec.mla
        H, N, L, R, Q = s.hidden_size, s.num_heads, m.kv_lora_rank, m.qk_rope_head_dim, m.q_lora_rank
        Dn, Dv = m.qk_nope_head_dim, m.v_head_dim
        # The columns whose last R of every head are roped: reordered pairs -> halves with deinterleave_rope.
        roped = (lambda recipe, heads: _halves_of_pairs(recipe, heads, R)) if m.deinterleave_rope else \
            (lambda recipe, heads: recipe)
        if Q:
            r[g + wn.Q_A] = self._linear([Q], H, p, (n.q_a,))
            r[g + wn.Q_A_NORM] = self._plain((Q,), p + n.q_a_norm)
            r[g + wn.Q_B] = roped(self._linear([N * m.qk_head_dim], Q, p, (n.q_b,)), N)
        else:
            r[g + wn.Q_PROJ] = roped(self._linear([N * m.qk_head_dim], H, p, (n.q,)), N)
        r[g + wn.KV_A] = roped(self._linear([L + R], H, p, (n.kv_a,)), 1)
        r[g + wn.KV_A_NORM] = self._plain((L,), p + n.kv_a_norm)
        if m.bias:
            r[wn.bias(g + wn.KV_A)] = roped(self._bias([L + R], p, (n.kv_a,)), 1)
            if Q:
                r[wn.bias(g + wn.Q_A)] = self._bias([Q], p, (n.q_a,))
        kv_b, _ = self._linear([N * (Dn + Dv)], L, p, (n.kv_b,))  # [L, N(Dn+Dv)]

        def heads() -> np.ndarray:
            return kv_b().reshape(L, N, Dn + Dv)

        r[g + wn.K_UP] = (lambda: heads()[:, :, :Dn].transpose(1, 2, 0)), (N, Dn, L)
        r[g + wn.V_UP] = (lambda: heads()[:, :, Dn:].transpose(1, 0, 2)), (N, L, Dv)
        r[g + wn.O_PROJ] = self._linear([H], N * Dv, p, (self.names.o_proj,))
        if s.o_bias:
            r[wn.bias(g + wn.O_PROJ)] = self._bias([H], p, (self.names.o_proj,))

    def _map_moe(self, g: str, prefixes: list[str], layer: str) -> None:
        s, n, r = self.spec, self.names, self.recipes
        moe = s.moe
        assert moe is not None
        H, E, F, S = s.hidden_size, moe.num_experts, moe.expert_size, moe.shared_expert_size
        r[g + wn.ROUTER] = self._plain((E, H), *[q + n.router for q in prefixes], transpose=True)
        if moe.selection_bias:  # [1, E] (ernie4_5_moe) or [E] (glm4_moe, deepseek)
            name = self._find(*[q + n.router_bias for q in prefixes])
            stored = (1, E) if tuple(self.ckpt.shape(name)) == (1, E) else (E,)
            load, _ = self._plain(stored, name)
            r[g + wn.ROUTER_BIAS] = (lambda: load().reshape(E)), (E,)
        if moe.logit_bias:
            r[g + wn.LOGIT_BIAS] = self._plain((E,), *[q + _bias_of(n.router) for q in prefixes])
        experts = [(self._expert(prefixes, e, wn.GATE_UP), self._expert(prefixes, e, wn.DOWN))
                   for e in range(E)]
        for e, (gate_up, down) in enumerate(experts):
            r[wn.expert(g, e) + wn.GATE_UP], r[wn.expert(g, e) + wn.DOWN] = gate_up, down
        # Stacked [E, H, 2F] / [E, F, H] for gather and dense; fc1/fc2 in com.microsoft.MoE's layout.
        r[g + wn.GATE_UP] = _stack([x[0] for x in experts])
        r[g + wn.DOWN] = _stack([x[1] for x in experts])
        r[g + wn.FC1] = _stack([(_interleave_gate_up(x[0][0], F), (2 * F, H)) for x in experts])
        r[g + wn.FC2] = _stack([((lambda d=x[1][0]: d().T), (H, F)) for x in experts])
        if moe.expert_bias:  # [E, 2F] (gate | up) and [E, H]; fc1's interleaved as fc1
            biases = [(self._expert_bias(prefixes, e, wn.GATE_UP), self._expert_bias(prefixes, e, wn.DOWN))
                      for e in range(E)]
            r[wn.bias(g + wn.GATE_UP)] = _stack([x[0] for x in biases])
            r[wn.bias(g + wn.DOWN)] = _stack([x[1] for x in biases])
            r[wn.bias(g + wn.FC1)] = _stack([((lambda b=x[0][0]: _interleaved_rows(b()[None], F)[:, 0]),
                                              (2 * F,)) for x in biases])
        if self.quant:  # the same quantized experts in com.microsoft.QMoE's layout
            self._qmoe[g + wn.QFC1] = ([wn.expert(g, e) + wn.GATE_UP for e in range(E)], F)
            self._qmoe[g + wn.QFC2] = ([wn.expert(g, e) + wn.DOWN for e in range(E)], 0)
        if S:
            q = self._one_of([*prefixes, layer], n.shared_down + ".weight")
            r[wn.shared(g) + wn.GATE_UP] = self._linear([S, S], H, q, n.shared_gate_up)
            r[wn.shared(g) + wn.DOWN] = self._linear([H], S, q, (n.shared_down,))
        if moe.shared_expert_gate:
            gates = [q + n.shared_gate for q in prefixes]
            r[g + wn.SHARED_GATE] = self._plain((1, H), *gates, transpose=True)

    def _expert(self, prefixes: list[str], e: int, which: str) -> Recipe:
        """One expert's ``gate_up`` [H, 2F] or ``down`` [F, H], from per-expert or stacked tensors."""
        s, n = self.spec, self.names
        H, E, F = s.hidden_size, s.moe.num_experts, s.moe.expert_size
        stacked = [q + (n.stacked_gate_up if which == wn.GATE_UP else n.stacked_down) for q in prefixes]
        if any(x in self._have for x in stacked):
            in_out = (H, 2 * F) if which == wn.GATE_UP else (F, H)
            shape = (E, *in_out) if n.stacked_in_out else (E, *in_out[::-1])
            name = self._checked(self._find(*stacked), shape)
            load = (lambda: self.ckpt.load_index(name, e)) if n.stacked_in_out else \
                (lambda: self.ckpt.load_index(name, e).T)
        else:
            per_expert = [f"{q}experts.{e}." for q in prefixes]
            q = self._one_of(per_expert, n.expert_down + ".weight")
            parts = ([F, F], H, n.expert_gate_up) if which == wn.GATE_UP else ([H], F, (n.expert_down,))
            load, in_out = self._linear(parts[0], parts[1], q, parts[2])
        if which == wn.GATE_UP and n.interleaved_gate_up:
            return (lambda: _halves(load())), in_out
        return load, in_out

    def _expert_bias(self, prefixes: list[str], e: int, which: str) -> Recipe:
        """One expert's ``gate_up`` [2F] (gate | up) or ``down`` [H] bias, stacked or per expert."""
        s, n = self.spec, self.names
        H, E, F = s.hidden_size, s.moe.num_experts, s.moe.expert_size
        tail = n.stacked_gate_up_bias if which == wn.GATE_UP else n.stacked_down_bias
        stacked = [q + tail for q in prefixes]
        if any(x in self._have for x in stacked):
            name = self._checked(self._find(*stacked), (E, 2 * F) if which == wn.GATE_UP else (E, H))
            def load() -> np.ndarray:
                return self.ckpt.load_index(name, e)

            out = 2 * F if which == wn.GATE_UP else H
        else:
            q = self._one_of([f"{q}experts.{e}." for q in prefixes], n.expert_down + ".weight")
            load, (out,) = self._bias([F, F], q, n.expert_gate_up) if which == wn.GATE_UP else \
                self._bias([H], q, (n.expert_down,))
        if which == wn.GATE_UP and n.interleaved_gate_up:
            return (lambda: _halves(load())), (out,)
        return load, (out,)

    # -- checkpoint access with readable errors ---------------------------------------------
    def _find(self, *candidates: str) -> str:
        for name in candidates:
            if name in self._have:
                return self._stored.get(name, name)
        raise CheckpointError(f"tensor {candidates[0]!r} is missing from the checkpoint")

    def _one_of(self, prefixes: list[str], probe: str) -> str:
        """The first prefix under which ``probe`` exists (else the first, for the error message)."""
        return next((q for q in prefixes if q + probe in self._have), prefixes[0])

    def _checked(self, name: str, shape: tuple[int, ...]) -> str:
        actual = tuple(self.ckpt.shape(name))
        if actual != tuple(shape):
            raise CheckpointError(f"tensor {name!r}{stored_as(self.ckpt, name)} has shape {list(actual)} "
                                  f"but config.json implies {list(shape)}")
        return name

    def _plain(self, shape: tuple[int, ...], *candidates: str, transpose: bool = False) -> Recipe:
        name = self._checked(self._find(*candidates), shape)
        if transpose:  # a torch Linear [out, in] as a MatMul operand [in, out]
            return (lambda: self.ckpt.load(name).T), shape[::-1]
        return (lambda: self.ckpt.load(name)), shape

    def _parts(self, outs: list[int], prefix: str, parts: tuple[str, ...], suffix: str, tail: tuple) -> list:
        """Names and shapes of a projection stored as ``len(outs)`` parts or as one fused tensor."""
        if len(parts) == len(outs):
            return [(self._checked(self._find(prefix + x + suffix), (o, *tail)), o)
                    for x, o in zip(parts, outs, strict=True)]
        if len(parts) == 1:
            return [(self._checked(self._find(prefix + parts[0] + suffix), (sum(outs), *tail)), sum(outs))]
        raise ExportError(f"{prefix}{parts}: {len(parts)} parts for a projection of {len(outs)}")

    def _linear(self, outs: list[int], in_dim: int, prefix: str, parts: tuple[str, ...]) -> Recipe:
        """Torch Linear weights ``[out_j, in]`` concatenated and transposed to ``[in, sum(out_j)]``."""
        named = self._parts(outs, prefix, parts, ".weight", (in_dim,))
        if len(named) == 1:
            return (lambda: self.ckpt.load(named[0][0]).T), (in_dim, sum(outs))
        return (lambda: np.concatenate([self.ckpt.load(x).T for x, _ in named], axis=1)), (in_dim, sum(outs))

    def _bias(self, outs: list[int], prefix: str, parts: tuple[str, ...]) -> Recipe:
        named = self._parts(outs, prefix, parts, ".bias", ())
        return (lambda: np.concatenate([self.ckpt.load(x) for x, _ in named])), (sum(outs),)


_MATMUL_WEIGHTS = (wn.QKV, wn.O_PROJ, wn.GATE_UP, wn.DOWN, wn.LM_HEAD,  # [in, out]: blocks along axis 0
                   wn.Q_PROJ, wn.Q_A, wn.Q_B, wn.KV_A)  # MLA's
# MLA's halves of kv_b_proj, [N, Dn, L] and [N, L, Dv]: blocks along L, the checkpoint Linear's input
# (k_up's output axis: the queries are multiplied into the latent's space).
_HEAD_WEIGHTS = {wn.K_UP: 2, wn.V_UP: 1}


def _quant_axis(name: str) -> int | None:
    """The input axis of a weight that is quantized, or None for one that stays in float."""
    if name == wn.EMBED:
        return 1  # [V, H]: rows are gathered, blocks run along H
    tail = name.rsplit(".", 1)[-1]
    if tail in _HEAD_WEIGHTS:
        return _HEAD_WEIGHTS[tail]
    if tail not in _MATMUL_WEIGHTS:
        return None  # router, shared-expert gate, norms, biases, the fused op's fc1/fc2
    return 1 if wn.is_stacked_experts(name) else 0  # stacked [E, in, out] for gather / dense


def _bias_of(weight: str) -> str:
    """``x.weight`` -> ``x.bias``: a LayerNorm's or Linear's bias beside its weight."""
    return weight.removesuffix(".weight") + ".bias"


def _cast(array: np.ndarray, row: dtypes.DType, name: str) -> np.ndarray:
    """``array`` in ``row``'s type; a finite value beyond its range is an error, never a silent inf."""
    with np.errstate(over="ignore"):
        out = array.astype(row.numpy, copy=False)
    if out.dtype != array.dtype and array.dtype.kind == "f" and row.bits < 32:
        overflow = np.isinf(out) & np.isfinite(array)
        if overflow.any():
            worst = float(np.abs(array[overflow]).max())
            raise ExportError(
                f"weight {name!r} holds {int(overflow.sum())} values beyond the {row.name} range "
                f"(largest |x| = {worst:.4g} > {row.max_finite:.4g}); export with --dtype fp32 or bf16"
            )
    return out


def _renamed(have: set[str], renames: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Each checkpoint name whose tail ``renames`` maps, by its name in :class:`Names`' terms."""
    out = {}
    for name in have:
        for stored, named in renames:
            if name == stored or name.endswith("." + stored):
                out[name[: len(name) - len(stored)] + named] = name
    return out


def _halves_of_pairs(recipe: Recipe, heads: int, R: int) -> Recipe:
    """``recipe``'s last axis, ``heads`` equal heads whose last ``R`` values are RoPE pairs
    (x0, x1), (x2, x3) ..., reordered to halves (x0, x2 ... | x1, x3 ...)."""
    load, shape = recipe

    def halves() -> np.ndarray:
        per_head = np.array(load()).reshape(*shape[:-1], heads, -1)  # a copy: loads may be read-only
        per_head[..., -R:] = _halves(per_head[..., -R:])
        return per_head.reshape(shape)

    return halves, shape


def _halves(pairs: np.ndarray) -> np.ndarray:
    """Interleaved columns a0, b0, a1, b1 ... as the two halves ``[a | b]`` (gpt_oss's gate/up,
    RoPE's pairs)."""
    return np.concatenate([pairs[..., 0::2], pairs[..., 1::2]], axis=-1)


def _stack(recipes: list[Recipe]) -> Recipe:
    return (lambda: np.stack([load() for load, _ in recipes])), (len(recipes), *recipes[0][1])


def _interleave_gate_up(load: Loader, F: int) -> Loader:
    """``[H, 2F]`` (gate | up) as ``[2F, H]`` rows gate0, up0, gate1, up1 ... (the MoE op's CPU layout)."""
    return lambda: _interleaved_rows(load(), F)


def _interleaved_rows(gate_up: np.ndarray, F: int) -> np.ndarray:
    """``[X, 2F]`` columns (gate | up) as ``[2F, X]`` rows gate0, up0, gate1, up1 ..."""
    out = np.empty((2 * F, gate_up.shape[0]), gate_up.dtype)
    out[0::2], out[1::2] = gate_up[:, :F].T, gate_up[:, F:].T
    return out


def _qmoe_expert(q: np.ndarray, scale: np.ndarray, bits: int, F: int) -> tuple[np.ndarray, np.ndarray]:
    """One expert's quantized MatMul operand ``q`` [K, N] (blocks along K, ``scale``
    [ceil(K/block), N]) in com.microsoft.QMoE's layout: ``([N, K*bits/8] uint8, [N, ceil(K/block)])``.

    Each output row holds its K inputs consecutively (``gate_up``'s rows interleaved gate/up when
    ``F``, as ``swiglu_fusion=1`` reads them); values are stored unsigned, ``q + 2^(bits-1)``, which
    is the op's implicit zero point when no zero points are given, so ``(u - 2^(bits-1)) * scale``
    is exactly ``q * scale``; int4 packs two per byte, the even K index in the low nibble.
    """
    rows = _interleaved_rows if F else (lambda a, _: a.T)
    u = (rows(q, F).astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    if bits == 4:
        if u.shape[1] % 2:
            u = np.pad(u, ((0, 0), (0, 1)), constant_values=8)
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    return np.ascontiguousarray(u), np.ascontiguousarray(rows(scale, F))
