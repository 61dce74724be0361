"""``--moe-impl fused`` with int8/int4 experts: ONNX Runtime's ``com.microsoft.QMoE`` on the same
integers and scales as the ``dispatch`` graph (our own dequantized reference).

Measured (onnxruntime 1.31.1 CPU, tiny models of tests/models.py, block 32), with MatMulNBits in
float32 (``FLOAT32_MATMULNBITS``) and QMoE in float32 (``QMOE_FLOAT32_ENV``): fused and dispatch
logits differ by relative 3.5e-7 to 4.3e-7 (int8 and int4, Mixtral, Qwen2-MoE), i.e. float32
summation order only, since both dequantize to bit-identical weights. The tests hold them to 1e-5:
20x that, and 10^4 below what one token routed differently costs (relative 0.1 or more). At
onnxruntime's defaults both quantize activations to int8 per block; there they differed by
relative 1.2e-3 (int4) and 8e-3 (int8) on the tiny Mixtral, with argmax agreeing everywhere.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxscript
import pytest
import torch
from click.testing import CliRunner
from models import make_model, tokens_for_routes

import moe_onnx
import moe_onnx.runtime as rt
from moe_onnx import manifest
from moe_onnx.cli import main
from moe_onnx.contract import empty_pasts, past_names, present_names
from moe_onnx.exporter import families
from moe_onnx.exporter.checkpoint import StateDictCheckpoint
from moe_onnx.exporter.config import Config
from moe_onnx.exporter.verify import left_padded_batch
from moe_onnx.exporter.weights import CheckpointWeights
from moe_onnx.graphs.context import GraphContext
from moe_onnx.graphs.moe import moe_block
from moe_onnx.quantize import FLOAT32_MATMULNBITS, QMOE_FLOAT32_ENV, QuantConfig, dequantize

TOLERANCE = 1e-5  # relative, fused (QMoE) vs dispatch, both in float32: see the module docstring


@pytest.fixture
def float32(monkeypatch):
    """Session options with MatMulNBits in float32, and QMoE in float32 for sessions made now."""
    monkeypatch.setenv(*QMOE_FLOAT32_ENV)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry(*FLOAT32_MATMULNBITS)
    return options


def _source(model, quant: QuantConfig) -> CheckpointWeights:
    cfg = Config(model.config.to_dict(), source="test")
    family = families.get(cfg.require("model_type"))
    checkpoint = StateDictCheckpoint(model.state_dict())
    return CheckpointWeights(checkpoint, family.spec(cfg), family.names, "fp32", quant)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """QMoE's uint8 storage back to signed integers (low nibble first; implicit zero point)."""
    if bits == 4:
        packed = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return packed.astype(np.int16) - (1 << (bits - 1))


