"""The conditions every bench output states: machine, engines, providers, threads, batch, dtype."""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata

import psutil

from moe_onnx.runtime.providers import CPU, CUDA, PLUGINS, ProviderError, cuda_usable, resolve

CUDA_MISSING = (
    "the CUDA execution provider is not usable here (no GPU, or CUDA 13 / cuDNN 9 libraries missing)"
)


def resolve_providers(requested: list[str]) -> tuple[list[tuple[str, list[str], str]], list[str]]:
    """``(label, onnxruntime providers, device)`` per provider asked for, and notes on what was skipped.

    ``cuda`` where CUDA cannot run is an error; ``auto`` means CPU, plus CUDA when it is usable.
    ``openvino`` and ``webgpu`` (onnxruntime's plugin EPs) must be installed and have a device: the
    runtime places the graph there and says which nodes fell back to the CPU provider. ``wasm`` is
    onnxruntime-web in Node (node and the npm package must be there).
    """
    chosen, notes = [], []
    for name in dict.fromkeys(requested):
        if name not in ("cpu", "cuda", "auto", *PLUGINS, "wasm"):
            raise ProviderError(f"unknown provider {name!r}; --providers takes cpu, cuda, auto, "
                                + ", ".join(PLUGINS) + ", wasm")
        if name == "wasm":  # onnxruntime-web in Node: the exports the user gave, batch 1
            from moe_onnx.benchmarks.wasm import wasm_usable

            why = wasm_usable()
            if why:
                raise ProviderError(f"--providers wasm: {why}")
            chosen.append(("wasm", [], "cpu"))
            continue
        if name in PLUGINS:
            placement = resolve(name)  # a ProviderError naming what is missing
            chosen.append((name, [placement.ep, CPU], "cpu"))  # the KV cache between steps: host memory
            continue
        if name in ("cpu", "auto"):
            chosen.append(("cpu", [CPU], "cpu"))
        if name in ("cuda", "auto"):
            if cuda_usable():
                chosen.append(("cuda", [CUDA, CPU], "cuda"))
            elif name == "cuda":
                raise ProviderError(f"--providers cuda: {CUDA_MISSING}; use cpu or auto")
            else:
                notes.append(f"cuda skipped: {CUDA_MISSING}")
    unique = list({label: (label, p, d) for label, p, d in chosen}.values())
    return unique, notes


def load_average() -> list[float]:
    """1-, 5- and 15-minute load averages (other jobs on a shared machine show here)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe(opts, bandwidth_gbs: float, notes: list[str], load_before: list[float]) -> dict:
    """The conditions block of a bench result."""
    memory_gib = psutil.virtual_memory().total / 2**30
    packages = ("onnxruntime-gpu", "onnxruntime", "torch", "transformers", "numpy")
    return {
        "machine": f"{_cpu_name()}, {os.cpu_count()} logical cores, {memory_gib:.0f} GiB",
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {p: _version(p) for p in packages},
        "threads": opts.threads,
        "shared_thread_pool": opts.shared_threads,
        "cuda_tf32": opts.tf32,
        "batch": opts.batch,
        "providers": opts.providers,
        "prompt_lens": opts.prompt_lens,
        "decode_contexts": opts.decode_contexts,
        "rounds": opts.rounds,
        "time_budget_s": opts.time_budget_s,
        "prefill_reps": opts.prefill_reps,
        "decode_steps": opts.decode_steps,
        "decode_warmup": opts.decode_warmup,
        "peer_reps": opts.peer_reps,
        "copy_bandwidth_gbs": round(bandwidth_gbs, 2),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "notes": notes,
    }
