"""Block-wise int8/int4 weights: the numpy quantizer, every family's quantized export against
PyTorch with the same dequantized weights, ONNX Runtime's MatMulNBits fusion, and bad input."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from models import CASES, make_model

import moe_onnx
import moe_onnx.runtime as rt
from moe_onnx import manifest
from moe_onnx.cli import main
from moe_onnx.errors import MoeOnnxError
from moe_onnx.exporter import families
from moe_onnx.exporter.export import load_spec
from moe_onnx.exporter.verify import compare, fake_quantized
from moe_onnx.quantize import QuantConfig, dequantize, quantize


def _reference(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Dequantized ``w`` [K, N], block by block with plain loops (the spec, slowly)."""
    qmax = 2 ** (bits - 1) - 1
    out = np.empty_like(w)
    for start in range(0, w.shape[0], block):
        for n in range(w.shape[1]):
            x = w[start:start + block, n]
            scale = np.abs(x).max() / qmax
            q = np.clip(np.rint(x / scale), -qmax - 1, qmax) if scale else np.zeros_like(x)
            out[start:start + block, n] = q * scale
    return out


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("K", [64, 176])  # 176 = 5 blocks of 32 + a partial block of 16
def test_round_trip_matches_the_reference(bits, K):
    w = np.random.default_rng(K).standard_normal((K, 24)).astype(np.float32)
    w[:32, 3] = 0.0  # an all-zero block keeps a zero scale and zeros
    cfg = QuantConfig(bits, 32)
    q, scale = quantize(w, cfg, axis=0)
    assert q.dtype == np.int8 and q.shape == w.shape and scale.shape == (-(-K // 32), 24)
    assert q.min() >= cfg.qmin and q.max() <= cfg.qmax
    want = _reference(w, bits, 32)
    np.testing.assert_allclose(dequantize(q, scale, 32, axis=0), want, rtol=1e-6, atol=1e-7)
    # The same blocks along the last axis of the transpose (a torch Linear [out, in]).
    qt, st = quantize(w.T, cfg, axis=-1)
    np.testing.assert_array_equal(qt, q.T)


def test_scale_search_never_loses_to_round_to_nearest():
    w = np.random.default_rng(0).standard_t(3, size=(256, 64)).astype(np.float32)  # heavy tails
    errors = {}
    for method in ("rtn", "search"):
        cfg = QuantConfig(4, 32, method)
        errors[method] = float(((dequantize(*quantize(w, cfg), 32) - w) ** 2).sum())
    assert errors["search"] < errors["rtn"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=3), "unsupported weight bits 3"),
    (dict(bits=4, block_size=48), "unsupported block size 48"),
    (dict(bits=4, method="gptq"), "unknown scale method"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(MoeOnnxError, match=message):
        QuantConfig(**kwargs)


def test_one_dimensional_tensor_is_refused():
    with pytest.raises(MoeOnnxError, match="cannot quantize a 1-D tensor"):
        quantize(np.ones(64, np.float32), QuantConfig(8))


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_family_matches_pytorch_with_the_same_dequantized_weights(case, weights, tmp_path):
    model = make_model(case)
    out = moe_onnx.export(model, tmp_path / "out", weights=weights)
    m = manifest.read(out)
    assert (m.dtype, m.weights, m.block_size) == ("fp32", weights, 32)
    names = families.get(CASES[case][0]).names  # router and shared gate: kept in float by name
    reference = fake_quantized(model, QuantConfig(int(weights[3:]), 32), names)
    report = compare(reference, out, load_spec(out), lengths=(7, 3), decode_steps=2, exact=True)
    assert report.max_rel < 1e-4 and report.argmax_agree == 1.0, report


def _optimized_ops(out, tmp_path) -> Counter:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / "model.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    return Counter(n.op_type for n in optimized.graph.node)


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "llama"])
def test_every_quantized_matmul_weight_is_fused_into_matmulnbits(case, tmp_path):
    """Each quantized MatMul weight (attention, MLP, every expert, shared expert, lm_head) must
    reach ONNX Runtime's MatMulNBits; only the embedding's gathered rows keep a DequantizeLinear."""
    out = moe_onnx.export(make_model(case), tmp_path / "out", weights="int4")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    dq_inputs = [n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"]
    matmul_weights = [x for x in dq_inputs if x != "embed_tokens" and not x.startswith("v_")]
    assert len(matmul_weights) > 0
    ops = _optimized_ops(out, tmp_path)
    assert ops["MatMulNBits"] == len(matmul_weights), ops
    gathered = sum(1 for n in graph.node if n.op_type == "Gather" and n.input[0] == "embed_tokens")
    assert ops["DequantizeLinear"] <= 3 * gathered  # ORT may duplicate the rows' DQ per consumer


def test_runtime_generates_from_an_int4_export_and_inspect_reports_it(tmp_path):
    model = make_model("mixtral", eos_token_id=None, bos_token_id=None, pad_token_id=None)
    out = moe_onnx.export(model, tmp_path / "int4", weights="int4", block_size=64)
    session = rt.load(out, provider="cpu")
    result = session.generate([[3, 4, 5, 6], [7, 8]], max_new_tokens=5)
    assert [len(ids) for ids in result.ids] == [5, 5]
    described = CliRunner().invoke(main, ["inspect", str(out)])
    assert described.exit_code == 0 and "weights int4 (block 64, rtn)" in described.output


@pytest.mark.parametrize("args, message", [
    (["--weights", "int4", "--dtype", "bf16"], "no bfloat16 MatMulNBits kernel"),
    (["--weights", "int8", "--moe-impl", "fused", "--block-size", "64"],
     "com.microsoft.QMoE needs the expert width"),
])
def test_cli_refuses_unsupported_combinations(args, message, tmp_path):
    src = tmp_path / "src"
    make_model("mixtral").save_pretrained(src)
    result = CliRunner().invoke(main, ["export", str(src), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.cuda
def test_int4_with_fp16_activations_on_cuda(tmp_path):
    """MatMulNBits has CUDA kernels: an fp16 int4 export on CUDA agrees with the fp32 int4 export
    of the same weights on CPU (within fp16's tolerance) and generates on the device."""
    if not rt.providers.cuda_usable():
        pytest.skip("no usable CUDA provider")
    model = make_model("mixtral", eos_token_id=None, bos_token_id=None, pad_token_id=None)
    gpu_out = moe_onnx.export(model, tmp_path / "fp16", dtype="fp16", weights="int4")
    cpu_out = moe_onnx.export(model, tmp_path / "fp32", weights="int4")
    gpu, cpu = rt.load(gpu_out, provider="cuda"), rt.load(cpu_out, provider="cpu")
    assert gpu.device == "cuda"
    ids = np.array([[3, 4, 5, 6, 7, 8]])
    got, want = gpu.forward(ids)[0], cpu.forward(ids)[0]
    assert np.abs(got - want).max() / np.abs(want).max() < 2e-2
    assert len(gpu.generate([[3, 4, 5]], max_new_tokens=6).ids[0]) == 6


def test_verify_text_prints_the_perplexity_of_both(tmp_path):
    """``--verify-text``: PyTorch and ONNX perplexity of the shipped MoE on a text, side by side."""
    import os

    from moe_onnx.reference.demo import default_models_dir

    text = tmp_path / "text.py"
    text.write_text(open(os.__file__).read()[:40000])
    args = ["export", str(default_models_dir() / "moe"), "-o", str(tmp_path / "out"), "--weights", "int8",
            "--verify-text", str(text)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("perplexity on text.py"))
    torch_ppl, onnx_ppl = (float(x) for x in re.search(r"PyTorch ([\d.]+), ONNX ([\d.]+)", line).groups())
    assert abs(onnx_ppl / torch_ppl - 1) < 0.01  # int8: the bar is 0.5% on the held-out set
    assert "verify (fp32 against the same dequantized weights)" in result.output
