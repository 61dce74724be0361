"""Session options and thread pools: every onnxruntime session of the package is configured here.

Each onnxruntime session owns an intra-op thread pool by default, and its threads spin for a
while after every run (``session.intra_op.allow_spinning``). With several sessions in one process
on a small machine (a bench timing a dozen variants, a server holding several models) the session
that runs competes with the spinning threads of the one that ran before it
(``python -m studies.threading_modes`` measures it). :func:`share_threads` gives the
process one pool for all its sessions instead, so nothing else is left spinning when one runs.

onnxruntime makes that pool once per process and then refuses any session with a pool of its own,
so the choice is the process's, made before its first session; :func:`session_options` follows it
for every session the package creates.
"""

from __future__ import annotations

import os
import threading

import onnxruntime as ort
from onnxruntime.capi import _pybind_state

from moe_onnx.errors import MoeOnnxError

_lock = threading.Lock()
_shared: list[int] = []  # the shared pool's size once made: onnxruntime's own state is process-wide


def share_threads(threads: int) -> int:
    """Give every later session of this process one intra-op pool of ``threads`` threads.

    Call it before the process's first onnxruntime session. A second call with the same size is
    a no-op; another size is an error (onnxruntime cannot remake the pool).
    """
    if threads < 1:
        raise MoeOnnxError(f"a shared thread pool needs at least 1 thread, got {threads}")
    with _lock:
        if not _shared:
            try:
                _pybind_state.set_global_thread_pool_sizes(threads, 1)
            except Exception as err:  # noqa: BLE001 - onnxruntime's Fail is not a Python type
                raise MoeOnnxError(f"cannot make onnxruntime's shared thread pool: {err}") from None
            _shared.append(threads)
        elif _shared[0] != threads:
            raise MoeOnnxError(f"this process's shared thread pool has {_shared[0]} threads; "
                               f"it cannot be remade with {threads}")
        return _shared[0]


def session_options(threads: int | None = None, *, spin: bool = True,
                    quiet: bool = True) -> ort.SessionOptions:
    """Options for a new session: ``threads`` intra-op threads of its own, or the shared pool when
    the process has one (``threads`` is then the pool's business). ``spin=False`` keeps the
    session's own pool from spinning after a run. ``quiet`` sends onnxruntime's warnings nowhere:
    errors reach the caller as exceptions."""
    options = ort.SessionOptions()
    if quiet:
        options.log_severity_level = 3
    if _shared:
        options.use_per_session_threads = False
    elif threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if os.environ.get("MOE_ONNX_PARALLEL_PREPACK", "1") != "0":
        # pre-pack the weights with the session's threads, not one: the 7 B int4 export's
        # session is made in 2.75 s instead of 4.77 on 2 threads (python -m studies.load_time)
        options.add_session_config_entry("session.prepack.enable_parallel", "1")
    return options
