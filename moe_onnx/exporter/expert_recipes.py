"""An MoE layer's graph weights from a checkpoint: router, experts, shared expert.

Each expert's ``gate_up`` [H, 2F] and ``down`` [F, H] are read from per-expert Linears or from
one stacked tensor (``Names.stacked_*``, ``[E, out, in]`` or ``[E, in, out]``), one expert at a
time. The same experts are also offered stacked, ``[E, H, 2F]`` / ``[E, F, H]`` (gather, dense),
and in com.microsoft.MoE's layout, ``fc1`` [E, 2F, H] with gate/up rows interleaved and ``fc2``
[E, H, F] (fused); a graph asks only for those of its impl, and only those are read.
"""

from __future__ import annotations

import numpy as np

from moe_onnx import weight_names as wn
from moe_onnx.exporter.recipes import CheckpointReader, Loader, Recipe, bias_of, halves


def moe_recipes(src: CheckpointReader, g: str, prefixes: list[str], layer: str) -> dict[str, Recipe]:
    """The recipes of the MoE block ``g`` (:func:`moe_onnx.weight_names.moe`) whose checkpoint
    tensors sit under one of ``prefixes`` (the shared expert possibly under ``layer``)."""
    s, n, r = src.spec, src.names, {}
    moe = s.moe
    assert moe is not None
    H, E, F, S = s.hidden_size, moe.num_experts, moe.expert_size, moe.shared_expert_size
    r[g + wn.ROUTER] = src.plain((E, H), *[q + n.router for q in prefixes], transpose=True)
    if moe.selection_bias:  # [1, E] (ernie4_5_moe) or [E] (glm4_moe, deepseek)
        name = src.find(*[q + n.router_bias for q in prefixes])
        stored = (1, E) if tuple(src.ckpt.shape(name)) == (1, E) else (E,)
        load, _ = src.plain(stored, name)
        r[g + wn.ROUTER_BIAS] = (lambda: load().reshape(E)), (E,)
    if moe.logit_bias:
        r[g + wn.LOGIT_BIAS] = src.plain((E,), *[q + bias_of(n.router) for q in prefixes])
    experts = [(_expert(src, prefixes, e, wn.GATE_UP), _expert(src, prefixes, e, wn.DOWN)) for e in range(E)]
    for e, (gate_up, down) in enumerate(experts):
        r[wn.expert(g, e) + wn.GATE_UP], r[wn.expert(g, e) + wn.DOWN] = gate_up, down
    # Stacked [E, H, 2F] / [E, F, H] for gather and dense; fc1/fc2 in com.microsoft.MoE's layout.
    r[g + wn.GATE_UP] = _stack([x[0] for x in experts])
    r[g + wn.DOWN] = _stack([x[1] for x in experts])
    r[g + wn.FC1] = _stack([(_interleave_gate_up(x[0][0], F), (2 * F, H)) for x in experts])
    r[g + wn.FC2] = _stack([((lambda d=x[1][0]: d().T), (H, F)) for x in experts])
    if moe.expert_bias:  # [E, 2F] (gate | up) and [E, H]; fc1's interleaved as fc1
        biases = [(_expert_bias(src, prefixes, e, wn.GATE_UP), _expert_bias(src, prefixes, e, wn.DOWN))
                  for e in range(E)]
        r[wn.bias(g + wn.GATE_UP)] = _stack([x[0] for x in biases])
        r[wn.bias(g + wn.DOWN)] = _stack([x[1] for x in biases])
        r[wn.bias(g + wn.FC1)] = _stack([((lambda b=x[0][0]: interleaved_rows(b()[None], F)[:, 0]), (2 * F,))
                                         for x in biases])
    if S:
        q = src.one_of([*prefixes, layer], n.shared_down + ".weight")
        r[wn.shared(g) + wn.GATE_UP] = src.linear([S, S], H, q, n.shared_gate_up)
        r[wn.shared(g) + wn.DOWN] = src.linear([H], S, q, (n.shared_down,))
    if moe.shared_expert_gate:
        r[g + wn.SHARED_GATE] = src.plain((1, H), *[q + n.shared_gate for q in prefixes], transpose=True)
    return r


def _expert(src: CheckpointReader, prefixes: list[str], e: int, which: str) -> Recipe:
    """One expert's ``gate_up`` [H, 2F] or ``down`` [F, H], from per-expert or stacked tensors."""
    s, n = src.spec, src.names
    H, E, F = s.hidden_size, s.moe.num_experts, s.moe.expert_size
    stacked = [q + (n.stacked_gate_up if which == wn.GATE_UP else n.stacked_down) for q in prefixes]
    if any(x in src.have for x in stacked):
        in_out = (H, 2 * F) if which == wn.GATE_UP else (F, H)
        shape = (E, *in_out) if n.stacked_in_out else (E, *in_out[::-1])
        name = src.checked(src.find(*stacked), shape)
        load = (lambda: src.ckpt.load_index(name, e)) if n.stacked_in_out else \
            (lambda: src.ckpt.load_index(name, e).T)
    else:
        per_expert = [f"{q}experts.{e}." for q in prefixes]
        q = src.one_of(per_expert, n.expert_down + ".weight")
        parts = ([F, F], H, n.expert_gate_up) if which == wn.GATE_UP else ([H], F, (n.expert_down,))
        load, in_out = src.linear(parts[0], parts[1], q, parts[2])
    if which == wn.GATE_UP and n.interleaved_gate_up:
        return (lambda: halves(load())), in_out
    return load, in_out


def _expert_bias(src: CheckpointReader, prefixes: list[str], e: int, which: str) -> Recipe:
    """One expert's ``gate_up`` [2F] (gate | up) or ``down`` [H] bias, stacked or per expert."""
    s, n = src.spec, src.names
    H, E, F = s.hidden_size, s.moe.num_experts, s.moe.expert_size
    tail = n.stacked_gate_up_bias if which == wn.GATE_UP else n.stacked_down_bias
    stacked = [q + tail for q in prefixes]
    if any(x in src.have for x in stacked):
        name = src.checked(src.find(*stacked), (E, 2 * F) if which == wn.GATE_UP else (E, H))

        def load() -> np.ndarray:
            return src.ckpt.load_index(name, e)

        out = 2 * F if which == wn.GATE_UP else H
    else:
        q = src.one_of([f"{q}experts.{e}." for q in prefixes], n.expert_down + ".weight")
        load, (out,) = src.bias([F, F], q, n.expert_gate_up) if which == wn.GATE_UP else \
            src.bias([H], q, (n.expert_down,))
    if which == wn.GATE_UP and n.interleaved_gate_up:
        return (lambda: halves(load())), (out,)
    return load, (out,)


def _stack(recipes: list[Recipe]) -> Recipe:
    return (lambda: np.stack([load() for load, _ in recipes])), (len(recipes), *recipes[0][1])


def _interleave_gate_up(load: Loader, F: int) -> Loader:
    """``[H, 2F]`` (gate | up) as ``[2F, H]`` rows gate0, up0, gate1, up1 ... (the MoE op's CPU layout)."""
    return lambda: interleaved_rows(load(), F)


def interleaved_rows(gate_up: np.ndarray, F: int) -> np.ndarray:
    """``[X, 2F]`` columns (gate | up) as ``[2F, X]`` rows gate0, up0, gate1, up1 ..."""
    out = np.empty((2 * F, gate_up.shape[0]), gate_up.dtype)
    out[0::2], out[1::2] = gate_up[:, :F].T, gate_up[:, F:].T
    return out
