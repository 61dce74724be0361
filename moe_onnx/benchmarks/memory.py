"""Memory: the machine's copy bandwidth, measured in the same run, and resident-set sizes.

Bandwidth is the physical limit a decode step works against: a token must read its active
weights once, so (active bytes) / (copy bandwidth) is the fastest a step can be.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil


def copy_bandwidth(gib: float = 1.0, threads: int = 2, repeats: int = 5) -> float:
    """Best-of-``repeats`` GB/s of copying a ``gib`` GiB array (bytes read + bytes written).

    The array is far beyond any cache; the copy is split over ``threads`` threads (numpy
    releases the GIL while copying), as the benchmarked engines use that many.
    """
    src = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)
    dst = np.zeros_like(src)  # zeros_like still faults pages lazily: the warm-up copy touches them
    chunks = list(zip(np.array_split(src, threads), np.array_split(dst, threads), strict=True))
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):
            start = time.perf_counter()
            list(pool.map(lambda pair: np.copyto(pair[1], pair[0]), chunks))
            best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def rss_mb() -> float:
    """This process's resident set, MB."""
    return psutil.Process().memory_info().rss / 1e6


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``), so that RSS growth
    measured next is this step's own and not hidden by pages earlier steps freed but kept."""
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc: RSS deltas may then undercount


def _read_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the kernel's peak-RSS mark (Linux >= 4.0)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def peak_rss():
    """Yields a dict whose ``"peak_mb"`` is the process's peak RSS inside the block.

    On Linux the kernel's own high-water mark (exact); elsewhere a 2 ms sampling thread.
    """
    result: dict[str, float] = {}
    if _reset_hwm() and _read_hwm_mb() is not None:
        yield result
        result["peak_mb"] = _read_hwm_mb() or 0.0
        return
    stop, peak = threading.Event(), [rss_mb()]

    def sample() -> None:
        while not stop.wait(0.002):
            peak[0] = max(peak[0], rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_mb"] = max(peak[0], rss_mb())
