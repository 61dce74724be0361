"""Will ``moe-onnx bench`` fit in memory? An estimate before any work, and a refusal if not.

The bench holds one model's weights at a time: each onnxruntime session (and the torch eager
peer's checkpoint) is loaded, run and freed within every round, the built-in models are built
and exported one after another, and transformers' export runs in a child process. So its peak
is this process as it stands plus the largest of:

- a session: its weight bytes, its KV caches (every decode context's, kept while it is loaded),
  the weight gather's copied experts, and activations (``ACTIVATIONS`` x its fp32 weight bytes
  at a 256-token prefill, in proportion to the longest prefill it runs); transformers' generation
  export: its prefill or its decode graph's session, each with every weight (``GENERATION_COPIES``);
- a torch checkpoint being built and exported, or run by the eager peer (``TORCH_COPIES`` x it);
- transformers' export in its child process: the imports, and ``EXPORT_COPIES`` x the checkpoint;
- the copy-bandwidth test's two arrays.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from moe_onnx import dtypes, manifest
from moe_onnx.benchmarks.memory import rss_mb
from moe_onnx.benchmarks.models import MoeShape, model_names, parameter_count
from moe_onnx.benchmarks.options import BenchOptions
from moe_onnx.benchmarks.peers import HF_ONNX
from moe_onnx.errors import MoeOnnxError

# Measured 2026-12-05 (2-core Xeon, onnxruntime 1.31), RSS growth of load + one 256-token prefill
# + pasts of 64 and 512 over the fp32 weights of the coarse shape: dispatch 0.13x, fused 0.14x,
# the dense impl and the dense twins 0.28-0.36x. 0.5 leaves room for another machine's kernels.
ACTIVATIONS = 0.5
IMPORTS_MB = 400.0  # torch + transformers' exporter, when this process has not imported them (380 measured)
# Measured 2026-12-05 on the fine shape (450 MB fp32): building the model took 570 MB and running
# it (the eager peer, 256-token prefill) more; transformers' export for generation 190 MB more.
TORCH_COPIES = 1.6
EXPORT_COPIES = 1.6
# transformers' generation export is two graphs, prefill and decode, each with every weight; one
# session is held at a time. Both at once took 1,453 MB for the fine MoE's 450 MB (1,018 for the
# coarse one's 323): one, 1.6x.
GENERATION_COPIES = 1.6
_BASE_PREFILL = 256


@dataclass(frozen=True)
class Estimate:
    """The peak RSS foreseen, MB, and what it is made of."""

    peak_mb: float
    process_mb: float  # this process now (and the imports still to come)
    group: str  # the group whose peak it is (a shape, or "exports")
    largest_mb: float  # its largest session, checkpoint or export
    largest: str  # what that is


def _session_mb(weights_mb: float, fp32_mb: float, kv_mb: float, gather_mb: float, chunk: int) -> float:
    return weights_mb + kv_mb + gather_mb + ACTIVATIONS * fp32_mb * max(1.0, chunk / _BASE_PREFILL)


def _weights_mb(params: int, embedding: int, weights: str) -> float:
    """fp32, or int8/int4 with one fp32 scale per block (the embedding counted at fp32: an upper bound)."""
    from moe_onnx.benchmarks.variants import weight_format

    fmt, block = weight_format(weights)
    if fmt == "fp32":
        return 4 * params / 1e6
    bits = 8 if fmt == "int8" else 4
    per_param = bits / 8 + 4 / (block or 32)
    return ((params - embedding) * per_param + 4 * embedding) / 1e6


def _kv_mb(layers: int, kv_heads: int, head_dim: int, opts: BenchOptions, kv_cache: str) -> float:
    width = 2 if kv_cache.endswith(":fp16") else 4
    positions = sum(c + 1 for c in opts.decode_contexts)
    return layers * 2 * opts.batch * kv_heads * head_dim * positions * width / 1e6


def _shape_sessions(shape: MoeShape, opts: BenchOptions, impls: list[str]) -> dict[str, float]:
    """``{what: MB}`` of one built-in shape: its sessions, checkpoints and exports."""
    head_dim = shape.hidden // shape.heads
    longest = max(opts.prompt_lens)
    sessions = {}
    for name in model_names(shape):
        params = parameter_count(shape, name)
        fp32 = 4 * params / 1e6
        sessions[f"{name}: torch checkpoint"] = TORCH_COPIES * fp32
        for impl in impls if name.endswith("-moe") else ["auto"]:
            gather = min(opts.gather_limit_gb * 1e3, opts.batch * longest * shape.top_k * 3 * shape.hidden
                         * shape.expert_width * 4 / 1e6) if impl == "gather" else 0.0
            for weights in opts.weights:
                for kv_cache in opts.kv_caches:
                    kv = _kv_mb(shape.layers, shape.kv_heads, head_dim, opts, kv_cache)
                    stored = _weights_mb(params, 2 * shape.vocab * shape.hidden, weights)
                    sessions[f"{name}/{impl}/{weights}/{kv_cache}"] = _session_mb(stored, fp32, kv, gather,
                                                                                   longest)
    moe = 4 * parameter_count(shape, f"{shape.name}-moe") / 1e6
    if opts.peers:
        sessions[f"{shape.name}-moe/{HF_ONNX}"] = GENERATION_COPIES * moe
        sessions[f"{shape.name}-moe: transformers' export (child process)"] = IMPORTS_MB + EXPORT_COPIES * moe
    return sessions


def _export_sessions(outs: list[Path], opts: BenchOptions) -> dict[str, float]:
    sessions = {}
    for out in outs:
        m = manifest.read(out)
        (kv_heads, head_dim), _ = m.kv_dims
        files = sum(f.stat().st_size for f in Path(out).glob("model.onnx*")) / 1e6
        kv_cache = m.kv_cache + (f":{m.kv_dtype}" if m.kv_dtype else "")
        fp32 = m.params["total"] * dtypes.DTYPES["fp32"].bytes / 1e6
        kv = _kv_mb(m.spec.num_layers, kv_heads, head_dim, opts, kv_cache)
        sessions[str(out)] = _session_mb(files, fp32, kv, 0.0, max(opts.prompt_lens))
    return sessions


def estimate(opts: BenchOptions, shapes: list[MoeShape], impls: list[str]) -> Estimate:
    """The bench's peak RSS (its process and a child's) as foreseen before it does anything."""
    process = rss_mb() + (0.0 if "torch" in sys.modules or opts.outs else IMPORTS_MB)
    if opts.outs:
        parts = [("exports", _export_sessions(opts.outs, opts))]
    else:
        parts = [(s.name, _shape_sessions(s, opts, impls)) for s in shapes]
    for _, sessions in parts:  # the copy test's two arrays, before any model
        sessions["the copy-bandwidth test"] = 2 * opts.bandwidth_gib * (1 << 30) / 1e6
    group, sessions = max(parts, key=lambda part: max(part[1].values()))
    largest = max(sessions, key=sessions.get)
    return Estimate(process + sessions[largest], process, group, sessions[largest], largest)


def check(opts: BenchOptions, shapes: list[MoeShape], impls: list[str], variant_set: str) -> Estimate:
    """The estimate, or a :class:`MoeOnnxError` naming ``variant_set`` when it exceeds
    ``opts.max_memory_gb`` (by default: the memory available now, plus this process's own)."""
    est = estimate(opts, shapes, impls)
    if opts.max_memory_gb is not None:
        limit, what = opts.max_memory_gb * 1e3, f"--max-memory {opts.max_memory_gb:g} GB"
    else:
        limit = psutil.virtual_memory().available / 1e6 + rss_mb()
        what = "the memory available now"
    if est.peak_mb > limit:
        raise MoeOnnxError(
            f"the variant set ({variant_set}) needs an estimated {est.peak_mb:,.0f} MB at its peak, "
            f"more than {what} ({limit:,.0f} MB): this process {est.process_mb:,.0f} MB + the largest "
            f"model it holds at a time ({est.largest}) {est.largest_mb:,.0f} MB. Run fewer or smaller "
            "variants (--shapes, --impls, --weights int4, --no-peers, shorter --prompt-lens), or raise "
            "--max-memory if the estimate is wrong")
    return est
