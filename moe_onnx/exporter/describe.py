"""``moe-onnx inspect``: what an export is, read from its manifest and graph (no weights loaded)."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path

import onnx

from moe_onnx import manifest as manifest_file


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _fmt_shape(value_info) -> str:
    dims = value_info.type.tensor_type.shape.dim
    elem = onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type)
    return f"{elem}[{', '.join(d.dim_param or str(d.dim_value) for d in dims)}]"


def describe(out) -> str:
    """A human-readable summary of the export in ``out``."""
    out = Path(out)
    m = manifest_file.read(out)
    spec, params = m.spec, m.params
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)
    weights = f"  weights {m.weights} (block {m.block_size}, {m.quant_method})" if m.block_size else ""
    heads = f"(kv {spec.num_kv_heads}, head_dim {spec.head_dim})" if spec.mla is None else \
        f"(latent attention, q/k head {spec.head_dim}, v head {spec.mla.v_head_dim})"
    lines = [
        f"export       {out}",
        f"family       {m.model_type}  dtype {m.dtype}{weights}  opset {m.opset}",
        f"layers       {spec.num_layers}  hidden {spec.hidden_size}  heads {spec.num_heads} {heads}  "
        f"vocab {spec.vocab_size}",
    ]
    moe = spec.moe
    if moe:
        shared = f", shared expert {moe.shared_expert_size}" if moe.shared_expert_size else ""
        lines.append(
            f"moe          {spec.num_moe_layers}/{spec.num_layers} layers, E={moe.num_experts} experts, "
            f"k={moe.top_k}, expert width {moe.expert_size}{shared}, "
            f"norm_topk_prob={moe.norm_topk_prob}, impl {m.moe_impl}"
        )
    else:
        lines.append(f"ffn          dense, width {spec.intermediate_size}")
    specifics = _non_defaults(spec) + (_non_defaults(moe) if moe else [])
    if specifics:
        lines.append(f"specifics    {', '.join(specifics)}")
    lines += _family_lines(spec)
    ratio = params["active_per_token"] / params["total"]
    lines.append(
        f"parameters   total {_fmt_params(params['total'])}, active per token "
        f"{_fmt_params(params['active_per_token'])} ({ratio:.0%})"
    )
    lines.append(f"decode reads {m.bytes_per_token / 1e6:.2f} MB of weights per token "
                 f"({m.weights}{' + scales' if m.block_size else ''}; KV cache not counted)")
    attention = spec.attention_layers
    plural = "s" * (len(attention) > 1)
    on_layers = f" on {len(attention)} attention layer{plural}" if spec.layer_types else ""
    lines.append(f"kv cache     {m.kv_cache}, {m.kv.name}, {m.kv_bytes_per_token / 1e3:.1f} KB per position"
                 f"{on_layers} ({_cache_at(m.kv_bytes_per_token, spec.max_position_embeddings)})")
    if spec.layer_types:
        kinds = Counter(kind for kind in spec.layer_types if kind != "attention")
        lines.append(f"state        {', '.join(f'{n} {kind}' for kind, n in kinds.items())} layers: "
                     f"{m.state_bytes / 1e3:.1f} KB per sequence, whatever its length "
                     f"({', '.join(sorted({name.split('.')[0] for name in spec.state_shapes()}))})")
    top = ", ".join(f"{k} {v}" for k, v in ops.most_common(8))
    lines.append(f"graph        {len(model.graph.node)} nodes: {top}")
    lines.append("inputs")
    lines += [f"  {i.name:32s} {_fmt_shape(i)}" for i in _abbreviate(model.graph.input)]
    repeated = _repeated(spec)
    if repeated:
        lines.append(f"  ... and {repeated} alike")
    lines.append("outputs")
    lines += [f"  {o.name:32s} {_fmt_shape(o)}" for o in _abbreviate(model.graph.output)]
    lines.append("files")
    for f in sorted(out.iterdir()):
        if f.is_file():
            lines.append(f"  {f.name:32s} {f.stat().st_size / 1e6:10.2f} MB")
    return "\n".join(lines)


_QUOTED_POSITIONS = 2048  # a context the cache's size is quoted at, unless the model's maximum is less


def _cache_at(bytes_per_position: int, max_positions: int) -> str:
    positions = min(_QUOTED_POSITIONS, max_positions)
    most = ", the model's maximum" if positions == max_positions else ""
    return f"{bytes_per_position * positions / 1e6:.1f} MB at {positions} positions{most}"


def _non_defaults(spec) -> list[str]:
    """``field=value`` for every field of a spec dataclass that is not at its default: what sets
    this family apart (biases, norms, multipliers, router flavour, sliding window...)."""
    shown = []
    for f in dataclasses.fields(spec):
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        if default is dataclasses.MISSING or f.name in ("moe", "moe_layers", "rope", "sliding_layers", "mla"):
            continue
        value = getattr(spec, f.name)
        if value != default:
            shown.append(f"{f.name}={value}")
    return shown


def _family_lines(spec) -> list[str]:
    """What the specifics line says tersely, in words: per-layer windows and sinks, the router,
    the experts' activation, a scaled RoPE (each only where it is not the plain Llama/Mixtral one)."""
    rotated = spec.head_dim if spec.mla is None else spec.mla.qk_rope_head_dim  # MLA: only the roped part
    lines = [_attention(spec), _rope(spec.rope, rotated)]
    if spec.moe:
        lines[1:1] = [_router(spec.moe), _activation(spec.moe)]
    return [line for line in lines if line]


