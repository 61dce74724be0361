"""Hybrid models (recurrent token mixers beside attention, issue 22) through everything that
carries a cache: the runtime's concat and static caches, I/O binding, and the server's continuous
batching, where rows with their own states join and leave a running batch."""

import numpy as np
import pytest
from models import byte_level_tokenizer, make_model
from test_server_continuous import assert_interleaved_arrivals_equal_generate, continuous

import moe_onnx
import moe_onnx.runtime as rt
from moe_onnx import contract as io
from moe_onnx import manifest
from moe_onnx.exporter.verify import compare

HYBRIDS = ["lfm2_moe", "granitemoehybrid", "qwen3_next", "qwen3_5_moe"]


@pytest.fixture(scope="module", params=HYBRIDS)
def hybrid(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    tok = byte_level_tokenizer()
    model = make_model(request.param, vocab_size=tok.get_vocab_size(), eos_token_id=None, bos_token_id=None,
                       pad_token_id=None)
    out = moe_onnx.export(model, tmp / "concat")
    static = moe_onnx.export(model, tmp / "static", kv_cache="static")
    for folder in (out, static):
        tok.save(str(folder / "tokenizer.json"))
    return out, static


def test_the_contract_names_each_state(hybrid):
    out, _ = hybrid
    spec = manifest.read(out).spec
    session = rt.load(out, provider="cpu").inference_session
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    states = spec.state_shapes()
    for i, kind in enumerate(spec.layer_types):
        own = [name for name in states if name.endswith(f".{i}")]
        if kind == "attention":
            assert f"past_key_values.{i}.key" in inputs and f"present.{i}.key" in outputs
            assert own == []
        else:
            assert f"past_key_values.{i}.key" not in inputs
            assert own == [name % i for name in io.STATES[kind]]  # past_conv.{i}, then past_ssm.{i} ...
            for name in own:
                assert inputs[name] == outputs[io.present(name)] == ["batch_size", *states[name]]
    cache = [name for name in inputs if name not in (*io.TOKEN_INPUTS, io.NUM_LOGITS_TO_KEEP)]
    assert cache == io.past_names(spec.num_layers, spec.layer_types) + list(states)  # graph order


@pytest.mark.parametrize("case", HYBRIDS)
def test_fp16_export_is_close(case, tmp_path):
    model = make_model(case, seed=2)
    out = moe_onnx.export(model, tmp_path / "out", dtype="fp16")
    report = compare(model, out, manifest.read(out).spec, lengths=(6, 3), decode_steps=2)
    assert report.max_rel <= 2e-2, report


def test_static_and_bound_caches_generate_like_the_concat_cache(hybrid):
    out, static = hybrid
    prompts = [[5, 17, 33, 2, 9, 64, 71, 12], [40, 3, 99]]
    expected = rt.load(out, provider="cpu").generate(prompts, max_new_tokens=12).ids
    assert rt.load(static, provider="cpu").generate(prompts, max_new_tokens=12).ids == expected
    assert rt.load(out, provider="cpu", io_binding=True).generate(prompts, max_new_tokens=12).ids == expected


def test_a_state_continues_across_forward_calls(hybrid):
    """Prefill in two chunks, feeding the first chunk's cache (states and keys) to the second, gives
    the logits of one prefill of the whole prompt."""
    out, _ = hybrid
    session = rt.load(out, provider="cpu")
    ids = np.array([[5, 17, 33, 2, 9, 64, 71, 12, 40, 3]])
    whole, _ = session.forward(ids)
    first, cache = session.forward(ids[:, :6])
    second, cache = session.forward(ids[:, 6:], cache=cache)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, rtol=1e-4, atol=1e-5)
    assert len(cache.states) == len(manifest.read(out).spec.state_shapes())


@pytest.mark.parametrize("bound", [False, True], ids=["numpy-cache", "ortvalue-cache"])
def test_continuous_batching_answers_equal_session_generate(hybrid, bound):
    """Rows join a running batch at set tokens of others, prefilled in chunks of 4: each answer
    is the runtime's for its request alone, so no row's state leaked into another's."""
    out, _ = hybrid
    session = rt.load(out, provider="cpu", threads=1)
    served = rt.load(out, provider="cpu", threads=1, io_binding=True) if bound else session
    model = continuous(served, max_batch=4, max_queue=8, prefill_chunk=4, prefix_cache_mb=1)
    assert model.scheduler.prefix_cache is None  # a recurrent state cannot be cut to a shorter prefix
    assert_interleaved_arrivals_equal_generate(model, session)


