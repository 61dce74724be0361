"""The bench's variants: one model on one engine, and how the built-in ones are made.

A variant is a moe-onnx export with one MoE impl on one execution provider, a dense twin, PyTorch
eager, transformers' own ONNX export, or llama.cpp on the same checkpoint. Variants come in
:class:`Group` s timed in the same rounds: one built-in shape (its MoE model, the dense twins and
the peers), or the user's exports. A group is made only when the one before it is done, so only
one model's weights are in memory at a time.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from moe_onnx import dtypes, manifest
from moe_onnx.benchmarks import llama_cpp
from moe_onnx.benchmarks.memory import release_free_memory
from moe_onnx.benchmarks.models import DEFAULT_SHAPES, DENSE_FFN, TINY_SHAPES, build_model, model_names
from moe_onnx.benchmarks.options import DEFAULT_IMPLS, BenchOptions
from moe_onnx.benchmarks.peers import (
    HF_ONNX,
    HF_ONNX_PREFILL_ONLY,
    TORCH,
    TorchRunner,
    export_in_child,
    generation_runner,
    recompute_runner,
)
from moe_onnx.benchmarks.runners import onnx_runner
from moe_onnx.errors import MoeOnnxError
from moe_onnx.quantize import QuantConfig
from moe_onnx.spec import ModelSpec


@dataclass
class Variant:
    """One model on one engine, and what was learnt while loading it."""

    model: str
    impl: str
    provider: str
    load: Callable[[], object] | None  # -> a Runner (see moe_onnx.benchmarks.runners); None once done
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
    # Loaded once and kept between rounds: llama.cpp (its own process per round); onnxruntime
    # sessions and the torch checkpoint are loaded in every round and freed after their turn.
    keep_loaded: bool = False
    max_chunk: int | None = None  # the longest prefill that builds its decode pasts
    placement: str = ""  # an onnxruntime session's nodes per execution provider, once loaded

    @property
    def name(self) -> str:
        static = "/" + self.kv_cache.replace(":", "/") if self.kv_cache != "concat" else ""
        return f"{self.model}/{self.impl}{'/' + self.weights if self.weights else ''}{static}@{self.provider}"


@dataclass
class Group:
    """Variants timed in the same rounds; ``name``: the built-in shape, or ``exports``."""

    name: str
    variants: list[Variant]

    def release(self) -> None:
        """Drop every runner and loader (a loader may hold a torch checkpoint)."""
        for v in self.variants:
            v.runner = v.load = None


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


def shapes(opts: BenchOptions) -> list:
    """The built-in shapes ``opts.shapes`` names (all by default); a clear error for a typo."""
    known = TINY_SHAPES if opts.tiny else DEFAULT_SHAPES
    if opts.shapes is None:
        return list(known)
    unknown = sorted(set(opts.shapes) - {s.name for s in known})
    if unknown:
        raise MoeOnnxError(f"unknown shape(s) {', '.join(unknown)}; choose from "
                           f"{', '.join(s.name for s in known)}")
    return [s for s in known if s.name in opts.shapes]


def impls(opts: BenchOptions) -> list[str]:
    """The MoE impls to export (``DEFAULT_IMPLS`` unless asked), checked against ``MOE_IMPLS``."""
    from moe_onnx.graphs.moe import MOE_IMPLS

    chosen = opts.impls or list(DEFAULT_IMPLS)
    unknown = sorted(set(chosen) - set(MOE_IMPLS))
    if unknown:
        raise MoeOnnxError(f"unknown MoE impl(s) {', '.join(unknown)}; choose from {', '.join(MOE_IMPLS)}")
    return chosen


def gathered_bytes(impl: str, spec: ModelSpec, tokens: int, dtype: str) -> int:
    """Expert weights one layer of the weight-gather impl copies for ``tokens`` tokens (0 for other impls)."""
    if impl != "gather" or not spec.moe:
        return 0
    return tokens * spec.moe.top_k * 3 * spec.hidden_size * spec.moe.expert_size * dtypes.DTYPES[dtype].bytes


def onnx_variant(out: Path, model: str, provider: tuple[str, list[str], str], opts: BenchOptions) -> Variant:
    """A moe-onnx export on one provider (``(label, onnxruntime providers, device)``)."""
    m = manifest.read(out)
    impl = m.moe_impl or DENSE_FFN
    label = provider[0]  # the runtime resolves cpu | cuda to onnxruntime providers itself
    per_token = gathered_bytes(impl, m.spec, opts.batch, m.dtype)
    gather_chunk = max(1, int(opts.gather_limit_gb * 1e9 // per_token)) if per_token else None
    # Decode pasts are built by prefills no longer than the longest timed prompt: onnxruntime's
    # arena keeps a session's peak (one prefill of a 2,000-token context per session took a
    # bench that held every session at once past this machine's 24 GiB).
    longest = max(opts.prompt_lens)
    max_chunk = min(gather_chunk, longest) if gather_chunk else longest

    def load():
        return onnx_runner(out, label, opts.threads, max_chunk, opts.tf32)

    variant = Variant(model, impl, label, load, m.params, m.spec.vocab_size, m.dtype,
                      weights_label(m.weights, m.block_size) if m.block_size else "", m.bytes_per_token,
                      kv_cache=m.kv_cache + (f":{m.kv_dtype}" if m.kv_dtype else ""), max_chunk=max_chunk)
    for n in opts.prompt_lens:
        if gather_chunk and n > gather_chunk:
            variant.skips[("prefill", n)] = (
                f"prefill {n} skipped: the weight gather would copy {per_token * n / 1e9:.1f} GB of expert "
                f"weights per layer (limit {opts.gather_limit_gb:g} GB); its decode pasts are built in "
                f"chunks of {max_chunk}")
    return variant


def export_names(outs: list) -> list[tuple[Path, str]]:
    """Each export's folder name; two folders of the same name are told apart by their parents."""
    paths = [Path(o).resolve() for o in outs]
    names = [p.name for p in paths]
    return [(p, f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name) for p in paths]