def _attention(spec) -> str:
    windowed = [i for i in range(spec.num_layers) if spec.window(i)]
    parts = []
    if spec.sliding_layers and windowed:
        parts.append(f"sliding window {spec.sliding_window} on layers {', '.join(map(str, windowed))}, "
                     f"full on the other {spec.num_layers - len(windowed)}")
    if spec.attention_sinks:
        parts.append("a learned sink logit per head in each softmax")
    if spec.mla is not None:
        parts.append(_latent(spec))
    return f"attention    {'; '.join(parts)}" if parts else ""


def _latent(spec) -> str:
    """MLA's queries and its cache per token and layer, against the expanded K/V it stands for."""
    m = spec.mla
    query = f"q_a (rank {m.q_lora_rank}) -> norm -> q_b" if m.q_lora_rank else "q_proj"
    cached = m.kv_lora_rank + m.qk_rope_head_dim
    expanded = spec.num_heads * (m.qk_head_dim + m.v_head_dim)
    return (f"multi-head latent: queries by {query}; the cache holds {cached} values per token and layer, "
            f"the latent {m.kv_lora_rank} + the roped key {m.qk_rope_head_dim} (expanded K/V: {expanded}, "
            f"{expanded / cached:.1f}x more); kv_b_proj folded into queries and head outputs"
            + ("; the roped dims' stored pairs reordered to halves at export" if m.deinterleave_rope else ""))


def _router(moe) -> str:
    grouped = moe.n_group > 1 and moe.topk_group < moe.n_group
    scaled = f", times {moe.routed_scaling_factor:g}" if moe.routed_scaling_factor != 1.0 else ""
    if not (moe.logit_bias or moe.selection_bias or moe.router != "softmax" or moe.expert_bias or grouped
            or scaled):
        return ""
    logits = "router logits + bias" if moe.logit_bias else "router logits"
    within = f" within the best {moe.topk_group} of {moe.n_group} expert groups" if grouped else ""
    if moe.router == "sparsemixer":
        kind = "sparsemixer top-2"
    elif moe.router == "sigmoid":
        kind = (f"top-{moe.top_k} of sigmoid({logits}) + selection bias{within}, weighted by the unbiased "
                f"sigmoid{' (renormalised)' if moe.norm_topk_prob else ''}{scaled}")
    elif grouped or scaled:  # deepseek_v2
        best = " (a group's score: its best probability)" if grouped else ""
        kind = f"top-{moe.top_k} of softmax({logits}){within}{best}{scaled}"
    elif moe.selection_bias:
        kind = f"top-{moe.top_k} of softmax({logits}) + selection bias, weighted by the unbiased softmax"
    elif moe.norm_topk_prob:
        kind = f"softmax over the top-{moe.top_k} {logits}"
    else:
        kind = f"top-{moe.top_k} of softmax({logits})"
    return f"router       {kind}{'; experts with biases' if moe.expert_bias else ''}"


def _activation(moe) -> str:
    if not (moe.swiglu_limit or moe.swiglu_alpha != 1.0 or moe.swiglu_beta):
        return ""
    limit = moe.swiglu_limit
    clamp = f", gate <= {limit:g}, |up| <= {limit:g}" if limit else ""
    return f"activation   gate * sigmoid({moe.swiglu_alpha:g} * gate) * (up + {moe.swiglu_beta:g}){clamp}"


def _rope(rope, head_dim: int) -> str:
    rotary = 2 * len(rope.inv_freq)
    partial = f"partial: the first {rotary} of {head_dim} dims of each head" if rotary < head_dim else ""
    if rope.rope_type == "default":
        return f"rope         {partial}" if partial else ""
    scaling = f", cos/sin scaled by {rope.attention_scaling:.4g}" if rope.attention_scaling != 1.0 else ""
    return f"rope         {rope.rope_type} factor {rope.factor:g}{scaling}{'; ' + partial if partial else ''}"


def _abbreviate(values):
    """All inputs/outputs, but only the first layer's entry of each cache kind (the others repeat it)."""
    keep, seen = [], set()
    for v in values:
        kind = re.sub(r"\.\d+(\.|$)", r".N\1", v.name)
        if kind == v.name or kind not in seen:
            keep.append(v)
            seen.add(kind)
    return keep


def _repeated(spec) -> str:
    """The cache inputs :func:`_abbreviate` leaves out, in words."""
    attention = spec.attention_layers
    parts = []
    if len(attention) > 1:
        parts.append(f"past_key_values.{{{', '.join(map(str, attention[1:]))}}}.key/value")
    for prefix in sorted({name.split(".")[0] for name in spec.state_shapes()}):
        layers = [name.split(".")[1] for name in spec.state_shapes() if name.split(".")[0] == prefix]
        if len(layers) > 1:
            parts.append(f"{prefix}.{{{', '.join(layers[1:])}}}")
    return ", ".join(parts)