@pytest.mark.parametrize("runtime", ["reference-evaluator", "openvino"])
def test_other_runtimes_run_the_hybrid_like_onnxruntime(hybrid, runtime):
    """Standard ops only (Conv, Scan, If): onnx's own evaluator and plain OpenVINO (skipped where it
    is not installed; float32 arithmetic asked for) give onnxruntime's logits for a prefill and a
    decode step on the returned states and keys (issue 20's runtimes beside onnxruntime)."""
    import onnxruntime as ort

    from moe_onnx import contract as io

    out, _ = hybrid
    m = manifest.read(out)
    spec = m.spec
    prompt = np.array([[5, 17, 33, 2, 9, 64]])
    first = io.prefill_feeds(prompt, spec.num_layers, m.kv_dims, layer_types=spec.layer_types,
                             state_shapes=spec.state_shapes())
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    if runtime == "openvino":
        ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install openvino)")
        float32 = {"INFERENCE_PRECISION_HINT": "f32"}
        compiled = ov.Core().compile_model(str(out / "model.onnx"), "CPU", float32)

        def run(feeds):
            results = compiled(feeds)
            return [results[output] for output in compiled.outputs]
    else:
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(str(out / "model.onnx"))

        def run(feeds):
            return evaluator.run(None, feeds)

    def two_steps(run) -> list[np.ndarray]:
        outputs = dict(zip(names, run(first), strict=True))
        step = {io.INPUT_IDS: np.array([[7]]), io.ATTENTION_MASK: np.ones((1, 7), np.int64),
                io.POSITION_IDS: np.array([[6]]), **io.keep_all()}
        step.update({name: outputs[io.present(name)]
                     for name in [*io.past_names(spec.num_layers, spec.layer_types), *spec.state_shapes()]})
        return [outputs[io.LOGITS], run(step)[0]]

    want = two_steps(lambda feeds: session.run(None, feeds))
    for got, expected in zip(two_steps(run), want, strict=True):
        assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-5


@pytest.mark.parametrize("cache", ["concat", "static"])
def test_runtime_on_openvino_generates_the_hybrid_like_cpu(hybrid, cache):
    """``rt.load(provider="openvino")`` (the plugin EP) on a hybrid: a left-padded batch's greedy
    tokens equal the CPU provider's, states and keys fed back every step. The static-cache export's
    opset-23/24 ops (TensorScatter, and here Attention and RotaryEmbedding) are not all taken by the
    OpenVINO EP: those nodes run on the CPU provider, and the assignment says so."""
    pytest.importorskip("onnxruntime_ep_openvino", reason="the OpenVINO plugin EP is not installed")
    out = hybrid[0] if cache == "concat" else hybrid[1]
    prompts = [[5, 17, 33, 2, 9, 64, 71, 12], [40, 3, 99]]
    session = rt.load(out, provider="openvino")
    assert list(session.assignment)[0] == "OpenVINOExecutionProvider"
    fell_back = session.assignment.get("CPUExecutionProvider", {})
    opset_24 = {"TensorScatter", "Attention", "RotaryEmbedding"}
    assert set(fell_back) <= (opset_24 if cache == "static" else set()), fell_back
    expected = rt.load(out, provider="cpu").generate(prompts, max_new_tokens=12).ids
    assert session.generate(prompts, max_new_tokens=12).ids == expected


def test_inspect_and_bad_states(hybrid):
    """``inspect`` names each state and its size per sequence; a cache whose state has the wrong
    shape is refused by name before onnxruntime sees it."""
    import dataclasses

    from moe_onnx.errors import RuntimeInputError
    from moe_onnx.exporter.describe import describe

    out, _ = hybrid
    m = manifest.read(out)
    text = describe(out)
    assert f"{m.state_bytes / 1e3:.1f} KB per sequence, whatever its length" in text
    assert m.state_bytes == 4 * sum(int(np.prod(s)) for s in m.spec.state_shapes().values())
    session = rt.load(out, provider="cpu")
    _, cache = session.forward(np.array([[5, 17, 33]]))
    first = next(iter(m.spec.state_shapes()))
    bad = dataclasses.replace(cache, states=(cache.states[0][:, :-1], *cache.states[1:]))
    with pytest.raises(RuntimeInputError, match=f"the cache's {first} is"):
        session.forward(np.array([[7]]), cache=bad)
