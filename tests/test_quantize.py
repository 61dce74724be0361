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
    report = compare(reference, out, manifest.read(out).spec, lengths=(7, 3), decode_steps=2, exact=True)
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
    verdict = result.output.splitlines()[-2]  # the last before "wrote OUT"
    assert verdict.startswith("verify (fp32 against the same dequantized weights)"), verdict
    assert ": passed (" in verdict, verdict


def _dequantize_linear(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int,
                       block_size: int) -> np.ndarray:
    """ONNX ``DequantizeLinear`` (opset 21, blocked), from its spec: ``y = (x - zero_point) * scale``,
    where ``scale`` and ``zero_point`` have ``ceil(x.shape[axis] / block_size)`` entries along
    ``axis`` and element ``i`` of that axis reads entry ``i // block_size``."""
    axis = axis % x.ndim
    block_of = np.arange(x.shape[axis]) // block_size
    s = np.take(scale.astype(np.float64), block_of, axis=axis)
    zp = 0.0 if zero_point is None else np.take(zero_point.astype(np.float64), block_of, axis=axis)
    return (x.astype(np.float64) - zp) * s


def _mixtral_source_weights(model) -> dict[str, np.ndarray]:
    """The float weights the export quantizes, straight from the PyTorch state dict, in the
    graph's layout (``[in, out]`` MatMul operands; the embedding table as stored)."""
    sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    out = {"embed_tokens": sd["model.embed_tokens.weight"], "lm_head": sd["lm_head.weight"].T}
    for i in range(model.config.num_hidden_layers):
        a = f"model.layers.{i}.self_attn."
        qkv = [sd[a + x + ".weight"] for x in ("q_proj", "k_proj", "v_proj")]
        out[f"layers.{i}.qkv"] = np.concatenate(qkv).T
        out[f"layers.{i}.o_proj"] = sd[a + "o_proj.weight"].T
        experts = f"model.layers.{i}.mlp.experts."
        for e in range(model.config.num_local_experts):
            out[f"layers.{i}.moe.experts.{e}.gate_up"] = sd[experts + "gate_up_proj"][e].T
            out[f"layers.{i}.moe.experts.{e}.down"] = sd[experts + "down_proj"][e].T
    return out


def _exported_blocks(out) -> dict[str, tuple]:
    """Every quantized initializer of an export: ``name -> (integers, scale, zero point, axis,
    block_size)``, read from the DequantizeLinear nodes; the embedding table, whose gathered
    integer rows are scaled by their gathered block scales (no DequantizeLinear: OpenVINO needs
    a static input for a blocked one), from its two Gathers and the manifest's block size."""
    graph = onnx.load(str(out / "model.onnx")).graph
    init = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    found = {}
    for node in (n for n in graph.node if n.op_type == "DequantizeLinear"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        names = list(node.input)
        zero_point = init[names[2]] if len(names) > 2 and names[2] else None
        axis = attrs.get("axis", 1) % init[names[0]].ndim
        found[names[0]] = (init[names[0]], init[names[1]], zero_point, axis, attrs["block_size"])
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    for table in (t for t in gathered if t in init and t + "_scale" in gathered and t not in found):
        found[table] = (init[table], init[table + "_scale"], None, 1, manifest.read(out).block_size)
    return found


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_exported_integers_and_scales_dequantize_to_the_source_weights(weights, tmp_path):
    """The written int8/int4 initializers, dequantized by the ONNX spec (not by our quantizer),
    are the checkpoint's float weights within half a scale step per element; rtn scales are
    max|w| / qmax of their block (a scale written 1% off fails one check or the other)."""
    model = make_model("mixtral")
    out = moe_onnx.export(model, tmp_path / weights, weights=weights)
    source, blocks = _mixtral_source_weights(model), _exported_blocks(out)
    assert sorted(blocks) == sorted(source)  # every quantized weight checked, none left in float
    bits = int(weights[3:])
    for name, (q, scale, zero_point, axis, block) in blocks.items():
        table_bits = 8 if name == "embed_tokens" else bits  # int4's gathered table is int8
        qmax = 2 ** (table_bits - 1) - 1
        assert str(q.dtype) == f"int{table_bits}", name
        w = source[name]
        assert q.shape == w.shape and block == 32, name
        q = q.astype(np.int8)
        assert q.min() >= -qmax - 1 and q.max() <= qmax
        got = _dequantize_linear(q, scale, zero_point, axis, block)
        step = np.take(scale.astype(np.float64), np.arange(w.shape[axis]) // block, axis=axis)
        err = np.abs(got - w)
        assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all(), (name, float((err / step).max()))
        # rtn: one scale per block, the block's largest magnitude onto qmax.
        padded = np.pad(np.abs(w), [(0, -(-n // block) * block - n) if d == axis else (0, 0)
                                    for d, n in enumerate(w.shape)])
        blocked_w = np.moveaxis(padded, axis, 0)
        amax = blocked_w.reshape(-1, block, *blocked_w.shape[1:]).max(axis=1)
        np.testing.assert_allclose(np.moveaxis(scale, axis, 0), amax / qmax, rtol=1e-6, err_msg=name)


def test_scale_search_lowers_every_blocks_error_in_the_export(tmp_path):
    """``--quant-method search`` against ``rtn`` on the same weights, each dequantized by the ONNX
    spec: no block's squared error grows, and the total falls."""
    model = make_model("mixtral")
    source = _mixtral_source_weights(model)
    errors = {}
    for method in ("rtn", "search"):
        out = moe_onnx.export(model, tmp_path / method, weights="int4", quant_method=method)
        errors[method] = {}
        for name, (q, scale, zero_point, axis, block) in _exported_blocks(out).items():
            sq = (_dequantize_linear(q.astype(np.int8), scale, zero_point, axis, block) - source[name]) ** 2
            sq = np.moveaxis(sq, axis, 0)
            nb = -(-sq.shape[0] // block)
            sq = np.pad(sq, [(0, nb * block - sq.shape[0])] + [(0, 0)] * (sq.ndim - 1))
            errors[method][name] = sq.reshape(nb, block, *sq.shape[1:]).sum(axis=1)
    for name, rtn in errors["rtn"].items():
        assert (errors["search"][name] <= rtn * (1 + 1e-6) + 1e-12).all(), name
    total = {m: sum(float(e.sum()) for e in errs.values()) for m, errs in errors.items()}
    assert total["search"] < 0.99 * total["rtn"], total
