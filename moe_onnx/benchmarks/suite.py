"""``moe-onnx bench``: every variant x provider, prefill and decode, interleaved in rounds.

Variants (:mod:`moe_onnx.benchmarks.variants`) come in groups: one built-in shape at a time (its
MoE exports, dense twins and peers), or the user's exports. A group's variants are timed in the
same rounds, each variant's onnxruntime session (or torch model) loaded, run and freed within
every round (:func:`moe_onnx.benchmarks.timing.interleave_loaded`): the bench holds one model's
weights at a time. Before any work, :mod:`moe_onnx.benchmarks.budget` refuses
a variant set whose estimated peak would not fit in memory.
"""

from __future__ import annotations

import gc
import itertools
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from moe_onnx import dtypes
from moe_onnx.benchmarks import budget, llama_cpp
from moe_onnx.benchmarks import conditions as cond
from moe_onnx.benchmarks.memory import copy_bandwidth, peak_rss, release_free_memory, rss_mb
from moe_onnx.benchmarks.options import BenchOptions
from moe_onnx.benchmarks.peers import HF_ONNX, HF_ONNX_PREFILL_ONLY, TORCH
from moe_onnx.benchmarks.timing import Loaded, Stats, Unit, flat, interleave_loaded, paired_ratio
from moe_onnx.benchmarks.variants import (
    Group,
    Variant,
    groups,
    impls,
    shapes,
    weight_format,
    weights_label,
)
from moe_onnx.errors import MoeOnnxError
from moe_onnx.runtime.providers import describe_assignment
from moe_onnx.runtime.threads import share_threads

__all__ = ["BenchOptions", "Variant", "run_bench"]


def _load_and_warm(v: Variant, opts: BenchOptions, prompts: dict) -> None:
    """Load one variant, run its largest prefill and build its decode pasts; record RSS growth
    (weights included: every variant is loaded from its files)."""
    release_free_memory()
    gguf = v.memory.pop("gguf", None)
    before = rss_mb()
    with peak_rss() as peak:
        v.runner = v.load()
        v.memory["rss_load_mb"] = rss_mb() - before
        if getattr(getattr(v.runner, "session", None), "assignment", None) is not None:
            v.placement = describe_assignment(v.runner.session.assignment)
        elif getattr(v.runner, "placement", None):  # onnxruntime-web: one backend, no assignment record
            v.placement = v.runner.placement
        for n in sorted(opts.prompt_lens, reverse=True):
            if ("prefill", n) not in v.skips:
                v.runner.prefill(prompts[n])
                break
        _prepare_pasts(v, opts, prompts)
    v.memory["peak_rss_mb"] = peak["peak_mb"] - before
    if isinstance(v.runner, llama_cpp.LlamaBenchRunner):  # its own process: that process's peak RSS
        v.memory["rss_load_mb"] = v.memory["peak_rss_mb"] = v.runner.memory["peak_rss_mb"]
        v.runner.summary = gguf
        v.note = v.runner.note()


def _prepare_pasts(v: Variant, opts: BenchOptions, prompts: dict) -> None:
    for c in opts.decode_contexts:
        v.runner.prepare_decode(prompts[c])


def _loaded(v: Variant, opts: BenchOptions, prompts: dict, vocab: int, log, failures: list) -> Loaded:
    """The variant's units between its load (measured in round 0) and its release."""

    def open_(round_: int) -> bool:
        if v.runner is not None:  # kept loaded between rounds
            return True
        try:
            if round_ == 0:
                log(f"loading and warming {v.name}")
                _load_and_warm(v, opts, prompts)
            else:
                v.runner = v.load()
                _prepare_pasts(v, opts, prompts)
        except (RuntimeError, MoeOnnxError) as err:  # onnxruntime's errors are RuntimeErrors
            failures.append({"variant": v.name, "reason": f"{type(err).__name__}: {str(err)[:300]}"})
            log(f"{v.name} failed: {err}")
            v.runner = None
            return False
        return True

    def close() -> None:
        if not v.keep_loaded:
            v.runner = None  # the session (or the torch model), its arena and its pasts
            gc.collect()  # a torch model's modules refer to each other
            release_free_memory()

    return Loaded(_units(v, opts, prompts, vocab), open_, close)


