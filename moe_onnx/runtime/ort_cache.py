"""A prepared copy of an export for onnxruntime's CPU provider, made once and mapped at every load.

onnxruntime maps an export's external data from the file, but its optimizer writes each fused
weight (``DequantizeLinear`` + ``MatMul`` -> ``MatMulNBits``) into a new buffer and MLAS packs it
once more: the 7 B int4 export held 7.8 GiB of anonymous memory for 4.1 GiB of files and took 35 s
to load. The prepared copy is the graph as onnxruntime optimized it, saved with its pre-packed
weights as external data (``optimized_model_filepath`` +
``session.save_external_prepacked_constant_initializers``). Loaded with the optimizer off, its
weights stay file-backed pages: shared, reclaimable under a memory cap, read only where a token
needs them (a MoE's unrouted experts are never touched), and the load skips the optimizer.

What a load still costs: onnxruntime packs every weight again at each session's creation (it finds
the saved buffer by the hash of the one it packs), on the session's threads
(``session.prepack.enable_parallel``, :mod:`moe_onnx.runtime.threads`): 2.75 s for the 7 B int4
export on 2 threads. :func:`realign` keeps what only that packing reads apart from what decoding
reads, so that a cold load reads the one and the first tokens the experts they route to
(``python -m studies.load_time``).

The copy is onnxruntime- and CPU-specific (MLAS packs for the instruction set it finds), so it is
keyed by the export's fingerprint, the onnxruntime version and the CPU's features, and rebuilt
with one warning when any differs; ``model.onnx`` itself is never changed. It lives in
``OUT/ort-cache/`` (or, for a read-only export, under the user cache directory), is written in a
temporary folder and renamed into place with its key written last, and is built by two child
processes (fuse, then pack), each holding about the weights once in anonymous memory; a child that
a memory cap kills is reported as an error instead of taking the caller down.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

from moe_onnx import manifest
from moe_onnx.errors import MoeOnnxError
from moe_onnx.runtime import memory

log = logging.getLogger("moe_onnx.runtime")

FORMAT = 3  # 2: blobs in reading order, superseded weights last; 3: and the scales with them
DIRNAME = "ort-cache"
KEY_FILE = "cache.json"
MODES = ("auto", "on", "off")
AUTO_MIN_BYTES = 256 << 20  # below this a load's copies cost little: "auto" leaves the export as it is
_SAMPLES, _SAMPLE_BYTES = 64, 64 << 10


def cache_dir(out: Path) -> Path | None:
    """Where the prepared copy of ``out`` lives: beside the export when it is writable, else in the
    user cache directory; None when neither can be written."""
    beside = out / DIRNAME
    if beside.is_dir() and _writable(beside) or not beside.exists() and _writable(out):
        return beside
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moe-onnx" / DIRNAME
    name = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return base / name if _writable(base) else None


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def key(out: Path) -> dict:
    """What the prepared copy depends on: the export (graph, manifest, sampled weight bytes),
    onnxruntime's version and the CPU's instruction set."""
    export = hashlib.sha256((out / "model.onnx").read_bytes())
    export.update((out / manifest.FILENAME).read_bytes())
    data = manifest.data_file(out)
    if data.is_file():
        _sample(data, export)
    return {"format": FORMAT, "export": export.hexdigest(), "onnxruntime": ort.__version__,
            "cpu": cpu_fingerprint()}


def _sample(path: Path, digest) -> None:
    """Hash the size and evenly spaced slices of a weights file: a re-export changes them, and
    reading 4 MiB of a 4 GiB file keeps the check well under a second, even from a cold disk."""
    size = path.stat().st_size
    digest.update(str(size).encode())
    with path.open("rb") as f:
        for i in range(_SAMPLES):
            f.seek(size * i // _SAMPLES)
            digest.update(f.read(_SAMPLE_BYTES))


def cpu_fingerprint() -> str:
    """The machine and its CPU feature flags: MLAS picks its packing by them."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1] for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    features = " ".join(sorted(flags.split()))
    return f"{platform.machine()}-{hashlib.sha256(features.encode()).hexdigest()[:16]}"


def lookup(out: Path) -> tuple[Path | None, str]:
    """The prepared model of ``out`` when a valid one exists, and why not otherwise."""
    where = cache_dir(out)
    if where is None:
        return None, "no writable place for it"
    stored = _read_key(where / KEY_FILE)
    if stored is None:
        return None, "none built yet" if not where.exists() else "an incomplete copy"
    wanted = key(out)
    stale = [k for k in wanted if stored.get(k) != wanted[k]]
    if stale:
        return None, "stale: its " + ", ".join(f"{k} differs ({stored.get(k)} != {wanted[k]})"
                                               if k != "export" else "export differs" for k in stale)
    model = where / "model.onnx"
    return (model, "valid") if model.is_file() else (None, "an incomplete copy")


