"""The default exports (fp32, int4) of the shipped reference MoE on runtimes beside ONNX Runtime's
CPU provider: the onnx ReferenceEvaluator (always), plain OpenVINO and ONNX Runtime with the
OpenVINO plugin EP (``onnxruntime-ep-openvino``; skipped when not installed), directly and through
the runtime's ``provider="openvino"``; the WebGPU plugin EP where it has no adapter. Each runs a
prefill of six tokens and one decode step on the returned cache, against ONNX Runtime CPU with
float32 MatMulNBits kernels, so int4 compares the same dequantized weights.

Issue 20: the OpenVINO plugin EP refused every export while ``logits_to_keep`` was an optional
input (an initializer with a default, which it cannot bind); the required ``num_logits_to_keep``
of today's exports runs there with parity."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx.reference import ReferenceEvaluator

import moe_onnx
import moe_onnx.runtime as rt
from moe_onnx import contract as io
from moe_onnx.cli import main
from moe_onnx.manifest import read as read_manifest
from moe_onnx.quantize import FLOAT32_MATMULNBITS
from moe_onnx.reference import default_models_dir
from moe_onnx.runtime import providers

PROMPT = [[5, 17, 33, 2, 9, 64]]
TOLERANCE = 1e-5  # max |difference| / max |logit|, float32 everywhere (measured: <= 7e-7)
# OpenVINO's CPU plugin computes in bf16 on AMX machines and quantizes activations for
# compressed weights unless told not to; parity needs its float32 arithmetic.
OPENVINO_FLOAT32 = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


@pytest.fixture(scope="module")
def exports(reference_exports) -> dict:
    """``reference_models/moe`` exported as the CLI does by default, in fp32 and with int4 weights."""
    return reference_exports


def _two_steps(run, export) -> list[np.ndarray]:
    """Logits of the prefill and of one decode step on its cache; ``run(feeds)`` returns the
    graph's outputs in order (``logits``, then each layer's present key and value)."""
    manifest = read_manifest(export)
    layers = manifest.spec.num_layers
    first = run(io.prefill_feeds(PROMPT, layers, manifest.kv_dims))
    past = len(PROMPT[0])
    step = {io.INPUT_IDS: np.array([[7]], np.int64), io.ATTENTION_MASK: np.ones((1, past + 1), np.int64),
            io.POSITION_IDS: np.array([[past]], np.int64), **io.keep_all()}
    step.update(zip(io.past_names(layers), first[1:], strict=True))
    return [first[0], run(step)[0]]


def _onnxruntime_cpu(export) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.add_session_config_entry(*FLOAT32_MATMULNBITS)
    session = ort.InferenceSession(str(export / "model.onnx"), options, providers=["CPUExecutionProvider"])
    return _two_steps(lambda feeds: session.run(None, feeds), export)


def _assert_matches_onnxruntime(got: list[np.ndarray], export) -> None:
    for step, (logits, want) in enumerate(zip(got, _onnxruntime_cpu(export), strict=True)):
        assert logits.shape == want.shape, step
        error = float(np.abs(logits - want).max() / np.abs(want).max())
        assert error < TOLERANCE, f"step {step}: relative error {error:.2e}"


def test_every_blocked_weight_holds_whole_blocks(exports, tmp_path):
    """OpenVINO converts no blocked DequantizeLinear with a partial last block: the expert width
    (176, not a multiple of 32) is padded with zero units, and ONNX Runtime still fuses each
    weight's DequantizeLinear with its MatMul into MatMulNBits."""
    graph = onnx.load(str(exports["int4"] / "model.onnx"), load_external_data=False).graph
    dims = {t.name: t.dims for t in graph.initializer}
    blocked = [(dims[n.input[0]], {a.name: a.i for a in n.attribute}) for n in graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in dims]
    assert all(shape[attrs["axis"]] % attrs["block_size"] == 0 for shape, attrs in blocked)
    assert dims["layers.0.moe.experts.0.down"] == [192, 128]
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(exports["int4"] / "model.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in optimized.node) == len(blocked) > 0


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_reference_evaluator_matches_onnxruntime(weights, exports):
    export = exports[weights]
    evaluator = ReferenceEvaluator(str(export / "model.onnx"))
    _assert_matches_onnxruntime(_two_steps(lambda feeds: evaluator.run(None, feeds), export), export)


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_openvino_matches_onnxruntime(weights, exports):
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install openvino)")
    export = exports[weights]
    compiled = ov.Core().compile_model(str(export / "model.onnx"), "CPU", OPENVINO_FLOAT32)

    def run(feeds):
        results = compiled(feeds)
        return [results[output] for output in compiled.outputs]

    _assert_matches_onnxruntime(_two_steps(run, export), export)