def _units(v: Variant, opts: BenchOptions, prompts: dict, vocab: int) -> list[Unit]:
    """The variant's prefills, then its decode steps at each context."""
    if v.impl == llama_cpp.LLAMA_CPP:
        return ([_llama_cpp_unit(v, "prefill", n, opts.prefill_reps) for n in opts.prompt_lens]
                + [_llama_cpp_unit(v, "decode", c, opts.decode_steps) for c in opts.decode_contexts])
    peers = (TORCH, HF_ONNX, HF_ONNX_PREFILL_ONLY)
    units = [Unit((v.name, "prefill", n), (lambda n=n: v.runner.prefill(prompts[n])),
                  opts.peer_reps if v.impl in peers else opts.prefill_reps)
             for n in opts.prompt_lens if ("prefill", n) not in v.skips]
    for c in opts.decode_contexts:
        rng = np.random.default_rng(c)  # the same token sequence for every variant
        reps = opts.peer_reps if v.impl == HF_ONNX_PREFILL_ONLY else opts.decode_steps
        warmup = 1 if v.impl == HF_ONNX_PREFILL_ONLY else opts.decode_warmup
        units.append(Unit((v.name, "decode", c), _decode_step(v, c, rng, vocab, opts.batch), reps, warmup))
    return units


def _llama_cpp_unit(v: Variant, phase: str, length: int, reps: int) -> Unit:
    """One llama-bench process per round: its first sample is the untimed run, then ``reps`` timed."""
    return Unit((v.name, phase, length), llama_cpp.RoundSamples(v.runner, phase, length, reps), reps)


def _decode_step(v: Variant, context: int, rng, vocab: int, batch: int):
    def step() -> float:
        return v.runner.decode_step(context, rng.integers(0, vocab, (batch, 1)))

    return step


def _time_group(group: Group, opts: BenchOptions, deadline: float | None, progress, log,
                failures: list) -> tuple[dict, list[Variant]]:
    """The group's samples, and its variants that loaded."""
    vocab = min(v.vocab for v in group.variants)
    rng = np.random.default_rng(0)  # fixed random prompts, the same for every variant
    prompts = {n: rng.integers(0, vocab, (opts.batch, n)) for n in {*opts.prompt_lens, *opts.decode_contexts}}
    count = len(failures)
    loaded = [_loaded(v, opts, prompts, vocab, log, failures) for v in group.variants]
    samples = interleave_loaded(loaded, opts.rounds, progress, deadline)
    failed = {f["variant"] for f in failures[count:]}
    ok = [v for v in group.variants if v.name not in failed]
    if not ok:
        raise MoeOnnxError(f"no variant of {group.name} could be loaded: "
                           + "; ".join(f["reason"] for f in failures[count:]))
    for v in ok:  # llama.cpp's flash-attention settings, now probed for every phase and length
        if isinstance(v.runner, llama_cpp.LlamaBenchRunner):
            v.note = v.runner.note()
    return {k: s for k, s in samples.items() if s}, ok


def _variant_set(opts: BenchOptions, providers: list, chosen_shapes: list, chosen_impls: list) -> str:
    """The variant set in words, for the memory refusal."""
    where = "/".join(p[0] for p in providers)
    if opts.outs:
        return f"{len(opts.outs)} export(s) {', '.join(map(str, opts.outs))} on {where}"
    peers = ", peers torch eager + transformers' ONNX" if opts.peers else ""
    return (f"shapes {','.join(s.name for s in chosen_shapes)} x impls {','.join(chosen_impls)} "
            f"+ dense twins, weights {','.join(opts.weights)}, kv {','.join(opts.kv_caches)}, prompts "
            f"{','.join(map(str, opts.prompt_lens))}, contexts {','.join(map(str, opts.decode_contexts))}"
            f"{peers}, on {where}")


def _variant_info(v: Variant) -> dict:
    return {"name": v.name, "model": v.model, "impl": v.impl, "provider": v.provider, "dtype": v.dtype,
            "weights": v.weights, "kv_cache": v.kv_cache, "placement": v.placement,
            **v.params, **{k: round(x, 1) for k, x in v.memory.items()}, "note": v.note,
            "skipped": [{"phase": p, "length": n, "reason": r} for (p, n), r in v.skips.items()]}


def _check(opts: BenchOptions, providers: list, notes: list, log) -> budget.Estimate:
    """Every choice checked, and the memory estimate, before minutes of work."""
    chosen_shapes, chosen_impls = shapes(opts), impls(opts)
    for w in opts.weights:
        weight_format(w)
    if opts.llama_cpp:
        llama_cpp.LlamaCpp.locate(opts.llama_cpp)
        for w in opts.weights:
            llama_cpp.gguf_type(weight_format(w)[0])
        if opts.outs:
            notes.append("llama.cpp peer: only for the built-in models (it needs the HF checkpoint)")
    elif not opts.outs:
        notes.append(llama_cpp.SKIPPED)
    est = budget.check(opts, chosen_shapes, chosen_impls,
                       _variant_set(opts, providers, chosen_shapes, chosen_impls))
    log(f"memory: an estimated {est.peak_mb:,.0f} MB at the peak ({est.group}: {est.largest})")
    return est