@pytest.mark.parametrize("method", ["rtn", "search"])
@pytest.mark.parametrize("bits", [8, 4])
def test_qmoe_weights_are_the_dispatch_weights_rearranged(bits, method):
    source = _source(make_model("mixtral"), QuantConfig(bits, 32, method))
    E, F, H = 6, 96, 64
    for which, K, N in (("qfc1", H, 2 * F), ("qfc2", F, H)):
        packed, scale = (source.tensor(f"layers.1.moe.{which}{s}") for s in ("", "_scale"))
        assert packed.dtype == ir.DataType.UINT8 and tuple(packed.shape) == (E, N, K * bits // 8)
        assert scale.dtype == ir.DataType.FLOAT and tuple(scale.shape) == (E, N, K // 32)
        got = dequantize(_unpack(packed.numpy(), bits), scale.numpy(), 32, axis=-1)  # [E, N, K]
        for e in range(E):
            name = f"layers.1.moe.experts.{e}.{'gate_up' if which == 'qfc1' else 'down'}"
            q, s = source.tensor(name).numpy().astype(np.int8), source.tensor(name + "_scale").numpy()
            want = dequantize(q, s, 32, axis=0).T  # what dispatch's DequantizeLinear gives, [N, K]
            if which == "qfc1":  # rows gate0, up0, gate1, up1 ... (swiglu_fusion=1)
                want = np.stack([want[:F], want[F:]], axis=1).reshape(2 * F, K)
            np.testing.assert_array_equal(got[e], want)


def _forced_router_model(case: str):
    """``case`` with router row e = unit vector e: token feature e is its logit for expert e."""
    model = make_model(case)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.zero_()
                p[torch.arange(p.shape[0]), torch.arange(p.shape[0])] = 1.0
    return model


def _block(source: CheckpointWeights, impl: str, options):
    spec = source.spec
    graph = ir.Graph(inputs=[], outputs=[], nodes=[], opset_imports={"": 21}, name="moe")
    builder = onnxscript.GraphBuilder(graph)
    ctx = GraphContext(builder, source, ir.DataType.FLOAT)
    x = builder.input("x", ir.DataType.FLOAT, ["T", spec.hidden_size])
    builder.add_output(moe_block(ctx, x, spec.moe, "layers.0.moe.", impl, spec.hidden_size), "y")
    graph.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    proto = ir.to_proto(ir.Model(graph, ir_version=10))
    assert sum(n.op_type == "QMoE" for n in proto.graph.node) == (impl == "fused")
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("case, k, routes", [
    # mixtral: E=6, k=3, renormalised top-k; experts 4 and 5 get no token, expert 0 most of them
    ("mixtral", 3, [[0, 1, 2]] * 20 + [[3, 0, 1], [2, 3, 0]]),
    # olmoe: E=8, k=3, top-k weights not renormalised (QMoE given router_weights); one token
    ("olmoe", 3, [[7, 2, 5]]),
    ("olmoe", 3, [[(t + j) % 8 for j in range(3)] for t in range(40)]),
])
def test_forced_routes_fused_matches_dispatch(case, k, routes, bits, float32):
    source = _source(_forced_router_model(case), QuantConfig(bits, 32))
    assert source.spec.moe.top_k == k
    spec = source.spec
    x = tokens_for_routes(routes, spec.moe.num_experts, spec.hidden_size, np.random.default_rng(0))
    want = _block(source, "dispatch", float32).run(None, {"x": x})[0]
    got = _block(source, "fused", float32).run(None, {"x": x})[0]
    assert np.abs(got - want).max() <= TOLERANCE * np.abs(want).max()


def _logits(out, options, steps: int = 2) -> list[np.ndarray]:
    """Logits of a left-padded prefill (batch 2) and ``steps`` decode steps through the KV cache."""
    spec = manifest.read(out).spec
    session = ort.InferenceSession(str(out / "model.onnx"), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ids, mask, pos = left_padded_batch([9, 5], spec.vocab_size, rng)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "num_logits_to_keep": np.array(0),
             **empty_pasts(2, spec.num_layers, manifest.read(out).kv_dims)}
    results = []
    for _ in range(steps + 1):
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
        results.append(outputs["logits"][mask[:, -outputs["logits"].shape[1]:].astype(bool)])
        ids, pos = rng.integers(0, spec.vocab_size, (2, 1)), pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                 "num_logits_to_keep": np.array(0),
                 **{p: outputs[q] for p, q in zip(past_names(spec.num_layers), present_names(spec.num_layers),
                                                 strict=True)}}
    return results


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v2"])
def test_fused_export_matches_dispatch_export(case, weights, tmp_path, float32):
    """Whole exports, prefill and decode: shared experts, dense layers, norm_topk_prob both ways,
    gpt_oss's biases (router and experts) and clamped SwiGLU, deepseek_v2's latent attention."""
    model = make_model(case)
    fused = moe_onnx.export(model, tmp_path / "fused", weights=weights, moe_impl="fused")
    dispatch = moe_onnx.export(model, tmp_path / "dispatch", weights=weights, moe_impl="dispatch")
    graph = onnx.load(str(fused / "model.onnx"), load_external_data=False).graph
    spec = manifest.read(fused).spec
    qmoe = [n for n in graph.node if n.op_type == "QMoE"]
    assert len(qmoe) == sum(spec.is_moe_layer(i) for i in range(spec.num_layers))
    assert not any(n.op_type == "MoE" for n in graph.node)
    bits = {a.name: a.i for a in qmoe[0].attribute}["expert_weight_bits"]
    assert bits == int(weights[3:])
    for want, got in zip(_logits(dispatch, float32), _logits(fused, float32), strict=True):
        assert np.abs(got - want).max() <= TOLERANCE * np.abs(want).max()


def test_verify_of_a_fused_int8_export_runs_qmoe_in_float32(tmp_path):
    """int8 QMoE quantizes activations at every accuracy level unless told otherwise: --verify
    (held to the fp32 tolerance) passes only because it makes the kernel compute in float32."""
    assert QMOE_FLOAT32_ENV[0] not in os.environ
    moe_onnx.export(make_model("mixtral"), tmp_path / "out", weights="int8", moe_impl="fused", verify=True)
    assert QMOE_FLOAT32_ENV[0] not in os.environ


def test_block_size_qmoe_cannot_take_is_one_clear_error(tmp_path):
    src = tmp_path / "src"
    make_model("mixtral").save_pretrained(src)  # expert width 96: blocks of 16 or 32 only
    args = ["export", str(src), "-o", str(tmp_path / "out"), "--moe-impl", "fused", "--weights", "int4",
            "--block-size", "64"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: --moe-impl fused --weights int4 --block-size 64: com.microsoft.QMoE needs the expert "
        "width 96 to be multiples of the block size; use --block-size 16 or 32, or --moe-impl dispatch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_inspect_and_generate_a_fused_int4_export(tmp_path):
    model = make_model("qwen2_moe", eos_token_id=None, bos_token_id=None, pad_token_id=None)
    out = moe_onnx.export(model, tmp_path / "out", weights="int4", moe_impl="fused")
    described = CliRunner().invoke(main, ["inspect", str(out)])
    assert described.exit_code == 0, described.output
    assert "impl fused" in described.output and "weights int4 (block 32, rtn)" in described.output
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "QMoE" for n in graph.node) == 2  # 2 MoE layers around a dense one
    result = rt.load(out, provider="cpu").generate([[3, 4, 5, 6], [7, 8]], max_new_tokens=4)
    assert [len(ids) for ids in result.ids] == [4, 4]
