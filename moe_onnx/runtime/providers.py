"""Execution-provider choice: ``cpu``, ``cuda``, the plugin EPs ``openvino`` and ``webgpu``, or
``auto`` (CUDA only when its provider can really be created, else CPU).

Listing ``CUDAExecutionProvider`` in ``get_available_providers()`` only says the GPU build is
installed; whether CUDA/cuDNN libraries and a device exist shows when a session is created. The
probe creates a one-node session with the C++ logger silenced and stderr redirected, so
onnxruntime's own load errors never reach the user.

OpenVINO and WebGPU are onnxruntime plugin execution providers, separate packages
(``onnxruntime-ep-openvino``, ``onnxruntime-ep-webgpu``; extras ``[openvino]``, ``[webgpu]``):
their library is registered once per process with onnxruntime's own API
(``register_execution_provider_library``), the EP's devices come from ``get_ep_devices`` and a
session takes them with ``SessionOptions.add_provider_for_devices``. A plugin that lists no device
(WebGPU without an adapter) is an error here, never CPU in disguise; a session that placed no node
on the EP is one too (:func:`check_placement`, from onnxruntime's record of the graph assignment).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import onnxruntime as ort

from moe_onnx.errors import MoeOnnxError
from moe_onnx.runtime.threads import session_options

log = logging.getLogger("moe_onnx.runtime")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
PROVIDERS = ("auto", "cpu", "cuda", "openvino", "webgpu")
RECORD_ASSIGNMENT = "session.record_ep_graph_assignment_info"


@dataclass(frozen=True)
class Plugin:
    """A plugin execution provider: its Python package, the EP it registers, how to install it."""

    module: str
    ep: str
    install: str


PLUGINS = {
    "openvino": Plugin("onnxruntime_ep_openvino", "OpenVINOExecutionProvider",
                       "pip install 'moe-onnx[openvino]' (onnxruntime-ep-openvino)"),
    "webgpu": Plugin("onnxruntime_ep_webgpu", "WebGpuExecutionProvider",
                     "pip install 'moe-onnx[webgpu]' (onnxruntime-ep-webgpu)"),
}


@dataclass(frozen=True)
class Placement:
    """Where a session runs: ``name`` (cpu | cuda | openvino | webgpu), the EP that should take the
    graph, and how to ask onnxruntime for it: a providers list (CPU, CUDA) or a plugin's devices."""

    name: str
    ep: str
    providers: tuple = ()  # for InferenceSession(providers=...)
    devices: tuple = field(default=(), compare=False)  # plugin EP: the OrtEpDevices to add

    @property
    def plugin(self) -> bool:
        return bool(self.devices)

    def add_to(self, options: ort.SessionOptions, ep_options: dict | None = None) -> list:
        """Put a plugin's devices on ``options`` (with ``ep_options``); the ``providers`` argument
        of InferenceSession otherwise (empty for a plugin: the options carry it)."""
        if self.plugin:
            given = {k: str(v) for k, v in (ep_options or {}).items()}
            options.add_provider_for_devices(list(self.devices), given)
            return []
        return [(p, ep_options) if ep_options and p == self.ep else p for p in self.providers]


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


# The CUDA probe's graph, serialized: y = Identity(x), x and y float [1], opset 17, IR version 8
# (tests/test_portable.py checks it against onnx.helper's). Kept as bytes so that the runtime's
# import and a CPU-only load never import onnx, whose import (ml_dtypes with it) takes 0.5 s.
PROBE_MODEL = (b'\x08\x08:;\n\x10\n\x01x\x12\x01y"\x08Identity\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08'
               b'\x08\x01\x12\x04\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04'
               b'\n\x00\x10\x11')


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
            session = ort.InferenceSession(PROBE_MODEL, options, providers=[CUDA, CPU])
        except Exception:  # noqa: BLE001 - any failure means CUDA is not usable
            return False
    return session.get_providers()[0] == CUDA


def ep_options(chosen: Placement, threads: int | None, tf32: bool, dtype: str) -> dict:
    """The EP's own options: CUDA's TF32 switch; OpenVINO's threads, and float32 arithmetic for a
    float32 export (its CPU plugin computes in bf16 on AMX machines unless told otherwise)."""
    if chosen.ep == CUDA:
        return {"use_tf32": str(int(tf32))}
    if chosen.name == "openvino":
        device = chosen.devices[0].ep_metadata.get("ov_device", "CPU")
        config = {"INFERENCE_PRECISION_HINT": "f32"} if dtype == "fp32" else {}
        if threads and device == "CPU":
            config["INFERENCE_NUM_THREADS"] = threads
        return {"load_config": json.dumps({device: config})} if config else {}
    return {}


def create_session(model, options: ort.SessionOptions, chosen: Placement, threads: int | None = None,
                   tf32: bool = False, dtype: str = "fp32") -> ort.InferenceSession:
    """An onnxruntime session of ``model`` (a path or the bytes of a graph) on ``chosen``: the EP
    and its options (:func:`ep_options`) put on ``options``, the node assignment recorded for
    :func:`check_placement`."""
    options.add_session_config_entry(RECORD_ASSIGNMENT, "1")
    listed = chosen.add_to(options, ep_options(chosen, threads, tf32, dtype))
    return ort.InferenceSession(model, options, providers=listed or None)


