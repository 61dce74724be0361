"""The issue's targets for the embedded default models, each with its measured value.

For each shape (E experts, top-k), on the CPU provider, with "sparse" the default MoE impl:
- decode: sparse within 1.3x (coarse) / 1.5x (fine) of the dense twin with equal active params;
- decode: faster than the dense twin with equal total params by at least 0.5 x E/k;
- prefill: the sparse impl at least 0.5 x E/k times faster than the ``dense`` impl;
- decode: sparse reaches >= 50% of the measured copy bandwidth on its active bytes;
- decode: faster than PyTorch eager (by how much).

Ratios are paired by round (see :func:`moe_onnx.benchmarks.timing.paired_ratio`): ``value`` is
the median over rounds, ``low``/``high`` the extreme rounds, ``at_min`` the ratio of minimums.
"""

from __future__ import annotations

import numpy as np

from moe_onnx import dtypes
from moe_onnx.benchmarks.models import DENSE_FFN
from moe_onnx.benchmarks.peers import TORCH
from moe_onnx.benchmarks.timing import flat, paired_ratio

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


def _shape_targets(shape, samples: dict, variants: dict, bandwidth_gbs: float, sparse: str,
                   prompt_lens, contexts) -> list:
    def key(model: str, impl: str, phase: str, n: int) -> tuple:
        return (f"{shape.name}-{model}/{impl}@cpu", phase, n)

    def ratio(num: tuple, den: tuple):
        return paired_ratio(samples[num], samples[den]) if samples.get(num) and samples.get(den) else None

    half_ek, limit = 0.5 * shape.sparsity, ACTIVE_LIMIT.get(shape.name, 1.5)
    out = []
    for c in contexts:
        sp = key("moe", sparse, "decode", c)
        bw = _bandwidth_pct(samples[sp], variants[sp[0]], bandwidth_gbs) if samples.get(sp) else None
        dense_active = key("dense-active", DENSE_FFN, "decode", c)
        dense_total = key("dense-total", DENSE_FFN, "decode", c)
        out += [
            _target(shape, f"decode@{c}: {sparse} / dense-active", ratio(sp, dense_active),
                    f"<= {limit}", lambda v, lim=limit: v <= lim),
            _target(shape, f"decode@{c}: dense-total / {sparse}", ratio(dense_total, sp),
                    f">= {half_ek:g} (0.5 E/k)", lambda v: v >= half_ek),
            _target(shape, f"decode@{c}: {sparse} % of copy bandwidth", bw, ">= 50", lambda v: v >= 50),
            _target(shape, f"decode@{c}: torch eager / {sparse}", ratio(key("moe", TORCH, "decode", c), sp),
                    "> 1", lambda v: v > 1),
        ]
    for n in prompt_lens:
        out.append(_target(shape, f"prefill@{n}: dense impl / {sparse}",
                           ratio(key("moe", "dense", "prefill", n), key("moe", sparse, "prefill", n)),
                           f">= {half_ek:g} (0.5 E/k)", lambda v: v >= half_ek))
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
