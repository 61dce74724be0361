"""Every graph weight the spec implies (:mod:`moe_onnx.weight_names`), as a recipe over the
checkpoint's tensors: renamed, transposed to MatMul operands ``[in, out]``, fused (q/k/v,
gate/up), split (MLA's ``kv_b_proj``), reordered (RoPE pairs to halves).

The map is made once, before anything is written: a missing tensor or a shape that disagrees with
``config.json`` is reported then. Data is read only when a recipe's loader is called.
"""

from __future__ import annotations

import numpy as np

from moe_onnx import weight_names as wn
from moe_onnx.exporter.checkpoint import Checkpoint
from moe_onnx.exporter.expert_recipes import moe_recipes
from moe_onnx.exporter.family import Names
from moe_onnx.exporter.mixer_recipes import mixer_recipes
from moe_onnx.exporter.recipes import CheckpointReader, Recipe, bias_of, halves
from moe_onnx.spec import ModelSpec


def weight_map(ckpt: Checkpoint, spec: ModelSpec, names: Names, quantized: bool = False) -> dict[str, Recipe]:
    """Graph weight name -> recipe. ``quantized``: ``lm_head`` is its own ``[H, V]`` MatMul
    operand even when tied (it is quantized as one)."""
    src = CheckpointReader(ckpt, spec, names)
    s, n, m = spec, names, src.model
    r: dict[str, Recipe] = {}
    r[wn.EMBED] = src.plain((s.vocab_size, s.hidden_size), m + n.embed)
    r[wn.FINAL_NORM] = src.norm((s.hidden_size,), m + n.final_norm)
    if quantized:  # a MatMul operand [H, V], quantized along H, from either tensor
        source = m + n.embed if s.tie_word_embeddings else n.lm_head
        r[wn.LM_HEAD] = src.plain((s.vocab_size, s.hidden_size), source, transpose=True)
    elif not s.tie_word_embeddings:
        r[wn.LM_HEAD] = src.plain((s.vocab_size, s.hidden_size), n.lm_head)
    if s.lm_head_bias:
        r[wn.bias(wn.LM_HEAD)] = src.plain((s.vocab_size,), bias_of(n.lm_head))
    if s.norm == "layer":
        r[wn.bias(wn.FINAL_NORM)] = src.plain((s.hidden_size,), m + bias_of(n.final_norm))
    for i in range(s.num_layers):
        layer = f"{m}layers.{i}."
        r.update(_norms(src, i, layer))
        r.update(_attention(src, i, layer) if s.mixer(i) == "attention" else mixer_recipes(src, i, layer))
        if s.is_moe_layer(i):
            moe_prefixes = [f"{layer}{x}." for x in dict.fromkeys((n.moe, "mlp"))]
            r.update(moe_recipes(src, wn.moe(i), moe_prefixes, layer))
        else:
            H, F = s.hidden_size, s.intermediate_size
            r[wn.mlp(i) + wn.GATE_UP] = src.linear([F, F], H, layer, n.mlp_gate_up)
            r[wn.mlp(i) + wn.DOWN] = src.linear([H], F, layer, (n.mlp_down,))
    return r


def _norms(src: CheckpointReader, i: int, p: str) -> dict[str, Recipe]:
    """Layer ``i``'s two norms (before its token mixer, before its feed-forward)."""
    s, n, r = src.spec, src.names, {}
    H, g = s.hidden_size, wn.layer(i)
    r[g + wn.INPUT_NORM] = src.norm((H,), p + n.input_norm)
    r[g + wn.POST_NORM] = src.norm((H,), p + n.post_norm)
    if s.sandwich_norms:
        r[g + wn.POST_MIXER_NORM] = src.norm((H,), p + n.post_mixer_norm)
        r[g + wn.POST_FFN_NORM] = src.norm((H,), p + n.post_ffn_norm)
    if s.norm == "layer":
        r[wn.bias(g + wn.INPUT_NORM)] = src.plain((H,), p + bias_of(n.input_norm))
        r[wn.bias(g + wn.POST_NORM)] = src.plain((H,), p + bias_of(n.post_norm))
    return r