def resolve(provider: str) -> Placement:
    """The placement for ``auto`` | ``cpu`` | ``cuda`` | ``openvino`` | ``webgpu``; logs the
    choice in one line. A provider that cannot run here is a :class:`ProviderError` naming why."""
    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; available here: {', '.join(available())} "
                            f"(all: {', '.join(PROVIDERS)})")
    if provider in PLUGINS:
        chosen = Placement(provider, PLUGINS[provider].ep, devices=tuple(plugin_devices(provider)))
    elif provider == "cpu":
        chosen = Placement("cpu", CPU, (CPU,))
    elif cuda_usable():
        chosen = Placement("cuda", CUDA, (CUDA, CPU))
    elif provider == "cuda":
        raise ProviderError(
            "the CUDA provider is not usable here (no GPU, or CUDA 13 / cuDNN 9 libraries missing); "
            "use --provider cpu or auto"
        )
    else:
        chosen = Placement("cpu", CPU, (CPU,))
    log.info("moe-onnx runtime: using %s", {"cpu": "CPU", "cuda": "CUDA", "openvino": "OpenVINO",
                                             "webgpu": "WebGPU"}[chosen.name])
    return chosen


def available() -> list[str]:
    """The providers that can run here: ``auto`` and ``cpu`` always, ``cuda`` where its provider
    starts, a plugin EP where its package is installed and lists a device."""
    names = ["auto", "cpu"] + (["cuda"] if cuda_usable() else [])
    for name in PLUGINS:
        try:
            plugin_devices(name)
        except ProviderError:
            continue
        names.append(name)
    return names


_registered: set[str] = set()  # plugin libraries this process registered (onnxruntime keeps them)


def register_plugin(name: str) -> str:
    """Register the plugin EP ``name``'s library with onnxruntime unless it is (once per process,
    under the name its package gives); the registration name. A missing package or a library
    onnxruntime refuses is a :class:`ProviderError`."""
    plugin = PLUGINS[name]
    try:
        package = importlib.import_module(plugin.module)
    except ImportError:
        raise ProviderError(f"the {name} provider needs its onnxruntime plugin: {plugin.install}") from None
    registered = package.get_ep_name()
    if registered in _registered:
        return registered
    try:
        ort.register_execution_provider_library(registered, str(package.get_library_path()))
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for a refused library
        if "already registered" not in str(err):
            detail = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            raise ProviderError(f"onnxruntime {ort.__version__} refused the {name} plugin "
                                f"({plugin.module}): {detail}") from None
    _registered.add(registered)
    return registered


def plugin_devices(name: str) -> list:
    """The devices the plugin ``name`` offers for its EP: a GPU when it lists one, else the first.
    None listed (WebGPU without an adapter) is a :class:`ProviderError`."""
    register_plugin(name)
    ep = PLUGINS[name].ep
    devices = [d for d in ort.get_ep_devices() if d.ep_name == ep]
    if not devices:
        why = "" if name != "webgpu" else (
            " (no WebGPU adapter: a GPU with Vulkan, Metal or D3D12 drivers; a software adapter such as "
            "SwiftShader only with ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER=1)")
        raise ProviderError(f"the {name} provider has no device on this machine{why}")
    gpus = [d for d in devices if d.device.type == ort.OrtHardwareDeviceType.GPU]
    return gpus[:1] or devices[:1]


def assignment(session: ort.InferenceSession) -> dict[str, dict[str, int]]:
    """``{EP: {op_type: nodes}}``: where onnxruntime placed the graph's nodes (the session must
    have been made with :data:`RECORD_ASSIGNMENT` on; empty otherwise)."""
    placed: dict[str, dict[str, int]] = {}
    try:
        subgraphs = session.get_provider_graph_assignment_info()
    except Exception:  # noqa: BLE001 - recording was off: nothing to report
        return placed
    for subgraph in subgraphs:
        ops = placed.setdefault(subgraph.ep_name, {})
        for node in subgraph.get_nodes():
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return placed


def describe_assignment(placed: dict[str, dict[str, int]]) -> str:
    """One line: nodes per EP, and the op types of those that are not on the first one."""
    if not placed:
        return "graph assignment not recorded"
    parts = []
    for i, (ep, ops) in enumerate(placed.items()):
        text = f"{ep} {sum(ops.values())} nodes"
        if i:
            by_count = sorted(ops.items(), key=lambda kv: -kv[1])
            text += " (" + ", ".join(f"{op} {n}" for op, n in by_count) + ")"
        parts.append(text)
    return "; ".join(parts)


def check_placement(session: ort.InferenceSession, chosen: Placement, what: str) -> dict[str, dict[str, int]]:
    """The session's node assignment, ordered with ``chosen``'s EP first; a plugin EP that took no
    node (everything silently on CPU) is a :class:`ProviderError`."""
    placed = assignment(session)
    mine = placed.pop(chosen.ep, None)
    ordered = ({chosen.ep: mine} if mine else {}) | placed
    if chosen.plugin and placed and not mine:
        raise ProviderError(f"onnxruntime placed no node of {what} on {chosen.name} ({chosen.ep}); "
                            f"everything would run on {', '.join(placed)}")
    return ordered
