"""``moe-onnx bench``: every variant x provider, prefill and decode, interleaved in rounds.

A variant is one model on one engine: a moe-onnx export with one MoE impl on one execution
provider, a dense twin, PyTorch eager, or transformers' own ONNX export. Variants are loaded one
by one (their memory measured), then timed together (see :mod:`moe_onnx.benchmarks.timing`).
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moe_onnx import dtypes, manifest
from moe_onnx.benchmarks import conditions as cond
from moe_onnx.benchmarks import llama_cpp
from moe_onnx.benchmarks.memory import copy_bandwidth, peak_rss, release_free_memory, rss_mb
from moe_onnx.benchmarks.models import DEFAULT_SHAPES, DENSE_FFN, TINY_SHAPES, build_models
from moe_onnx.benchmarks.peers import (
    HF_ONNX,
    HF_ONNX_PREFILL_ONLY,
    TORCH,
    TorchRunner,
    export_for_generation,
    export_with_transformers,
    generation_runner,
    recompute_runner,
)
from moe_onnx.benchmarks.runners import onnx_runner
from moe_onnx.benchmarks.timing import Stats, Unit, flat, interleave, paired_ratio
from moe_onnx.errors import MoeOnnxError
from moe_onnx.quantize import QuantConfig
from moe_onnx.runtime.threads import share_threads
from moe_onnx.spec import ModelSpec


@dataclass
class BenchOptions:
    """What to run and how often; defaults are ``moe-onnx bench`` with no arguments."""

    outs: list[Path] = field(default_factory=list)  # user exports; empty = the embedded default
    providers: list[str] = field(default_factory=lambda: ["auto"])  # cpu | cuda | auto
    impls: list[str] | None = None  # MoE impls for the default models (None = all in MOE_IMPLS)
    weights: list[str] = field(default_factory=lambda: ["fp32"])  # weight formats of the default models
    # KV caches of the default models: concat | static, ":fp16" for a cache stored in fp16 (--kv-dtype)
    kv_caches: list[str] = field(default_factory=lambda: ["concat"])
    shapes: list[str] | None = None  # built-in shapes to run ("coarse", "fine"); None = both
    batch: int = 1
    prompt_lens: list[int] = field(default_factory=lambda: [32, 256])
    decode_contexts: list[int] = field(default_factory=lambda: [64, 512])
    rounds: int = 4  # at most; fewer (>= 2) where the time budget says so
    time_budget_s: float | None = 270.0  # wall time of the whole run, setup included; None = no limit
    prefill_reps: int = 1  # timed prefills per variant per round
    decode_steps: int = 8  # timed decode steps per variant per round
    decode_warmup: int = 4  # untimed decode steps before them: a step's caches take a few to settle
    peer_reps: int = 1  # timed prefills of peers, and decode steps of the prefix-recomputing one, per round
    threads: int = 2
    shared_threads: bool = True  # one onnxruntime thread pool for the process (moe_onnx.runtime.threads)
    peers: bool = True
    gather_limit_gb: float = 1.0  # skip a weight-gather prefill whose gathered weights exceed this
    tf32: bool = True  # CUDA runs fp32 MatMuls in TF32: onnxruntime's default (the runtime's is off)
    tiny: bool = False  # tiny shapes, for tests
    bandwidth_gib: float = 1.0
    llama_cpp: Path | None = None  # a llama.cpp build (scripts/build_llama_cpp.sh): the llama.cpp peer


@dataclass
class Variant:
    """One model on one engine, and what was learnt while loading it."""

    model: str
    impl: str
    provider: str
    load: Callable[[], object]  # -> a Runner (see moe_onnx.benchmarks.runners)
    params: dict  # {"total", "active_per_token"} as in the export manifest
    vocab: int
    dtype: str = "fp32"
    weights: str = ""  # quantized weight format ("int8", "int4"); "" = the compute dtype
    bytes_per_token: float | None = None  # weight bytes a decode step reads (None: active x dtype)
    note: str = ""
    skips: dict = field(default_factory=dict)  # (phase, length) -> reason
    runner: object = None
    memory: dict = field(default_factory=dict)
    kv_cache: str = "concat"  # "static": the export updates a preallocated cache in place; ":fp16" stored so

    @property
    def name(self) -> str:
        static = "/" + self.kv_cache.replace(":", "/") if self.kv_cache != "concat" else ""
        return f"{self.model}/{self.impl}{'/' + self.weights if self.weights else ''}{static}@{self.provider}"


def _gathered_bytes(impl: str, spec: ModelSpec, tokens: int, dtype: str) -> int:
    """Expert weights one layer of the weight-gather impl copies for ``tokens`` tokens (0 for other impls)."""
    if impl != "gather" or not spec.moe:
        return 0
    return tokens * spec.moe.top_k * 3 * spec.hidden_size * spec.moe.expert_size * dtypes.DTYPES[dtype].bytes


def onnx_variant(out: Path, model: str, provider: tuple[str, list[str], str], opts: BenchOptions) -> Variant:
    """A moe-onnx export on one provider (``(label, onnxruntime providers, device)``)."""
    m = manifest.read(out)
    impl = m.moe_impl or DENSE_FFN
    label = provider[0]  # the runtime resolves cpu | cuda to onnxruntime providers itself
    per_token = _gathered_bytes(impl, m.spec, opts.batch, m.dtype)
    gather_chunk = max(1, int(opts.gather_limit_gb * 1e9 // per_token)) if per_token else None
    # Decode pasts are built by prefills no longer than the longest timed prompt: onnxruntime's
    # arena keeps each session's peak, and a bench holds dozens of sessions (one prefill of a
    # 2,000-token context per session took 74 variants past this machine's 24 GiB).
    longest = max(opts.prompt_lens)
    max_chunk = min(gather_chunk, longest) if gather_chunk else longest

    def load():
        return onnx_runner(out, label, opts.threads, max_chunk, opts.tf32)

    variant = Variant(model, impl, label, load, m.params, m.spec.vocab_size, m.dtype,
                      weights_label(m.weights, m.block_size) if m.block_size else "", m.bytes_per_token,
                      kv_cache=m.kv_cache + (f":{m.kv_dtype}" if m.kv_dtype else ""))
    for n in opts.prompt_lens:
        if gather_chunk and n > gather_chunk:
            variant.skips[("prefill", n)] = (
                f"prefill {n} skipped: the weight gather would copy {per_token * n / 1e9:.1f} GB of expert "
                f"weights per layer (limit {opts.gather_limit_gb:g} GB); its decode pasts are built in "
                f"chunks of {max_chunk}")
    return variant


def weight_format(entry: str) -> tuple[str, int | None]:
    """``fp32``, ``int8`` or ``int4``, optionally ``:BLOCK`` (``int4:128``): the format and its block
    size (None: the exporter's default)."""
    fmt, _, block = entry.partition(":")
    if fmt not in ("fp32", *dtypes.QUANTIZED_DTYPES):
        raise MoeOnnxError(f"unknown weight format {entry!r}; choose from fp32, "
                           f"{', '.join(dtypes.QUANTIZED_DTYPES)} (a quantized one may add :BLOCK, int4:128)")
    if not block:
        return fmt, None
    if fmt == "fp32" or not block.isdigit() or int(block) < 16:
        raise MoeOnnxError(f"weight format {entry!r}: a block size goes with int8 or int4 and is an "
                           "integer >= 16 (int4:128)")
    return fmt, int(block)


def weight_export_options(entry: str) -> dict:
    """``moe_onnx.export``'s ``weights`` and ``block_size`` for a ``--weights`` entry (``int4:128``)."""
    fmt, block = weight_format(entry)
    return dict(weights=None if fmt == "fp32" else fmt, block_size=block or QuantConfig.block_size)


def weights_label(fmt: str, block: int | None) -> str:
    """A variant's weights: ``int4``, or ``int4:128`` away from the default block size."""
    return fmt if block in (None, QuantConfig.block_size) else f"{fmt}:{block}"


def _peer_variants(name: str, model, params: dict, opts: BenchOptions, tmp: Path, log,
                   failures: list) -> list:
    import torch

    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    vocab = model.config.vocab_size
    eager = Variant(name, TORCH, "cpu", lambda: TorchRunner(model, opts.threads), params, vocab,
                    note=f"torch {torch.__version__}, default experts implementation")
    eager.memory["resident_mb"] = weights_mb  # resident before loading: the model is the checkpoint
    log(f"exporting {name} with transformers' OnnxExporter.export_for_generation")
    try:
        path = export_for_generation(model, tmp / f"{name}-transformers-onnx")
        return [eager, Variant(name, HF_ONNX, "cpu", lambda: generation_runner(path, opts.threads), params,
                               vocab, note="export_for_generation: prefill + decode graphs with a KV cache")]
    except Exception as err:  # noqa: BLE001 - a peer failing is a finding, not a crash
        failures.append({"variant": f"{name}/{HF_ONNX}", "reason": str(err)})
        log(f"transformers' export_for_generation failed on {name}: {err}")
    try:  # the plain export, labelled for what it is
        path = export_with_transformers(model, tmp / f"{name}-transformers-onnx-prefill-only")
    except Exception as err:  # noqa: BLE001
        failures.append({"variant": f"{name}/{HF_ONNX_PREFILL_ONLY}", "reason": str(err)})
        return [eager]
    hf = Variant(name, HF_ONNX_PREFILL_ONLY, "cpu", lambda: recompute_runner(path, opts.threads), params,
                 vocab, note="prefill-only graph (no past inputs): decode = recompute context+1 tokens")
    return [eager, hf]


def _shapes(opts: BenchOptions) -> list:
    """The built-in shapes ``opts.shapes`` names (all by default); a clear error for a typo."""
    shapes = TINY_SHAPES if opts.tiny else DEFAULT_SHAPES
    if opts.shapes is None:
        return list(shapes)
    unknown = sorted(set(opts.shapes) - {s.name for s in shapes})
    if unknown:
        raise MoeOnnxError(f"unknown shape(s) {', '.join(unknown)}; choose from "
                           f"{', '.join(s.name for s in shapes)}")
    return [s for s in shapes if s.name in opts.shapes]


def _impls(opts: BenchOptions) -> list[str]:
    """The MoE impls to export, read from ``MOE_IMPLS`` at run time (new impls join by themselves)."""
    from moe_onnx.graphs.moe import MOE_IMPLS

    impls = opts.impls or list(MOE_IMPLS)
    unknown = sorted(set(impls) - set(MOE_IMPLS))
    if unknown:
        raise MoeOnnxError(f"unknown MoE impl(s) {', '.join(unknown)}; choose from {', '.join(MOE_IMPLS)}")
    return impls


def _default_variants(opts: BenchOptions, providers: list, tmp: Path, log, failures: list) -> list[Variant]:
    import moe_onnx

    impls = _impls(opts)
    variants = []
    for shape in _shapes(opts):
        log(f"building random-weight models for the {shape.name} shape")
        for name, model in build_models(shape).items():
            for impl in impls if name.endswith("-moe") else ["auto"]:
                for weights, kv_cache in itertools.product(opts.weights, opts.kv_caches):
                    log(f"exporting {name} (moe_impl={impl}, weights={weights}, kv_cache={kv_cache})")
                    kind, _, kv_dtype = kv_cache.partition(":")
                    where = tmp / f"{name}-{impl}-{weights.replace(':', 'b')}-{kind}-{kv_dtype}"
                    out = moe_onnx.export(model, where, moe_impl=impl, **weight_export_options(weights),
                                          kv_cache=kind, kv_dtype=kv_dtype or None)
                    variants += [onnx_variant(out, name, p, opts) for p in providers]
            if opts.peers and name.endswith("-moe"):
                variants += _peer_variants(name, model, variants[-1].params, opts, tmp, log, failures)
            if opts.llama_cpp and name.endswith("-moe"):
                variants += _llama_cpp_variants(name, model, shape, variants[-1].params, opts, tmp, log,
                                                failures)
    return variants


def _llama_cpp_variants(name: str, model, shape, params: dict, opts: BenchOptions, tmp: Path, log,
                        failures: list) -> list[Variant]:
    """The same checkpoint in GGUF at each of ``opts.weights`` (f32, q8_0, q4_0), timed by llama-bench."""
    llama = llama_cpp.LlamaCpp.locate(opts.llama_cpp)
    if opts.batch != 1:
        failures.append({"variant": f"{name}/{llama_cpp.LLAMA_CPP}",
                         "reason": "llama-bench runs batch 1 only"})
        return []
    checkpoint = llama_cpp.save_checkpoint(model, tmp / f"{name}-hf")
    variants = []
    for weights in dict.fromkeys(weight_format(w)[0] for w in opts.weights):  # int4 and int4:128: one q4_0
        kind = llama_cpp.gguf_type(weights)
        log(f"converting {name} to GGUF {kind} for llama.cpp")
        try:
            path = llama_cpp.convert(llama, checkpoint, tmp / "gguf", weights)
        except RuntimeError as err:
            failures.append({"variant": f"{name}/{llama_cpp.LLAMA_CPP}/{kind}", "reason": str(err)})
            log(f"llama.cpp conversion of {name} to {kind} failed: {err}")
            continue
        summary = llama_cpp.gguf_summary(path, llama.tree, shape.top_k)
        variants.append(Variant(
            name, llama_cpp.LLAMA_CPP, "cpu",
            (lambda path=path: llama_cpp.LlamaBenchRunner(llama, path, opts.threads)), params,
            model.config.vocab_size, weights=kind, bytes_per_token=summary["bytes_per_token"],
            note=llama_cpp.describe(llama, summary)))
        variants[-1].memory["gguf"] = summary  # popped after warming: the note then says what llama-bench ran
    return variants


def _load_and_warm(v: Variant, opts: BenchOptions, prompts: dict) -> None:
    """Load one variant, run its largest prefill and build its decode pasts; record RSS growth.

    ``resident_mb`` (the torch peer's weights, in memory before loading) is added, so every
    variant's figures include its weights.
    """
    release_free_memory()
    gguf = v.memory.pop("gguf", None)
    before = rss_mb() - v.memory.pop("resident_mb", 0.0)
    with peak_rss() as peak:
        v.runner = v.load()
        v.memory["rss_load_mb"] = rss_mb() - before
        for n in sorted(opts.prompt_lens, reverse=True):
            if ("prefill", n) not in v.skips:
                v.runner.prefill(prompts[n])
                break
        for c in opts.decode_contexts:
            v.runner.prepare_decode(prompts[c])
    v.memory["peak_rss_mb"] = peak["peak_mb"] - before
    if isinstance(v.runner, llama_cpp.LlamaBenchRunner):  # its own process: that process's peak RSS
        v.memory["rss_load_mb"] = v.memory["peak_rss_mb"] = v.runner.memory["peak_rss_mb"]
        v.runner.summary = gguf
        v.note = v.runner.note()


def _load_all(variants: list[Variant], opts: BenchOptions, prompts: dict, log,
              failures: list) -> list[Variant]:
    """Load and warm each variant; one that onnxruntime cannot load or run is reported and dropped."""
    loaded = []
    for i, v in enumerate(variants):
        log(f"loading and warming {v.name} ({i + 1}/{len(variants)})")
        try:
            _load_and_warm(v, opts, prompts)
        except (RuntimeError, MoeOnnxError) as err:  # onnxruntime's errors are RuntimeErrors
            failures.append({"variant": v.name, "reason": f"{type(err).__name__}: {str(err)[:300]}"})
            log(f"{v.name} failed: {err}")
            v.runner = None
            continue
        loaded.append(v)
    if not loaded:
        raise MoeOnnxError("no variant could be loaded: " + "; ".join(f["reason"] for f in failures))
    return loaded


def _units(variants: list[Variant], opts: BenchOptions, prompts: dict, vocab: int) -> list[Unit]:
    """Prefill units, then decode units; within each (phase, length) every variant in turn."""
    units = []
    peers = (TORCH, HF_ONNX, HF_ONNX_PREFILL_ONLY)
    for n in opts.prompt_lens:
        units += [Unit((v.name, "prefill", n), (lambda v=v, n=n: v.runner.prefill(prompts[n])),
                       opts.peer_reps if v.impl in peers else opts.prefill_reps)
                  if v.impl != llama_cpp.LLAMA_CPP else _llama_cpp_unit(v, "prefill", n, opts.prefill_reps)
                  for v in variants if ("prefill", n) not in v.skips]
    for c in opts.decode_contexts:
        for v in variants:
            if v.impl == llama_cpp.LLAMA_CPP:
                units.append(_llama_cpp_unit(v, "decode", c, opts.decode_steps))
                continue
            rng = np.random.default_rng(c)  # the same token sequence for every variant
            reps = opts.peer_reps if v.impl == HF_ONNX_PREFILL_ONLY else opts.decode_steps
            warmup = 1 if v.impl == HF_ONNX_PREFILL_ONLY else opts.decode_warmup
            step = _decode_step(v, c, rng, vocab, opts.batch)
            units.append(Unit((v.name, "decode", c), step, reps, warmup))
    return units


def _llama_cpp_unit(v: Variant, phase: str, length: int, reps: int) -> Unit:
    """One llama-bench process per round: its first sample is the untimed run, then ``reps`` timed."""
    return Unit((v.name, phase, length), llama_cpp.RoundSamples(v.runner, phase, length, reps), reps)


def _decode_step(v: Variant, context: int, rng, vocab: int, batch: int):
    def step() -> float:
        return v.runner.decode_step(context, rng.integers(0, vocab, (batch, 1)))

    return step


def _variants(opts: BenchOptions, providers: list, tmp: Path, log, failures: list) -> list[Variant]:
    if opts.outs:
        exports = _export_names(opts.outs)
        return [onnx_variant(Path(o), name, p, opts) for o, name in exports for p in providers]
    return _default_variants(opts, providers, tmp, log, failures)


def _export_names(outs: list) -> list[tuple[Path, str]]:
    """Each export's folder name; two folders of the same name are told apart by their parents."""
    paths = [Path(o).resolve() for o in outs]
    names = [p.name for p in paths]
    return [(p, f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name) for p in paths]


def _variant_info(v: Variant) -> dict:
    return {"name": v.name, "model": v.model, "impl": v.impl, "provider": v.provider, "dtype": v.dtype,
            "weights": v.weights, "kv_cache": v.kv_cache,
            **v.params, **{k: round(x, 1) for k, x in v.memory.items()}, "note": v.note,
            "skipped": [{"phase": p, "length": n, "reason": r} for (p, n), r in v.skips.items()]}


def run_bench(opts: BenchOptions, progress=lambda *a: None, log=print) -> dict:
    """Build or open the variants, measure; ``{"conditions", "variants", "rows", "targets", "failures"}``."""
    from moe_onnx.benchmarks.report import rows
    from moe_onnx.benchmarks.targets import targets

    started = time.perf_counter()
    deadline = started + opts.time_budget_s if opts.time_budget_s else None
    providers, notes = cond.resolve_providers(opts.providers)
    _impls(opts)  # fail on a typo before minutes of work
    _shapes(opts)
    for w in opts.weights:
        weight_format(w)
    if opts.shared_threads:
        # Every session of this process on one pool: no other session's threads left spinning
        # while one is timed (python -m studies.threading_modes measures why).
        share_threads(opts.threads)
    if opts.llama_cpp:
        llama_cpp.LlamaCpp.locate(opts.llama_cpp)
        for w in opts.weights:
            llama_cpp.gguf_type(weight_format(w)[0])
        if opts.outs:
            notes.append("llama.cpp peer: only for the built-in models (it needs the HF checkpoint)")
    elif not opts.outs:
        notes.append(llama_cpp.SKIPPED)
    log(f"measuring copy bandwidth ({opts.bandwidth_gib:g} GiB, {opts.threads} threads)")
    bandwidth = copy_bandwidth(opts.bandwidth_gib, opts.threads)
    failures: list[dict] = []
    load_before = cond.load_average()
    with tempfile.TemporaryDirectory(prefix="moe-onnx-bench-") as tmp:
        variants = _variants(opts, providers, Path(tmp), log, failures)
        vocab = min(v.vocab for v in variants)
        rng = np.random.default_rng(0)  # fixed random prompts, the same for every variant
        lengths = {*opts.prompt_lens, *opts.decode_contexts}
        prompts = {n: rng.integers(0, vocab, (opts.batch, n)) for n in lengths}
        variants = _load_all(variants, opts, prompts, log, failures)
        samples = interleave(_units(variants, opts, prompts, vocab), opts.rounds, progress, deadline)
    for v in variants:  # llama.cpp's flash-attention settings, now probed for every phase and length
        if isinstance(v.runner, llama_cpp.LlamaBenchRunner):
            v.note = v.runner.note()
    stats = {key: Stats.of(flat(per_round)) for key, per_round in samples.items() if flat(per_round)}
    conditions = cond.describe(opts, bandwidth, notes, load_before)
    conditions["rounds_max"], conditions["rounds"] = opts.rounds, max(len(r) for r in samples.values())
    result_rows = rows(variants, stats, bandwidth, conditions)
    for r in result_rows:  # per-round medians, so ratios can be re-paired from the JSON
        per_round = samples.get((r["variant"], r["phase"], r["length"]), [])
        r["round_p50s_ms"] = [round(float(np.median(ts)) * 1e3, 4) for ts in per_round if ts]
    shapes = [] if opts.outs else _shapes(opts)
    return {"conditions": conditions, "variants": [_variant_info(v) for v in variants], "rows": result_rows,
            "targets": targets(samples, variants, bandwidth, shapes), "failures": failures,
            "llama_cpp": _llama_cpp_ratios(samples, variants, opts)}


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
        for impl, weights, kv_cache in itertools.product(_impls(opts), ours_weights, opts.kv_caches):
            ours = Variant(v.model, impl, v.provider, v.load, v.params, v.vocab,
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
