"""The issue's targets for the embedded default models, each with its measured value.

For each shape (E experts, top-k), on the CPU provider, with "sparse" the default MoE impl:
- decode: sparse within 1.3x (coarse) / 1.5x (fine) of the dense twin with equal active params;
- decode: faster than the dense twin with equal total params by at least 0.5 x E/k;
- prefill: the sparse impl at least 0.5 x E/k times faster than the ``dense`` impl;
- decode: sparse reaches >= 50% of the measured copy bandwidth on its active bytes;
- decode: faster than PyTorch eager (by how much);
- decode: dense-active <= sparse <= dense-total in every round (the fraction of rounds that keep it);
- decode: p90/p50 <= 1.3 for every ONNX variant of the shape (the worst one's figure).

The per-twin targets are repeated for each weight format and cache the run measured (labelled
``[int4 static fp16]`` and so on; the dense twins are exported in the same formats).

Ratios are paired by round (see :func:`moe_onnx.benchmarks.timing.paired_ratio`): ``value`` is
the median over rounds, ``low``/``high`` the extreme rounds, ``at_min`` the ratio of minimums.
"""

from __future__ import annotations

import numpy as np

from moe_onnx import dtypes
from moe_onnx.benchmarks.models import DENSE_FFN
from moe_onnx.benchmarks.peers import TORCH
from moe_onnx.benchmarks.timing import flat, paired_ratio
from moe_onnx.graphs.moe import MOE_IMPLS

CPU = "@cpu"
ONNX_IMPLS = (*MOE_IMPLS, DENSE_FFN)  # the variants that are our exports (not peers)

ACTIVE_LIMIT = {"coarse": 1.3, "fine": 1.5}


def _target(shape, what: str, measured, target: str, ok) -> dict | None:
    if measured is None:
        return None
    value, low, high, at_min = measured
    return dict(shape=shape.name, what=what, value=round(value, 3), low=round(low, 3), high=round(high, 3),
                at_min=round(at_min, 3), target=target, met=bool(ok(value)), met_at_min=bool(ok(at_min)))


def _bandwidth_pct(per_round: list[list[float]], variant, bandwidth_gbs: float):
    """% of copy bandwidth reached on active bytes, in the same four figures as a ratio."""
    active_bytes = variant.bytes_per_token or (
        variant.params["active_per_token"] * dtypes.DTYPES[variant.dtype].bytes
    )
    pcts = [100 * active_bytes / float(np.median(r)) / 1e9 / bandwidth_gbs for r in per_round if r]
    at_min = 100 * active_bytes / min(flat(per_round)) / 1e9 / bandwidth_gbs
    return float(np.median(pcts)), min(pcts), max(pcts), at_min


def _tags(shape, samples: dict, sparse: str) -> list[str]:
    """The weight-format/cache suffixes (``""``, ``"/int4"``, ``"/int4/static/fp16"`` ...) with which
    the MoE's ``sparse`` variant was measured on the CPU."""
    head = f"{shape.name}-moe/{sparse}"
    tags = {name[len(head):-len(CPU)] for (name, _, _) in samples
            if name.startswith(head) and name.endswith(CPU)}
    return sorted(t for t in tags if t == "" or t.startswith("/"))


def _ordering(per_round: list[list[list[float]]]):
    """dense-active <= sparse <= dense-total: the fraction of rounds in which the medians keep that
    order, as the four figures of a ratio (``at_min``: 1.0 when the minimums keep it, else 0.0)."""
    medians = [[np.median(r) for r in rounds] for rounds in per_round]
    held = [float(a <= s <= t) for a, s, t in zip(*medians, strict=True)]
    a, s, t = (min(flat(rounds)) for rounds in per_round)
    fraction = float(np.mean(held))
    return fraction, fraction, fraction, float(a <= s <= t)