def _attention(src: CheckpointReader, i: int, p: str) -> dict[str, Recipe]:
    """Layer ``i``'s attention, its checkpoint tensors under ``p``."""
    s, n, r = src.spec, src.names, {}
    H, N, G, D = s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim
    g = wn.layer(i)
    if s.mla is not None:
        return r | _mla(src, g, p)
    qkv_outs = [N * D, G * D, G * D]
    if s.attention_gate and n.attention_gate:  # a separate gate projection: its columns after v's
        r[g + wn.QKV] = src.linear([*qkv_outs, N * D], H, p, (*n.qkv, n.attention_gate))
    elif s.attention_gate and n.query_gate:  # the gate inside q_proj: its columns moved after v's
        r[g + wn.QKV] = _gate_last(src.linear([2 * N * D, G * D, G * D], H, p, n.qkv), N, D)
    else:
        r[g + wn.QKV] = src.linear(qkv_outs, H, p, n.qkv)
    if s.qkv_bias and s.attention_gate and n.query_gate:
        r[wn.bias(g + wn.QKV)] = _gate_last(src.bias([2 * N * D, G * D, G * D], p, n.qkv), N, D)
    elif s.qkv_bias:
        r[wn.bias(g + wn.QKV)] = src.bias(qkv_outs, p, n.qkv)
    r[g + wn.O_PROJ] = src.linear([H], N * D, p, (n.o_proj,))
    if s.o_bias:
        r[wn.bias(g + wn.O_PROJ)] = src.bias([H], p, (n.o_proj,))
    if s.attention_sinks:
        r[g + wn.SINKS] = src.plain((N,), p + n.sinks)
    if s.qk_norm != "none":
        full = s.qk_norm == "full"  # one norm over the whole projection, else per head
        r[g + wn.Q_NORM] = src.norm((N * D,) if full else (D,), p + n.q_norm)
        r[g + wn.K_NORM] = src.norm((G * D,) if full else (D,), p + n.k_norm)
    return r


def _mla(src: CheckpointReader, g: str, p: str) -> dict[str, Recipe]:
    """Multi-head latent attention (:mod:`moe_onnx.graphs.mla`): ``kv_b_proj`` [N(Dn+Dv), L]
    becomes its key half ``k_up`` [N, Dn, L] and its value half ``v_up`` [N, L, Dv]."""
    s, n, r, m = src.spec, src.names.mla, {}, src.spec.mla
    H, N, L, R, Q = s.hidden_size, s.num_heads, m.kv_lora_rank, m.qk_rope_head_dim, m.q_lora_rank
    Dn, Dv = m.qk_nope_head_dim, m.v_head_dim
    # The columns whose last R of every head are roped: reordered pairs -> halves with deinterleave_rope.
    roped = (lambda recipe, heads: _halves_of_pairs(recipe, heads, R)) if m.deinterleave_rope else \
        (lambda recipe, heads: recipe)
    if Q:
        r[g + wn.Q_A] = src.linear([Q], H, p, (n.q_a,))
        r[g + wn.Q_A_NORM] = src.plain((Q,), p + n.q_a_norm)
        r[g + wn.Q_B] = roped(src.linear([N * m.qk_head_dim], Q, p, (n.q_b,)), N)
    else:
        r[g + wn.Q_PROJ] = roped(src.linear([N * m.qk_head_dim], H, p, (n.q,)), N)
    r[g + wn.KV_A] = roped(src.linear([L + R], H, p, (n.kv_a,)), 1)
    r[g + wn.KV_A_NORM] = src.plain((L,), p + n.kv_a_norm)
    if m.bias:
        r[wn.bias(g + wn.KV_A)] = roped(src.bias([L + R], p, (n.kv_a,)), 1)
        if Q:
            r[wn.bias(g + wn.Q_A)] = src.bias([Q], p, (n.q_a,))
    kv_b, _ = src.linear([N * (Dn + Dv)], L, p, (n.kv_b,))  # [L, N(Dn+Dv)]

    def heads() -> np.ndarray:
        return kv_b().reshape(L, N, Dn + Dv)

    r[g + wn.K_UP] = (lambda: heads()[:, :, :Dn].transpose(1, 2, 0)), (N, Dn, L)
    r[g + wn.V_UP] = (lambda: heads()[:, :, Dn:].transpose(1, 0, 2)), (N, L, Dv)
    r[g + wn.O_PROJ] = src.linear([H], N * Dv, p, (src.names.o_proj,))
    if s.o_bias:
        r[wn.bias(g + wn.O_PROJ)] = src.bias([H], p, (src.names.o_proj,))
    return r


def _halves_of_pairs(recipe: Recipe, heads: int, R: int) -> Recipe:
    """``recipe``'s last axis, ``heads`` equal heads whose last ``R`` values are RoPE pairs
    (x0, x1), (x2, x3) ..., reordered to halves (x0, x2 ... | x1, x3 ...)."""
    load, shape = recipe

    def reordered() -> np.ndarray:
        per_head = np.array(load()).reshape(*shape[:-1], heads, -1)  # a copy: loads may be read-only
        per_head[..., -R:] = halves(per_head[..., -R:])
        return per_head.reshape(shape)

    return reordered, shape


def _gate_last(recipe: Recipe, N: int, D: int) -> Recipe:
    """``recipe``'s last axis, q_proj's ``2*N*D`` columns (per head its query, then its gate) then
    k's and v's, reordered to the graph's q | k | v | gate."""
    load, shape = recipe

    def reordered() -> np.ndarray:
        x = load()
        per_head = x[..., :2 * N * D].reshape(*x.shape[:-1], N, 2, D)
        q, gate = (per_head[..., j, :].reshape(*x.shape[:-1], N * D) for j in (0, 1))
        return np.concatenate([q, x[..., 2 * N * D:], gate], axis=-1)

    return reordered, shape