def _needs(plugin: str):
    return pytest.importorskip(f"onnxruntime_ep_{plugin}", reason=f"the {plugin} plugin EP is not installed "
                               f"(pip install onnxruntime-ep-{plugin})")


@pytest.fixture(scope="module")
def openvino_ep_devices() -> list:
    """The OpenVINO plugin EP's CPU device, its library registered (once per process, as the
    runtime registers it)."""
    _needs("openvino")
    providers.register_plugin("openvino")
    return [d for d in ort.get_ep_devices()
            if d.ep_name == providers.PLUGINS["openvino"].ep
            and d.device.type == ort.OrtHardwareDeviceType.CPU]


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_openvino_plugin_ep_matches_onnxruntime(weights, exports, openvino_ep_devices):
    export = exports[weights]
    options = ort.SessionOptions()
    config = {"load_config": json.dumps({"CPU": OPENVINO_FLOAT32})}
    options.add_provider_for_devices(openvino_ep_devices, config)
    session = ort.InferenceSession(str(export / "model.onnx"), options)
    assert session.get_providers()[0] == "OpenVINOExecutionProvider"
    _assert_matches_onnxruntime(_two_steps(lambda feeds: session.run(None, feeds), export), export)


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_runtime_on_openvino_matches_cpu_and_generates_the_same(weights, exports):
    """``rt.load(provider="openvino")``: the plugin registered by the runtime, every node on
    OpenVINO, logits of a prefill and a decode step as on the CPU provider, the same greedy tokens."""
    _needs("openvino")
    export = exports[weights]
    cpu, ov = rt.load(export, provider="cpu"), rt.load(export, provider="openvino")
    assert (ov.provider, ov.providers[0], ov.device) == ("openvino", "OpenVINOExecutionProvider", "cpu")
    assert list(ov.assignment) == ["OpenVINOExecutionProvider"], ov.assignment  # no node fell back
    assert sum(ov.assignment["OpenVINOExecutionProvider"].values()) > 100
    want, got = [], []
    for session, logits in ((cpu, want), (ov, got)):
        first, cache = session.forward(PROMPT)
        step, _ = session.forward([[7]], cache=cache)
        logits += [first, step]
    for w, g in zip(want, got, strict=True):
        assert float(np.abs(w - g).max() / np.abs(w).max()) < (TOLERANCE if weights == "fp32" else 1e-3)
    assert ov.generate(PROMPT, max_new_tokens=12).ids == cpu.generate(PROMPT, max_new_tokens=12).ids


def test_cli_takes_the_openvino_provider(exports):
    """``inspect --provider`` names where the nodes went; ``run`` and ``eval`` take the provider."""
    _needs("openvino")
    export = str(exports["fp32"])
    result = CliRunner().invoke(main, ["inspect", export, "--provider", "openvino"])
    assert result.exit_code == 0, result.output
    assert "placement    on openvino: OpenVINOExecutionProvider " in result.output, result.output
    cpu = CliRunner().invoke(main, ["run", export, "--ids", "5,17,33", "--max-new-tokens", "6",
                                    "--provider", "cpu"])
    ov = CliRunner().invoke(main, ["run", export, "--ids", "5,17,33", "--max-new-tokens", "6",
                                   "--provider", "openvino"])
    assert cpu.exit_code == ov.exit_code == 0, (cpu.output, ov.output)
    assert "[openvino] prefill 3 tokens" in ov.output, ov.output
    assert cpu.output.splitlines()[0] == ov.output.splitlines()[0]  # the same tokens