def groups(opts: BenchOptions, providers: list, tmp: Path, log, failures: list) -> Iterator[Group]:
    """The user's exports as one group, or one group per built-in shape, each made when asked for."""
    if opts.outs:
        yield Group("exports", [onnx_variant(o, name, p, opts) for o, name in export_names(opts.outs)
                                for p in providers])
        return
    for shape in shapes(opts):
        yield _shape_group(shape, opts, providers, tmp / shape.name, log, failures)


def _shape_group(shape, opts: BenchOptions, providers: list, tmp: Path, log, failures: list) -> Group:
    """The shape's models built one at a time (the MoE last) and exported, each freed once
    exported; the peers rebuild the MoE model when their turn comes (llama.cpp converts it saved)."""
    import moe_onnx

    tmp.mkdir(parents=True, exist_ok=True)
    log(f"building random-weight models for the {shape.name} shape")
    by_model, checkpoint = {}, None
    for name in reversed(model_names(shape)):
        model = build_model(shape, name)
        by_model[name] = []
        for impl in impls(opts) if name.endswith("-moe") else ["auto"]:
            for weights, kv_cache in itertools.product(opts.weights, opts.kv_caches):
                log(f"exporting {name} (moe_impl={impl}, weights={weights}, kv_cache={kv_cache})")
                kind, _, kv_dtype = kv_cache.partition(":")
                where = tmp / f"{name}-{impl}-{weights.replace(':', 'b')}-{kind}-{kv_dtype}"
                out = moe_onnx.export(model, where, moe_impl=impl, **weight_export_options(weights),
                                      kv_cache=kind, kv_dtype=kv_dtype or None)
                by_model[name] += [onnx_variant(out, name, p, opts) for p in providers]
        if name.endswith("-moe") and opts.llama_cpp:
            checkpoint = llama_cpp.save_checkpoint(model, tmp / f"{name}-hf")
        del model  # freed before the next one is built (gc: a model's modules refer to each other)
        gc.collect()
        release_free_memory()
    name = model_names(shape)[0]
    variants = [v for n in model_names(shape) for v in by_model[n]]
    params, vocab = by_model[name][-1].params, by_model[name][-1].vocab
    if opts.peers:
        variants += _peer_variants(shape, name, params, vocab, opts, tmp, log, failures)
    if opts.llama_cpp:
        variants += _llama_cpp_variants(name, checkpoint, params, vocab, shape, opts, tmp, log, failures)
    return Group(shape.name, variants)


def _peer_variants(shape, name: str, params: dict, vocab: int, opts: BenchOptions, tmp: Path, log,
                   failures: list) -> list:
    """PyTorch eager and transformers' export, each on the MoE model rebuilt from its seed when
    needed (the same weights as the exports'), so no checkpoint stays in memory between turns."""
    import torch

    def eager_runner():
        return TorchRunner(build_model(shape, name), opts.threads)

    eager = Variant(name, TORCH, "cpu", eager_runner, params, vocab,
                    note=f"torch {torch.__version__}, default experts implementation")
    log(f"exporting {name} with transformers' OnnxExporter.export_for_generation (a child process)")
    try:
        path = export_in_child(shape.name, opts.tiny, name, tmp / f"{name}-transformers-onnx")
        return [eager, Variant(name, HF_ONNX, "cpu", lambda: generation_runner(path, opts.threads), params,
                               vocab, note="export_for_generation: prefill + decode graphs with a KV cache")]
    except RuntimeError as err:  # a peer failing is a finding, not a crash
        failures.append({"variant": f"{name}/{HF_ONNX}", "reason": str(err)})
        log(f"transformers' export_for_generation failed on {name}: {err}")
    try:  # the plain export, labelled for what it is
        path = export_in_child(shape.name, opts.tiny, name, tmp / f"{name}-transformers-onnx-prefill-only",
                               generation=False)
    except RuntimeError as err:
        failures.append({"variant": f"{name}/{HF_ONNX_PREFILL_ONLY}", "reason": str(err)})
        return [eager]
    hf = Variant(name, HF_ONNX_PREFILL_ONLY, "cpu", lambda: recompute_runner(path, opts.threads), params,
                 vocab, note="prefill-only graph (no past inputs): decode = recompute context+1 tokens")
    return [eager, hf]


def _llama_cpp_variants(name: str, checkpoint: Path, params: dict, vocab: int, shape, opts: BenchOptions,
                        tmp: Path, log, failures: list) -> list[Variant]:
    """The same checkpoint in GGUF at each of ``opts.weights`` (f32, q8_0, q4_0), timed by llama-bench."""
    llama = llama_cpp.LlamaCpp.locate(opts.llama_cpp)
    if opts.batch != 1:
        failures.append({"variant": f"{name}/{llama_cpp.LLAMA_CPP}",
                         "reason": "llama-bench runs batch 1 only"})
        return []
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
            vocab, weights=kind, bytes_per_token=summary["bytes_per_token"],
            note=llama_cpp.describe(llama, summary), keep_loaded=True))
        variants[-1].memory["gguf"] = summary  # popped after warming: the note then says what llama-bench ran
    return variants