def _read_key(path: Path) -> dict | None:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) else None


def _recorded(model: Path, name: str) -> int | None:
    """A figure the build of the prepared copy ``model`` wrote beside its key (None before it did)."""
    value = (_read_key(model.with_name(KEY_FILE)) or {}).get(name)
    return value if isinstance(value, int) else None


def resident_bytes(model: Path) -> int | None:
    """The export's :func:`memory.resident_bytes`, as the build of the prepared copy ``model``
    recorded it (None for a copy built before it did): a load then needs no parse of the graph."""
    return _recorded(model, "resident_bytes")


def packing_bytes(model: Path, threads: int) -> int:
    """What a load of the prepared copy ``model`` holds for a moment beyond its mapped weights: each
    packing thread packs a weight again before it finds the saved buffer (at most the largest)."""
    return (_recorded(model, "largest_packed_bytes") or 0) * max(1, threads)


def prepared_model(out: Path, mode: str = "auto") -> Path | None:
    """The model file a CPU session of ``out`` should load: the prepared copy (built now when it is
    missing or stale), or None to load ``out/model.onnx`` as it is.

    ``mode``: "on" always uses the copy; "auto" uses it for exports whose weights reach
    :data:`AUTO_MIN_BYTES`; "off" never does. A copy that cannot be stored (read-only export and
    no user cache directory) is skipped with a warning."""
    if mode not in MODES:
        raise MoeOnnxError(f"ort_cache must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off" or mode == "auto" and weights_bytes(out) < AUTO_MIN_BYTES:
        return None
    model, why = lookup(out)
    if model is not None:
        return model
    where = cache_dir(out)
    if where is None:
        log.warning("moe-onnx: no onnxruntime cache for %s: neither it nor the user cache directory "
                    "is writable; loading without one (more memory, slower load)", out)
        return None
    if why != "none built yet":
        log.warning("moe-onnx: the onnxruntime cache of %s is %s; rebuilding it", out, why)
    else:  # minutes for a model of several GB: say what the wait is for, once
        log.warning("moe-onnx: preparing %s for onnxruntime once, into %s (later loads map it)", out, where)
    build(out, where)
    return where / "model.onnx"


def weights_bytes(out: Path) -> int:
    """Bytes of the export's weights file (the graph file's when it has none)."""
    data = manifest.data_file(out)
    return data.stat().st_size if data.is_file() else (out / "model.onnx").stat().st_size


def build(out: Path, where: Path) -> None:
    """Build the prepared copy of ``out`` into ``where`` (replacing what is there)."""
    need = memory.build_need(weights_bytes(out))
    memory.check_fits(memory.copied_need(weights_bytes(out)),
                      f"preparing {out} for onnxruntime (a one-time build of {DIRNAME}/)")
    where.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(out, where.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{where.name}.", dir=where.parent))
    try:
        # two children, one stage each, so that the fused weights of the first are freed before
        # the second packs them: ~1x the weights in anonymous memory at a time, not ~2x
        fused = tmp / "fused"
        fused.mkdir()
        for stage, src, dest in (("fuse", out / "model.onnx", fused), ("pack", fused / "model.onnx", tmp)):
            _run_stage(stage, src, dest, out, need)
        shutil.rmtree(fused)  # before the realign, which needs disk of its own
        try:
            largest = realign(tmp / "model.onnx")
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise _disk_full(out, where) from None
        stored = {**key(out), "resident_bytes": memory.resident_bytes(out / "model.onnx"),
                  "largest_packed_bytes": largest}
        (tmp / KEY_FILE).write_text(json.dumps(stored, indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it private; the export's other readers need it too
        old = where.with_name(where.name + ".old")
        if where.exists():
            shutil.rmtree(old, ignore_errors=True)
            where.rename(old)
        tmp.rename(where)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_export(out) -> str:
    """Make sure ``out`` has a valid prepared copy (build it when missing or stale); say where."""
    out = Path(out)
    if not (out / "model.onnx").is_file() or not (out / manifest.FILENAME).is_file():
        raise MoeOnnxError(f"{out} is not a moe-onnx export (no model.onnx and {manifest.FILENAME})")
    model = prepared_model(out, "on")
    if model is None:
        raise MoeOnnxError(f"no place to store the onnxruntime copy of {out}: neither it nor the user "
                           "cache directory is writable")
    size = sum(f.stat().st_size for f in model.parent.iterdir())
    return f"prepared {model.parent} ({memory.gib(size)}, onnxruntime {ort.__version__})"


# The copy holds the fused weights and their pre-packed buffers (2.17x the export's weights for the
# 7 B int4 export), and the fuse stage's output (about 1x) lies beside it until the pack stage ends.
DISK_FACTOR = 3.3


def _check_disk(out: Path, folder: Path) -> None:
    need, free = int(weights_bytes(out) * DISK_FACTOR), shutil.disk_usage(folder).free
    if need > free:
        raise MoeOnnxError(f"preparing {out} for onnxruntime needs about {memory.gib(need)} of disk in "
                           f"{folder} while it builds ({memory.gib(free)} free); free some, or load with "
                           "ort_cache='off'")


def _disk_full(out: Path, where: Path) -> MoeOnnxError:
    return MoeOnnxError(f"cannot prepare {out} for onnxruntime: the disk of {where.parent} filled up while "
                        f"it wrote the copy ({memory.gib(weights_bytes(out) * DISK_FACTOR)} needed while it "
                        "builds); free some, or load with ort_cache='off'")


def _run_stage(stage: str, src: Path, dest: Path, out: Path, need: int) -> None:
    done = subprocess.run([sys.executable, "-m", __name__, stage, str(src), str(dest)],
                          capture_output=True, text=True)
    if done.returncode in (-9, 137):
        raise MoeOnnxError(f"cannot prepare {out} for onnxruntime: its {stage} stage was killed (out of "
                           f"memory?); it needs about {memory.gib(need)} of memory")
    if done.returncode != 0:
        if "No space left on device" in done.stderr or "Disk quota exceeded" in done.stderr:
            raise _disk_full(out, dest if stage == "pack" else dest.parent)
        detail = (done.stderr.strip().splitlines() or ["no message"])[-1][:300]
        raise MoeOnnxError(f"cannot prepare {out} for onnxruntime: its {stage} stage failed: {detail}")


def _stage(stage: str, src: Path, dest: Path) -> None:
    """One build stage, in its own process: ``fuse`` saves the graph as onnxruntime optimizes it
    (``MatMulNBits`` and the other fusions), ``pack`` loads that graph as it is and saves it again
    with its kernels' pre-packed weights."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(dest / "model.onnx")
    entries = {"session.optimized_model_external_initializers_file_name": "model.onnx.data",
               "session.optimized_model_external_initializers_min_size_in_bytes": "1024"}
    if stage == "fuse":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        entries["session.disable_prepacking"] = "1"
    else:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        entries["session.save_external_prepacked_constant_initializers"] = "1"
    for name, value in entries.items():
        options.add_session_config_entry(name, value)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


def realign(model_path: Path, align: int = 4096) -> int:
    """Rewrite ``model_path``'s external data with every blob (weights and pre-packed buffers) at an
    ``align``-byte offset, in two regions: what decoding reads, then what only loading reads.

    onnxruntime writes them back to back, and maps the file: a pre-packed buffer at an odd offset
    reaches MLAS misaligned, which crashed a tiny int4 MoE (its 1,662-byte buffers). Page-aligned
    blobs are also what the kernel's readahead and eviction work in.

    The first region holds the blobs a decoding session reads, layer by layer and expert by expert
    (an expert's projections side by side, so that a routed expert that left memory comes back in
    one read). The second holds what onnxruntime reads only while it makes the session, in the
    order of the nodes that read it: the weights the pre-packed buffers replace (every load packs
    them again, and finds the saved buffer by the result) and the ``MatMulNBits`` scales the
    packing folds into its buffer. Kept apart, a cold load reads little beyond the second region,
    whereas with the two interleaved, the kernel's read-around of each of the packing's reads
    (8 MiB here) pulled every pre-packed buffer from the disk as well (9.3 GB for the 7 B export).

    Returns the largest pre-packed buffer's size: a load packs that much again for a moment, once
    per packing thread."""
    import onnx  # only a build reads the graph: a load of a ready copy never imports onnx

    model = onnx.load(str(model_path), load_external_data=False)
    data = model_path.with_name("model.onnx.data")
    fresh = data.with_name(data.name + ".aligned")
    inits = sorted((i for i in model.graph.initializer if i.external_data), key=lambda i: _natural(i.name))
    later = _read_at_load(model.graph, inits)
    punch = [_disjoint(inits)]  # a range two blobs share must stay until both are copied
    with data.open("r+b" if punch[0] else "rb") as src, fresh.open("wb") as dst:
        def move(offset: int, length: int) -> int:
            dst.write(b"\0" * (-dst.tell() % align))
            placed = dst.tell()
            src.seek(offset)
            for start in range(0, length, 64 << 20):
                dst.write(src.read(min(64 << 20, length - start)))
            if punch[0]:  # the source shrinks as the copy grows, while the file system lets it
                punch[0] = _punch_hole(src, offset, length)
            return placed

        largest = 0
        for init in inits:
            entries = {e.key: e for e in init.external_data}
            for key, entry in entries.items():
                if key.startswith("prepacked_"):
                    head, blobs = _prepacked(entry.value)
                    largest = max([largest, *(length for _, length, _ in blobs)])
                    entry.value = "|".join([head, *(f"{move(offset, length)};{length};{checksum}"
                                                    for offset, length, checksum in blobs)])
            if init.name not in later:
                _move_entry(entries, move)
        for init in later.values():
            _move_entry({e.key: e for e in init.external_data}, move)
    fresh.replace(data)
    onnx.save_model(model, str(model_path))
    return largest


def _read_at_load(graph, inits) -> dict:
    """The initializers only the session's creation reads, in the order its nodes read them: each
    weight a pre-packed buffer replaces, and its ``MatMulNBits`` node's scales and zero points,
    which the packing folds into that buffer for the default kernel (int8 activations; one that
    reads them at run time still finds them, only in the second region)."""
    by_name = {i.name: i for i in inits}
    packed = {i.name for i in inits if any(e.key.startswith("prepacked_") for e in i.external_data)}
    order: dict = {}
    for node in graph.node:
        replaced = [name for name in node.input if name in packed]
        if not replaced:
            continue
        folded = node.input[2:4] if node.op_type == "MatMulNBits" else []
        for name in [*replaced, *folded]:
            if name in by_name and name not in order:
                order[name] = by_name[name]
    for name in sorted(packed - order.keys(), key=_natural):  # read by a subgraph's node
        order[name] = by_name[name]
    return order


def _prepacked(value: str) -> tuple[str, list[tuple[int, int, str]]]:
    """A pre-packed entry, ``<kernel key>|<offset>;<length>;<checksum>[|...]``: its key and blobs."""
    head, *blobs = value.split("|")
    return head, [(int(o), int(n), c) for o, n, c in (blob.split(";") for blob in blobs)]


def _disjoint(inits) -> bool:
    """Whether no two blobs of these initializers overlap in the data file."""
    ranges = []
    for init in inits:
        entries = {e.key: e.value for e in init.external_data}
        if "offset" in entries:
            ranges.append((int(entries["offset"]), int(entries["length"])))
        for key, value in entries.items():
            if key.startswith("prepacked_"):
                ranges += [(offset, length) for offset, length, _ in _prepacked(value)[1]]
    ranges.sort()
    return all(a + n <= b for (a, n), (b, _) in zip(ranges, ranges[1:], strict=False))


def _punch_hole(f, offset: int, length: int) -> bool:
    """Give a copied range of ``f`` (open for writing: ``fallocate`` refuses a read-only file) back
    to the file system (Linux ``fallocate`` with ``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE``), so
    that realigning needs about one copy's disk, not two (the 21 B gpt-oss-shaped export's copy is
    26.7 GiB). False where the call is missing or the file system refuses it: the copy then takes
    twice the room for a while."""
    if length <= 0:
        return True  # nothing to give back (fallocate refuses an empty range)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.fallocate(f.fileno(), 0x03, ctypes.c_long(offset), ctypes.c_long(length)) == 0:
            return True
        reason = os.strerror(ctypes.get_errno())
    except (OSError, AttributeError) as err:
        reason = str(err)
    log.info("moe-onnx: cannot free the copied ranges of %s as it is realigned (%s): the build needs "
             "twice its room for a while", getattr(f, "name", "the source"), reason)
    return False


def _move_entry(entries: dict, move) -> None:
    if "offset" in entries:
        offset, length = int(entries["offset"].value), int(entries["length"].value)
        entries["offset"].value = str(move(offset, length))


def _natural(name: str) -> list:
    """``layers.2.x`` before ``layers.10.x``: numbers compared as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def session_options_for_prepared(options: ort.SessionOptions) -> ort.SessionOptions:
    """The prepared graph is already optimized: running the optimizer again would only copy it.

    Its planner's buffer reuse is off too: planning reuse grows with layers x nodes (the 7 B
    export's session took 13.6 s with it, 6.2 s without); the arena still recycles freed buffers,
    and prefill, decode and peak memory measured the same either way."""
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_mem_reuse = False
    return options


if __name__ == "__main__":
    _stage(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
