"""``moe-onnx bench``: every variant x provider, prefill and decode, interleaved in rounds.

A variant is one model in one runner: our export with one MoE impl, a dense twin, PyTorch eager,
or transformers' own ONNX export. Each round visits every variant once per measurement (one
untimed run first, then the timed ones), so slow drift of this shared machine hits all alike.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from moe_onnx.benchmarks.measure import (
    OnnxRunner,
    PrefillOnlyRunner,
    Stats,
    TorchRunner,
    copy_bandwidth,
)
from moe_onnx.benchmarks.shapes import DEFAULT_SHAPES, TINY_SHAPES


@dataclass
class BenchOptions:
    outs: list[Path] = field(default_factory=list)  # user exports; empty = the embedded default
    providers: list[str] = field(default_factory=lambda: ["cpu"])
    impls: list[str] | None = None  # MoE impls for the default models (None = all)
    batch: int = 1
    prompt_lens: list[int] = field(default_factory=lambda: [32, 256])
    decode_contexts: list[int] = field(default_factory=lambda: [64, 512])
    decode_steps: int = 16
    prefill_runs: int = 2
    rounds: int = 3
    threads: int = 2
    peers: bool = True
    tiny: bool = False  # tiny shapes, for tests


@dataclass
class Variant:
    name: str  # e.g. "coarse-moe/dispatch@cpu"
    model: str
    impl: str
    provider: str
    runner: object
    params: dict
    spec: dict
    extra: dict = field(default_factory=dict)


def _session(path: Path, provider: str, threads: int):
    import onnxruntime as ort

    from moe_onnx.runtime.providers import resolve

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=resolve(provider))


def _onnx_variant(out: Path, model: str, impl: str, provider: str, threads: int) -> Variant:
    manifest = json.loads((out / "moe_onnx.json").read_text())
    before = psutil.Process().memory_info().rss
    session = _session(out / "model.onnx", provider, threads)
    kv = np.float16 if manifest["dtype"] == "fp16" else np.float32
    variant = Variant(f"{model}/{impl}@{provider}", model, impl, provider, OnnxRunner(session, manifest["spec"], kv),
                      manifest["params"], manifest["spec"])
    variant.extra["session_rss_mb"] = (psutil.Process().memory_info().rss - before) / 1e6
    return variant


def _hf_exporter_variant(model, name: str, params: dict, spec: dict, tmp: Path, threads: int) -> Variant:
    """transformers' own exporter, used plainly: batch-1, prefill-only, no past inputs."""
    import torch
    from transformers.exporters.exporter_onnx import OnnxConfig, OnnxExporter

    sample = {"input_ids": torch.randint(0, model.config.vocab_size, (1, 8))}
    exported = OnnxExporter().export(model, sample, config=OnnxConfig(dynamic=True))
    exported.save_pretrained(tmp / f"{name}-hf")
    session = _session(tmp / f"{name}-hf" / "model.onnx", "cpu", threads)
    return Variant(f"{name}/transformers-onnx@cpu", name, "transformers-onnx", "cpu", PrefillOnlyRunner(session), params, spec)


def build_variants(opts: BenchOptions, tmp: Path, log) -> list[Variant]:
    """Exports (or opens) every variant; peers are added where installed."""
    if opts.outs:
        variants = []
        for out in opts.outs:
            manifest = json.loads((Path(out) / "moe_onnx.json").read_text())
            for provider in opts.providers:
                variants.append(_onnx_variant(Path(out), Path(out).name, manifest.get("moe_impl") or "dense-ffn", provider, opts.threads))
        return variants
    return _default_variants(opts, tmp, log)


def _default_variants(opts: BenchOptions, tmp: Path, log) -> list[Variant]:
    import moe_onnx
    from moe_onnx.benchmarks.shapes import build_models
    from moe_onnx.graphs.moe import MOE_IMPLS

    variants = []
    for shape in TINY_SHAPES if opts.tiny else DEFAULT_SHAPES:
        for name, model in build_models(shape).items():
            impls = (opts.impls or list(MOE_IMPLS)) if name.endswith("-moe") else ["dense-ffn"]
            for impl in impls:
                log(f"exporting {name} ({impl})")
                out = moe_onnx.export(model, tmp / f"{name}-{impl}", moe_impl="auto" if impl == "dense-ffn" else impl)
                for provider in opts.providers:
                    variants.append(_onnx_variant(out, name, impl, provider, opts.threads))
            if opts.peers and name.endswith("-moe"):
                params, spec = variants[-1].params, variants[-1].spec
                variants.append(Variant(f"{name}/torch-eager@cpu", name, "torch-eager", "cpu",
                                        TorchRunner(model, opts.threads), params, spec))
                try:
                    log(f"exporting {name} with transformers' OnnxExporter")
                    variants.append(_hf_exporter_variant(model, name, params, spec, tmp, opts.threads))
                except Exception as err:  # noqa: BLE001 - a peer failing is a finding, not a crash
                    log(f"transformers' OnnxExporter failed on {name}: {type(err).__name__}: {str(err)[:200]}")
    return variants


def measure(variants: list[Variant], opts: BenchOptions, progress) -> dict:
    """Timings per (variant, phase, length), interleaved in rounds."""
    rng = np.random.default_rng(0)
    samples: dict[tuple, list[float]] = {}
    tasks = [("prefill", n) for n in opts.prompt_lens] + [("decode", c) for c in opts.decode_contexts]
    total, done = opts.rounds * len(tasks) * len(variants), 0
    for _ in range(opts.rounds):
        for phase, length in tasks:
            for v in variants:
                ids = rng.integers(0, v.spec["vocab_size"], size=(opts.batch, length))
                if phase == "prefill":
                    v.runner.prefill(ids)  # untimed: settles this session's caches and allocator
                    times = [v.runner.prefill(ids)[0] for _ in range(opts.prefill_runs)]
                else:
                    times = v.runner.decode(ids, opts.decode_steps)
                samples.setdefault((v.name, phase, length), []).extend(times)
                done += 1
                progress(done, total, f"{phase} {length} {v.name}")
    return {key: Stats.of(ts) for key, ts in samples.items()}


def conditions(opts: BenchOptions, bandwidth: float) -> dict:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"machine": f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
            "python": sys.version.split()[0], "onnxruntime": onnxruntime.__version__, "threads": opts.threads,
            "batch": opts.batch, "dtype": "fp32", "providers": opts.providers, "rounds": opts.rounds,
            "decode_steps": opts.decode_steps, "copy_bandwidth_gbs": round(bandwidth, 2)}


def run_bench(opts: BenchOptions, progress=lambda *a: None, log=print) -> dict:
    """Build or open the variants, measure, and return ``{"conditions", "rows", "checks"}``."""
    from moe_onnx.benchmarks.report import checks, rows

    bandwidth = copy_bandwidth(0.25 if opts.tiny else 1.0)
    with tempfile.TemporaryDirectory(prefix="moe-onnx-bench-") as tmp:
        variants = build_variants(opts, Path(tmp), log)
        stats = measure(variants, opts, progress)
    result_rows = rows(variants, stats, bandwidth, opts.batch)
    return {"conditions": conditions(opts, bandwidth), "rows": result_rows,
            "checks": [] if opts.outs else checks(result_rows, TINY_SHAPES if opts.tiny else DEFAULT_SHAPES)}