def _spread(samples: dict, names: list[str], contexts) -> tuple | None:
    """The worst decode p90/p50 over ``names`` and ``contexts`` (low: the best), as four figures."""
    spreads = []
    for name in names:
        for c in contexts:
            seconds = flat(samples.get((name, "decode", c), []))
            if seconds:
                spreads.append(float(np.percentile(seconds, 90) / np.median(seconds)))
    return (max(spreads), min(spreads), max(spreads), max(spreads)) if spreads else None


def _shape_targets(shape, samples: dict, variants: dict, bandwidth_gbs: float, sparse: str,
                   prompt_lens, contexts) -> list:
    def ratio(num: tuple, den: tuple):
        return paired_ratio(samples[num], samples[den]) if samples.get(num) and samples.get(den) else None

    half_ek, limit = 0.5 * shape.sparsity, ACTIVE_LIMIT.get(shape.name, 1.5)
    out = []
    for tag in _tags(shape, samples, sparse):
        def key(model: str, impl: str, phase: str, n: int, tag=tag) -> tuple:
            return (f"{shape.name}-{model}/{impl}{tag}{CPU}", phase, n)

        label = f" [{tag[1:].replace('/', ' ')}]" if tag else ""  # e.g. " [int4 static fp16]"
        for c in contexts:
            sp = key("moe", sparse, "decode", c)
            bw = _bandwidth_pct(samples[sp], variants[sp[0]], bandwidth_gbs) if samples.get(sp) else None
            dense_active = key("dense-active", DENSE_FFN, "decode", c)
            dense_total = key("dense-total", DENSE_FFN, "decode", c)
            trio = [samples.get(k) for k in (dense_active, sp, dense_total)]
            out += [
                _target(shape, f"decode@{c}: {sparse} / dense-active{label}", ratio(sp, dense_active),
                        f"<= {limit}", lambda v, lim=limit: v <= lim),
                _target(shape, f"decode@{c}: dense-total / {sparse}{label}", ratio(dense_total, sp),
                        f">= {half_ek:g} (0.5 E/k)", lambda v: v >= half_ek),
                _target(shape, f"decode@{c}: dense-active <= {sparse} <= dense-total{label}",
                        _ordering(trio) if all(trio) else None, "1 (every round)", lambda v: v == 1.0),
                _target(shape, f"decode@{c}: {sparse} % of copy bandwidth{label}", bw, ">= 50",
                        lambda v: v >= 50),
            ]
            if not tag:  # PyTorch eager runs the checkpoint's own fp32
                out.append(_target(shape, f"decode@{c}: torch eager / {sparse}",
                                   ratio(key("moe", TORCH, "decode", c), sp),
                                   "> 1", lambda v: v > 1))
        for n in prompt_lens:
            out.append(_target(shape, f"prefill@{n}: dense impl / {sparse}{label}",
                               ratio(key("moe", "dense", "prefill", n), key("moe", sparse, "prefill", n)),
                               f">= {half_ek:g} (0.5 E/k)", lambda v: v >= half_ek))
    onnx = [name for name, v in variants.items()
            if name.startswith(f"{shape.name}-") and name.endswith(CPU) and v.impl in ONNX_IMPLS]
    out.append(_target(shape, "decode p90/p50, worst ONNX variant", _spread(samples, onnx, contexts),
                       "<= 1.3", lambda v: v <= 1.3))
    return [t for t in out if t is not None]


def targets(samples: dict, variants: list, bandwidth_gbs: float, shapes) -> list[dict]:
    """One entry per target and shape, from the per-round samples ``{(name, phase, n): [[s, ...], ...]}``."""
    from moe_onnx.graphs.moe import DEFAULT_MOE_IMPL

    prompt_lens = sorted({n for (_, phase, n) in samples if phase == "prefill"})
    contexts = sorted({n for (_, phase, n) in samples if phase == "decode"})
    by_name = {v.name: v for v in variants}
    out = []
    for shape in shapes:
        out += _shape_targets(shape, samples, by_name, bandwidth_gbs, DEFAULT_MOE_IMPL, prompt_lens, contexts)
    return out
