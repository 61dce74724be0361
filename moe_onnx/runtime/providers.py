"""Execution-provider choice: CUDA only when its provider can really be created, else CPU.

Listing ``CUDAExecutionProvider`` in ``get_available_providers()`` only says the GPU build is
installed; whether CUDA/cuDNN libraries and a device exist shows when a session is created. The
probe creates a one-node session with the C++ logger silenced and stderr redirected, so
onnxruntime's own load errors never reach the user.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import sys

import onnxruntime as ort

from moe_onnx.errors import MoeOnnxError
from moe_onnx.runtime.threads import session_options

log = logging.getLogger("moe_onnx.runtime")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


class ProviderError(MoeOnnxError):
    """The requested execution provider cannot run here."""


@contextlib.contextmanager
def _quiet():
    """Silence fds 1 and 2 and Python's own streams: onnxruntime's C++ logger and
    ``preload_dlls`` report missing CUDA libraries there, which is expected on a CPU machine."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _probe_model() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


@functools.lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """True when a CUDA session can be created and really runs on CUDA."""
    if CUDA not in ort.get_available_providers():
        return False
    options = session_options(1)
    options.log_severity_level = 4
    with _quiet():
        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()  # CUDA 13 / cuDNN 9 from the nvidia pip packages, when present
            except Exception:  # noqa: BLE001 - a missing package only means no preload
                pass
        try:
            session = ort.InferenceSession(_probe_model(), options, providers=[CUDA, CPU])
        except Exception:  # noqa: BLE001 - any failure means CUDA is not usable
            return False
    return session.get_providers()[0] == CUDA


def resolve(provider: str) -> list[str]:
    """The providers list for ``auto`` | ``cuda`` | ``cpu``; logs the choice in one line."""
    if provider not in ("auto", "cuda", "cpu"):
        raise ProviderError(f"unknown provider {provider!r}; choose auto, cuda or cpu")
    if provider == "cpu":
        chosen = [CPU]
    elif cuda_usable():
        chosen = [CUDA, CPU]
    elif provider == "cuda":
        raise ProviderError(
            "the CUDA provider is not usable here (no GPU, or CUDA 13 / cuDNN 9 libraries missing); "
            "use --provider cpu or auto"
        )
    else:
        chosen = [CPU]
    log.info("moe-onnx runtime: using %s", "CUDA" if chosen[0] == CUDA else "CPU")
    return chosen