def run_bench(opts: BenchOptions, progress=lambda *a: None, log=print) -> dict:
    """Build or open the variants, measure; ``{"conditions", "variants", "rows", "targets", "failures"}``."""
    from moe_onnx.benchmarks.report import rows
    from moe_onnx.benchmarks.targets import targets

    started = time.perf_counter()
    deadline = started + opts.time_budget_s if opts.time_budget_s else None
    providers, notes = cond.resolve_providers(opts.providers)
    est = _check(opts, providers, notes, log)
    if opts.shared_threads:
        # Every session of this process on one pool: no other session's threads left spinning
        # while one is timed (python -m studies.threading_modes measures why).
        share_threads(opts.threads)
    log(f"measuring copy bandwidth ({opts.bandwidth_gib:g} GiB, {opts.threads} threads)")
    bandwidth = copy_bandwidth(opts.bandwidth_gib, opts.threads)
    failures: list[dict] = []
    load_before = cond.load_average()
    samples, variants = {}, []
    count = 1 if opts.outs else len(shapes(opts))
    with tempfile.TemporaryDirectory(prefix="moe-onnx-bench-") as tmp:
        for i, group in enumerate(groups(opts, providers, Path(tmp), log, failures)):
            # the time left shared by the groups left: every shape gets its rounds
            share = (started + opts.time_budget_s - time.perf_counter()) / (count - i) if deadline else None
            got, ok = _time_group(group, opts, time.perf_counter() + share if deadline else None, progress,
                                  log, failures)
            samples.update(got)
            variants += ok
            group.release()  # its sessions and its torch checkpoint, before the next shape's
            shutil.rmtree(Path(tmp) / group.name, ignore_errors=True)
            del group
    stats = {key: Stats.of(flat(per_round)) for key, per_round in samples.items() if flat(per_round)}
    conditions = cond.describe(opts, bandwidth, notes, load_before)
    conditions["rounds_max"], conditions["rounds"] = opts.rounds, max(len(r) for r in samples.values())
    conditions["memory_estimate_mb"] = round(est.peak_mb)
    result_rows = rows(variants, stats, bandwidth, conditions)
    for r in result_rows:  # per-round medians, so ratios can be re-paired from the JSON
        per_round = samples.get((r["variant"], r["phase"], r["length"]), [])
        r["round_p50s_ms"] = [round(float(np.median(ts)) * 1e3, 4) for ts in per_round if ts]
    return {"conditions": conditions, "variants": [_variant_info(v) for v in variants], "rows": result_rows,
            "targets": targets(samples, variants, bandwidth, [] if opts.outs else shapes(opts)),
            "failures": failures, "llama_cpp": _llama_cpp_ratios(samples, variants, opts)}


def _llama_cpp_ratios(samples: dict, variants: list[Variant], opts: BenchOptions) -> list[dict]:
    """llama.cpp's time / each of our MoE impls', same model, same weight format (f32 / fp32,
    q8_0 / int8, q4_0 / int4), per phase and length, paired by round (> 1: llama.cpp is slower)."""
    names = {v.name for v in variants}
    out = []
    for v in variants:
        if v.impl != llama_cpp.LLAMA_CPP:
            continue
        ours_weights = [weights_label(*weight_format(w)) for w in opts.weights
                        if llama_cpp.gguf_type(weight_format(w)[0]) == v.weights]  # q4_0: int4, int4:128 ...
        for impl, weights, kv_cache in itertools.product(impls(opts), ours_weights, opts.kv_caches):
            ours = Variant(v.model, impl, v.provider, None, v.params, v.vocab,
                           weights="" if weights == dtypes.DTYPES[v.dtype].name else weights,
                           kv_cache=kv_cache).name
            if ours not in names:
                continue
            for (name, phase, n), per_round in samples.items():
                if name == v.name and samples.get((ours, phase, n)):
                    value, low, high, at_min = paired_ratio(per_round, samples[(ours, phase, n)])
                    out.append(dict(model=v.model, weights=v.weights, ours=ours, phase=phase, length=n,
                                    value=round(value, 3), low=round(low, 3), high=round(high, 3),
                                    at_min=round(at_min, 3)))
    return out
