"""How much memory this process may use, and whether a load fits it, before onnxruntime tries.

A load that does not fit is refused with the size it needs, instead of being killed by the
out-of-memory killer half-way. The bound is the tightest of the machine's memory and the
process's cgroup limit (v1 ``memory.limit_in_bytes`` or v2 ``memory.max``), the way a container
or ``systemd-run -p MemoryMax=`` caps it.
"""

from __future__ import annotations

import os
from pathlib import Path

from moe_onnx.errors import MoeOnnxError

# Measured (the 7 B OLMoE-shaped int4 export, 4.08 GiB, onnxruntime 1.31 CPU): building the prepared
# copy (runtime/ort_cache.py, fuse then pack in two processes) succeeded under a cgroup cap of 1.3x
# the weights (5.3 GiB) and was killed at 1.15x; in one process it peaked at 2.3x.
BUILD_FACTOR = 1.3
COPY_FACTOR_QUANTIZED = 1.9
RUNTIME_OVERHEAD = 192 << 20  # onnxruntime, numpy, tokenizer, activations of a short prompt
_UNLIMITED = 1 << 60


def gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def limit() -> int:
    """Bytes this process may hold: the machine's memory or its cgroup's limit, the smaller."""
    return min(_machine_bytes(), _cgroup_limit())


def _machine_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return _UNLIMITED


def _cgroup_limit() -> int:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return _UNLIMITED
    found = _UNLIMITED
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            files = [Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"]
        elif "memory" in controllers.split(","):
            files = [Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes",
                     Path("/sys/fs/cgroup") / controllers / path.lstrip("/") / "memory.limit_in_bytes"]
        else:
            continue
        for file in files:
            try:
                text = file.read_text().strip()
            except OSError:
                continue
            if text.isdigit():
                found = min(found, int(text))
            break
    return found


def check_fits(need: int, what: str) -> None:
    """Raise :class:`MoeOnnxError` when ``need`` bytes exceed :func:`limit`."""
    have = limit()
    if need > have:
        raise MoeOnnxError(f"{what} needs about {gib(need)} of memory; this process may use "
                           f"{gib(have)} (machine or cgroup limit)")


def build_need(weights_bytes: int) -> int:
    """Memory the prepared copy's build needs for an export with these weights (an estimate)."""
    return int(weights_bytes * BUILD_FACTOR) + RUNTIME_OVERHEAD


def copied_need(weights_bytes: int, quantized: bool = False) -> int:
    """What a load that copies every weight into its own memory takes: the optimizer's fused
    ``MatMulNBits`` weights and MLAS's packing hold a quantized export's weights about twice (the
    7 B int4 export loaded as it is: 7.79 GiB for 4.08 GiB of files; a 21 B gpt-oss-shaped one
    was killed under a 20 GiB cap); a float export's are packed once."""
    return int(weights_bytes * (COPY_FACTOR_QUANTIZED if quantized else 1.0)) + RUNTIME_OVERHEAD


def resident_bytes(model: Path) -> int:
    """Bytes of ``model``'s weights that every token reads (all but the routed experts' and the
    embedding table, of which a token reads one row): what a mapped load must keep in memory to
    decode at all."""
    import onnx  # here, not at the top: the runtime's import stays free of onnx (and ml_dtypes)

    graph = onnx.load(str(model), load_external_data=False).graph
    total = 0
    for init in graph.initializer:
        if ".experts." in init.name or init.name.startswith("embed_tokens"):
            continue
        length = next((int(e.value) for e in init.external_data if e.key == "length"), None)
        total += length if length is not None else len(init.raw_data)
    return total


def mapped_need(model: Path, resident: int | None = None) -> int:
    """Least memory a load of ``model`` from mapped, file-backed weights can decode in
    (``resident``: its :func:`resident_bytes` where already known)."""
    return (resident_bytes(model) if resident is None else resident) + RUNTIME_OVERHEAD
