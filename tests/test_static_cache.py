"""The static KV cache (``--kv-cache static``): a preallocated buffer per layer that the graph
updates in place with TensorScatter. Same logits as transformers and as the default export;
the runtime binds each present to its past, grows buffers when a step needs more, and keeps
older caches right for themselves."""

from __future__ import annotations

import json
import threading

import numpy as np
import onnx
import pytest
from models import CASES, make_model

import moe_onnx
from moe_onnx import manifest
from moe_onnx import runtime as rt
from moe_onnx.contract import CAPACITY
from moe_onnx.errors import MoeOnnxError
from moe_onnx.exporter.verify import compare
from moe_onnx.runtime.steps import CAPACITY_STEP


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same MoE model (GQA, shared expert) exported with both caches; room for > 256 positions."""
    root = tmp_path_factory.mktemp("static")
    model = make_model("qwen2_moe", max_position_embeddings=1024)
    concat = moe_onnx.export(model, root / "concat")
    static = moe_onnx.export(model, root / "static", kv_cache="static")
    return model, concat, static


@pytest.mark.parametrize("case", sorted(CASES))  # every family: RoPE, masks, biases in the static graph
def test_static_parity_with_transformers(case, tmp_path):
    model = make_model(case)
    out = moe_onnx.export(model, tmp_path / "out", kv_cache="static")
    report = compare(model, out, manifest.read(out).spec)
    assert report.max_rel <= 1e-4, report
    assert report.argmax_agree == 1.0, report


def test_static_graph_and_manifest(pair):
    _, concat, static = pair
    graph = onnx.load(static / "model.onnx", load_external_data=False)
    assert graph.opset_import[0].version == 24
    assert sum(n.op_type == "TensorScatter" for n in graph.graph.node) == 2 * 3  # K and V, 3 layers
    assert not any(n.op_type == "Concat" and "present" in n.output[0] for n in graph.graph.node)
    ops = [n.op_type for n in graph.graph.node]  # opset 24's standard ops: one node each per layer
    assert ops.count("Attention") == 3 and ops.count("RotaryEmbedding") == 2 * 3
    past = graph.graph.input[3].type.tensor_type.shape.dim[2].dim_param
    present = graph.graph.output[1].type.tensor_type.shape.dim[2].dim_param
    assert past == present == CAPACITY
    assert manifest.read(static).kv_cache == "static" and manifest.read(concat).kv_cache == "concat"
    assert not (static / "genai_config.json").exists() and (concat / "genai_config.json").exists()


def test_static_generates_like_the_default_export(pair):
    _, concat, static = pair
    prompts = [[5, 9, 17, 33, 2, 8, 71], [40, 3, 12]]  # batch 2, left padded
    a = rt.load(concat, provider="cpu").generate(prompts, max_new_tokens=24)
    b = rt.load(static, provider="cpu").generate(prompts, max_new_tokens=24)
    assert a.ids == b.ids and len(a.ids[0]) == 24


def test_static_steps_write_in_place_and_grow(pair):
    _, concat, static = pair
    sa, sb = rt.load(concat, provider="cpu"), rt.load(static, provider="cpu")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, (2, 200))
    la, ca = sa.forward(ids)
    lb, cb = sb.forward(ids)
    np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-5)
    assert (cb.length, cb.capacity) == (200, CAPACITY_STEP)
    buffer = cb.layers[1][0]
    for step in range(120):  # crosses 256: the buffers are copied into larger ones once
        token = rng.integers(0, 128, (2, 1))
        la, ca = sa.forward(token, cache=ca)
        before = cb
        lb, cb = sb.forward(token, cache=cb)
        np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-5, err_msg=f"step {step}")
        if cb.length <= CAPACITY_STEP:  # in place: the same buffers, one position more
            assert cb.layers[1][0] is before.layers[1][0] is buffer
    assert (cb.length, cb.capacity) == (320, 2 * CAPACITY_STEP)
    key = cb.layers[1][0].numpy()
    np.testing.assert_allclose(key[:, :, :320], ca.layers[1][0], rtol=1e-4, atol=1e-5)
    assert not key[:, :, 320:].any()  # the rest of the buffer untouched


def test_logits_returned_are_not_overwritten_by_the_next_step(pair):
    session = rt.load(pair[2], provider="cpu")
    first, cache = session.forward(np.array([[7, 8, 9]]), logits_to_keep=1)
    kept = first.copy()
    second, _ = session.forward(np.array([[4]]), cache=cache, logits_to_keep=1)
    np.testing.assert_array_equal(first, kept)
    assert not np.array_equal(first, second)
    more, _ = session.forward(np.array([[4]]), cache=cache, logits_to_keep=5)  # more than S: all S
    np.testing.assert_array_equal(more, second)


def test_an_older_static_cache_seeds_another_continuation(pair):
    _, concat, static = pair
    sa, sb = rt.load(concat, provider="cpu"), rt.load(static, provider="cpu")
    prompt = np.array([[7, 8, 9, 10, 11]])
    _, seed_a = sa.forward(prompt)
    _, seed_b = sb.forward(prompt)
    for first in ([[1]], [[2]], [[3]]):  # each continuation overwrites the previous one's position
        la, _ = sa.forward(first, cache=seed_a)
        lb, cache = sb.forward(first, cache=seed_b)
        np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-5)
        assert cache.length == 6 and seed_b.length == 5


def test_a_graph_that_does_not_match_its_manifest_is_refused(pair, tmp_path):
    _, _, static = pair
    import shutil

    copy = shutil.copytree(static, tmp_path / "copy")
    data = json.loads((copy / "moe_onnx.json").read_text())
    data["kv_cache"] = "concat"
    (copy / "moe_onnx.json").write_text(json.dumps(data))
    with pytest.raises(MoeOnnxError, match="kv_cache"):
        rt.load(copy, provider="cpu")


def test_unknown_kv_cache_is_refused(tmp_path):
    with pytest.raises(MoeOnnxError, match="unknown kv cache 'ring'"):
        moe_onnx.export(make_model("llama"), tmp_path / "out", kv_cache="ring")
    assert not (tmp_path / "out").exists()


def test_fp16_static_matches_fp16_concat(tmp_path):
    model = make_model("qwen3_moe")
    concat = rt.load(moe_onnx.export(model, tmp_path / "c", dtype="fp16"), provider="cpu")
    static = rt.load(moe_onnx.export(model, tmp_path / "s", dtype="fp16", kv_cache="static"), provider="cpu")
    ids = np.random.default_rng(1).integers(0, 128, (2, 12))
    la, ca = concat.forward(ids)
    lb, cb = static.forward(ids)
    np.testing.assert_allclose(lb, la, rtol=2e-2, atol=2e-2)
    la, _ = concat.forward(ids[:, :1], cache=ca)
    lb, _ = static.forward(ids[:, :1], cache=cb)
    np.testing.assert_allclose(lb, la, rtol=2e-2, atol=2e-2)
    assert cb.layers[0][0].data_type() == "tensor(float16)"


@pytest.mark.cuda
def test_cuda_static_cache_matches_cpu(pair):
    if not rt.providers.cuda_usable():
        pytest.skip("no usable CUDA provider")
    _, _, static = pair
    gpu, cpu = rt.load(static, provider="cuda"), rt.load(static, provider="cpu")
    prompts = [[5, 9, 17, 33, 2, 8, 71], [40, 3, 12]]
    assert gpu.generate(prompts, max_new_tokens=12).ids == cpu.generate(prompts, max_new_tokens=12).ids
    _, cache = gpu.forward(np.array([prompts[0]]))
    assert cache.layers[0][0].device_name().lower() == "cuda"  # the buffers live on the GPU
    for _ in range(CAPACITY_STEP):  # grows past one capacity step on the device
        _, cache = gpu.forward(np.array([[3]]), cache=cache)
    assert cache.capacity == 2 * CAPACITY_STEP and cache.layers[0][0].device_name().lower() == "cuda"


@pytest.mark.parametrize("kv_cache", ["concat", "static"])
def test_fp16_kv_cache_under_fp32_compute(kv_cache, tmp_path):
    """--kv-dtype fp16: the cache holds half the bytes, the logits stay within fp16's tolerance of
    transformers (verify holds the export to it), and generation runs on it."""
    from click.testing import CliRunner

    from moe_onnx.cli import main

    model = make_model("mixtral")
    out = moe_onnx.export(model, tmp_path / "out", kv_cache=kv_cache, kv_dtype="fp16", verify=True)
    m = manifest.read(out)
    assert (m.dtype, m.kv_dtype, m.kv.name) == ("fp32", "fp16", "fp16")
    graph = onnx.load(out / "model.onnx", load_external_data=False)
    assert graph.graph.input[3].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    report = compare(model, out, m.spec)
    assert report.max_rel <= 2e-2 and report.argmax_agree == 1.0, report
    full = moe_onnx.export(model, tmp_path / "fp32", kv_cache=kv_cache)
    assert m.kv_bytes_per_token * 2 == manifest.read(full).kv_bytes_per_token
    session = rt.load(out, provider="cpu")
    _, cache = session.forward(np.array([[5, 6, 7]]))
    key = cache.layers[0][0]
    assert (key.data_type() == "tensor(float16)") if kv_cache == "static" else (key.dtype == np.float16)
    prompts = [[5, 6, 7, 9, 30], [40, 3]]
    expected = rt.load(full).generate(prompts, max_new_tokens=8).ids
    assert session.generate(prompts, max_new_tokens=8).ids == expected
    assert "fp16, " in CliRunner().invoke(main, ["inspect", str(out)]).output


def test_kv_dtype_refusals(tmp_path):
    with pytest.raises(MoeOnnxError, match="--kv-dtype fp32 with --dtype fp16"):
        moe_onnx.export(make_model("llama"), tmp_path / "a", dtype="fp16", kv_dtype="fp32")
    with pytest.raises(MoeOnnxError, match="--kv-dtype bf16 is not supported"):
        moe_onnx.export(make_model("llama"), tmp_path / "b", kv_dtype="bf16")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_threads_generating_at_once_on_one_static_session(pair):
    """Two threads generating on one session (as a server with one model may) each get the tokens
    they would get alone: the reused logits buffer is per thread."""
    from concurrent.futures import ThreadPoolExecutor

    session = rt.load(pair[2], provider="cpu")
    prompts = [[5, 9, 17, 33], [40, 3, 12, 7, 8, 99]]
    alone = [session.generate(p, max_new_tokens=16).ids for p in prompts]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda p: session.generate(p, max_new_tokens=16).ids, prompts * 3))
    assert together == alone * 3


def test_eval_on_a_static_export_matches_the_default(tmp_path):
    """``moe-onnx eval`` (perplexity and routing through the graph) feeds a static export its
    buffers and scores it as the concat export."""
    from models import TEXT_FILE, export_with_tokenizer

    from moe_onnx.evaluation import evaluate

    _, concat = export_with_tokenizer("qwen2_moe", tmp_path)
    static = moe_onnx.export(tmp_path / "src", tmp_path / "static", kv_cache="static", kv_dtype="fp16")
    a = evaluate(concat, [TEXT_FILE], window=32, max_windows=2, routing=True)
    b = evaluate(static, [TEXT_FILE], window=32, max_windows=2, routing=True)
    assert abs(a.perplexity - b.perplexity) / a.perplexity < 1e-3 and a.routing == b.routing


def test_a_decode_loop_keeps_its_binding_until_the_buffers_grow(pair):
    """Steps that keep the last logits rebind only the tokens: one binding while the buffers stay,
    a new one when they grow past 256 (and when another cache is stepped); the logits match the
    concat export's at every step."""
    _, concat, static = pair
    sa, sb = rt.load(concat, provider="cpu"), rt.load(static, provider="cpu")
    ids = np.random.default_rng(1).integers(0, 128, (2, 250))
    _, ca = sa.forward(ids)
    _, cb = sb.forward(ids)
    bindings = []
    for step in range(12):  # 250 -> 262: the buffers grow once, at 256
        token = np.array([[step + 3], [step + 40]])
        la, ca = sa.forward(token, cache=ca, logits_to_keep=1)
        lb, cb = sb.forward(token, cache=cb, logits_to_keep=1)
        np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-5, err_msg=f"step {step}")
        bindings.append(sb._steps._static_bindings[threading.get_ident()][3])
    assert len({id(b) for b in bindings[:6]}) == 1 and len({id(b) for b in bindings[6:]}) == 1
    assert bindings[5] is not bindings[6]
    _, other = sb.forward(ids[:, :5])
    sb.forward(np.array([[1], [2]]), cache=other, logits_to_keep=1)
    assert sb._steps._static_bindings[threading.get_ident()][3] is not bindings[-1]


def test_bench_pasts_built_in_chunks_match_one_prefill(pair):
    """The bench builds each decode context by prefills no longer than its longest prompt (a
    session's arena keeps its peak): the cache equals one prefill of the whole context."""
    from moe_onnx.benchmarks.runners import OnnxRunner

    ids = np.random.default_rng(3).integers(0, 128, (1, 23))
    for out in pair[1:]:
        session = rt.load(out, provider="cpu")
        whole, chunked = OnnxRunner(session), OnnxRunner(session, max_chunk=8)
        whole.prepare_decode(ids)
        chunked.prepare_decode(ids)
        a, b = whole.pasts[23], chunked.pasts[23]
        assert a.length == b.length == 23
        for layer_a, layer_b in zip(a.layers, b.layers, strict=True):
            for x, y in zip(layer_a, layer_b, strict=True):
                x, y = (t.numpy() if hasattr(t, "numpy") else t for t in (x, y))
                np.testing.assert_allclose(y[:, :, :23], x[:, :, :23], rtol=1e-5, atol=1e-5)