def test_a_plugin_that_takes_no_node_is_an_error_not_cpu_in_disguise(exports):
    """The check behind every plugin placement, on a real session's record of the assignment: a
    session whose nodes all went to the CPU provider, where a plugin EP was asked for, is refused."""
    options = ort.SessionOptions()
    options.add_session_config_entry(providers.RECORD_ASSIGNMENT, "1")
    session = ort.InferenceSession(str(exports["fp32"] / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    wanted = providers.Placement("webgpu", providers.PLUGINS["webgpu"].ep, devices=("a device",))
    with pytest.raises(providers.ProviderError, match="placed no node of .* on webgpu"):
        providers.check_placement(session, wanted, "model.onnx")
    placed = providers.check_placement(session, providers.resolve("cpu"), "model.onnx")
    assert list(placed) == ["CPUExecutionProvider"] and sum(placed["CPUExecutionProvider"].values()) > 100


def test_webgpu_without_an_adapter_is_a_clear_error(exports):
    """With no WebGPU adapter (this machine: no GPU, no software Vulkan) the plugin lists no device:
    ``provider="webgpu"`` says so (and how to allow a software adapter) instead of running on CPU."""
    _needs("webgpu")
    providers.register_plugin("webgpu")
    if any(d.ep_name == providers.PLUGINS["webgpu"].ep for d in ort.get_ep_devices()):
        pytest.skip("this machine has a WebGPU adapter")
    with pytest.raises(providers.ProviderError, match="the webgpu provider has no device on this machine"):
        rt.load(exports["fp32"], provider="webgpu")
    result = CliRunner().invoke(main, ["run", str(exports["fp32"]), "--ids", "1,2", "--provider", "webgpu"])
    assert result.exit_code != 0 and "no WebGPU adapter" in result.output and "Traceback" not in result.output


def test_the_cuda_probe_graph_is_the_one_onnx_builds_and_the_runtime_imports_no_onnx():
    """The runtime keeps its CUDA probe as serialized bytes, so that loading an export never imports
    onnx (and ml_dtypes: 0.5 s of every ``moe-onnx run``): the bytes must be the graph onnx.helper
    makes, and a fresh interpreter that loads the runtime and asks for CUDA imports neither."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    assert model.SerializeToString() == providers.PROBE_MODEL
    code = ("import sys, moe_onnx.cli, moe_onnx.runtime as rt; rt.providers.cuda_usable(); "
            "print(sorted(m for m in ('onnx', 'ml_dtypes', 'torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


SWIFTSHADER = Path("/usr/lib/chromium/vk_swiftshader_icd.json")  # Debian's chromium ships it
WEBGPU_RUN = """
import json, sys
import numpy as np
import moe_onnx.runtime as rt
prompts = [[5, 17, 33, 2, 9, 64], [40, 3, 99]]
report = {}
for out in sys.argv[1:]:
    cpu, gpu = rt.load(out, provider="cpu"), rt.load(out, provider="webgpu")
    want, cache_w = cpu.forward(prompts[:1])
    got, cache_g = gpu.forward(prompts[:1])
    step_w, _ = cpu.forward([[7]], cache=cache_w)
    step_g, _ = gpu.forward([[7]], cache=cache_g)
    errors = [float(np.abs(g - w).max() / np.abs(w).max()) for g, w in ((got, want), (step_g, step_w))]
    report[out] = {"device": gpu.device, "assignment": gpu.assignment, "errors": errors,
                   "cache": [type(cache_g.layers[0][0]).__name__, cache_g.device],
                   "greedy_equal": cpu.generate(prompts, max_new_tokens=12).ids
                   == gpu.generate(prompts, max_new_tokens=12).ids}
print(json.dumps(report))
"""


def test_webgpu_on_a_software_adapter_runs_like_cpu_with_the_cache_on_the_device(exports, tmp_path):
    """The WebGPU plugin EP on SwiftShader's Vulkan (a software adapter: correctness and overhead,
    not a GPU's speed), in a child process that sets the adapter up before the plugin looks for
    one: most nodes on WebGPU, the KV cache an OrtValue on the device between steps (I/O binding),
    logits as on CPU, the same greedy tokens for a left-padded batch; the static cache too (its
    TensorScatter on the CPU provider), and three hybrids, whose chunked Mamba2 and DeltaNet sit in
    an ``If`` (the branches' constants are their own: an outer-scope index reached a WebGPU kernel
    in CPU memory, which it refused)."""
    _needs("webgpu")
    if not SWIFTSHADER.is_file():
        pytest.skip("no SwiftShader Vulkan driver (apt-get install chromium)")
    from models import make_model

    static = moe_onnx.export(default_models_dir() / "moe", tmp_path / "static", kv_cache="static")
    hybrids = [moe_onnx.export(make_model(family), tmp_path / family)  # conv; Mamba2 and DeltaNet in an If
               for family in ("lfm2_moe", "granitemoehybrid", "qwen3_next")]
    libraries = [str(SWIFTSHADER.parent), os.environ.get("LD_LIBRARY_PATH", "")]  # its libvulkan.so.1
    env = {**os.environ, "VK_ICD_FILENAMES": str(SWIFTSHADER), "ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER": "1",
           "LD_LIBRARY_PATH": ":".join(p for p in libraries if p)}
    outs = [str(exports["fp32"]), str(exports["int4"]), str(static), *map(str, hybrids)]
    done = subprocess.run([sys.executable, "-c", WEBGPU_RUN, *outs], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for out, tolerance in zip(outs, (1e-3, 2e-2, 1e-3, 1e-3, 1e-3, 1e-3), strict=True):
        r = report[out]
        placed = {ep: sum(ops.values()) for ep, ops in r["assignment"].items()}
        assert list(placed)[0] == "WebGpuExecutionProvider", placed
        assert placed["WebGpuExecutionProvider"] > 2 * placed.get("CPUExecutionProvider", 0), placed
        assert r["device"] == "webgpu" and r["cache"] == ["OrtValue", "webgpu"], r
        assert max(r["errors"]) < tolerance, (out, r["errors"])
        assert r["greedy_equal"], out


def test_unknown_provider_and_missing_plugin_are_named(exports, monkeypatch):
    message = "unknown provider 'tpu'; available here: auto, cpu"
    with pytest.raises(providers.ProviderError, match=message) as err:
        rt.load(exports["fp32"], provider="tpu")
    here, everything = str(err.value).split("(all:")
    assert ("openvino" in here) == (importlib.util.find_spec("onnxruntime_ep_openvino") is not None)
    assert everything == " auto, cpu, cuda, openvino, webgpu)"
    absent = providers.Plugin("no_such_plugin_package", "OpenVINOExecutionProvider", "pip install x")
    monkeypatch.setitem(providers.PLUGINS, "openvino", absent)
    with pytest.raises(providers.ProviderError, match="the openvino provider needs its onnxruntime plugin"):
        rt.load(exports["fp32"], provider="openvino")


def test_eval_on_openvino_scores_as_on_cpu(exports):
    """``eval --provider``: the same windows' perplexity through the graph on OpenVINO as on CPU."""
    _needs("openvino")
    from moe_onnx.evaluation import onnx_quality

    windows = np.random.default_rng(0).integers(0, 256, (3, 16))
    cpu = onnx_quality(exports["fp32"], windows, provider="cpu")
    ov = onnx_quality(exports["fp32"], windows, provider="openvino")
    assert abs(ov.nll - cpu.nll) < 1e-5 * abs(cpu.nll), (ov.nll, cpu.nll)
