"""The default exports (fp32, int4) of the shipped reference MoE on runtimes beside ONNX Runtime's
CPU provider: the onnx ReferenceEvaluator (always), plain OpenVINO and ONNX Runtime with the
OpenVINO plugin EP (``onnxruntime-ep-openvino``; skipped when not installed: CI does not install
them yet). Each runs a prefill of six tokens and one decode step on the returned cache, against
ONNX Runtime CPU with float32 MatMulNBits kernels, so int4 compares the same dequantized weights.

Issue 20: the OpenVINO plugin EP refused every export while ``logits_to_keep`` was an optional
input (an initializer with a default, which it cannot bind); the required ``num_logits_to_keep``
of today's exports runs there with parity."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

import moe_onnx
from moe_onnx import contract as io
from moe_onnx.manifest import read as read_manifest
from moe_onnx.quantize import FLOAT32_MATMULNBITS
from moe_onnx.reference import default_models_dir

PROMPT = [[5, 17, 33, 2, 9, 64]]
TOLERANCE = 1e-5  # max |difference| / max |logit|, float32 everywhere (measured: <= 7e-7)
# OpenVINO's CPU plugin computes in bf16 on AMX machines and quantizes activations for
# compressed weights unless told not to; parity needs its float32 arithmetic.
OPENVINO_FLOAT32 = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """``reference_models/moe`` exported as the CLI does by default, in fp32 and with int4 weights."""
    out = tmp_path_factory.mktemp("portable")
    src = default_models_dir() / "moe"
    return {"fp32": moe_onnx.export(src, out / "fp32"),
            "int4": moe_onnx.export(src, out / "int4", weights="int4")}


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


@pytest.fixture(scope="module")
def openvino_ep_devices() -> list:
    """The OpenVINO plugin EP's CPU device, its library registered once for this module."""
    plugin = pytest.importorskip("onnxruntime_ep_openvino", reason="the OpenVINO plugin EP is not installed "
                                 "(pip install onnxruntime-ep-openvino)")
    ort.register_execution_provider_library(plugin.get_ep_name(), plugin.get_library_path())
    yield [d for d in ort.get_ep_devices()
           if d.ep_name == plugin.get_ep_name() and d.device.type == ort.OrtHardwareDeviceType.CPU]
    ort.unregister_execution_provider_library(plugin.get_ep_name())


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_openvino_plugin_ep_matches_onnxruntime(weights, exports, openvino_ep_devices):
    export = exports[weights]
    options = ort.SessionOptions()
    config = {"load_config": json.dumps({"CPU": OPENVINO_FLOAT32})}
    options.add_provider_for_devices(openvino_ep_devices, config)
    session = ort.InferenceSession(str(export / "model.onnx"), options)
    assert session.get_providers()[0] == "OpenVINOExecutionProvider"
    _assert_matches_onnxruntime(_two_steps(lambda feeds: session.run(None, feeds), export), export)
