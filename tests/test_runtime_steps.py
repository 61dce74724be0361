"""Runtime internals: the I/O-binding step path (run on CPU here), head graphs, sampling, text streaming."""

import numpy as np
import onnxruntime as ort
import pytest
from models import make_model

import moe_onnx
import moe_onnx.runtime as rt
from moe_onnx.runtime.sampling import SamplingConfig, _candidates, sample
from moe_onnx.runtime.steps import _head_session
from moe_onnx.runtime.tokenizer import StreamDecoder, TextTokenizer

CPU = ["CPUExecutionProvider"]
PROMPTS = [[5, 17, 33, 2, 9, 64, 71, 12], [40, 3, 99]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = make_model("llama", num_hidden_layers=2, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return moe_onnx.export(model, tmp_path_factory.mktemp("steps") / "llama")


def bound_on_cpu(out) -> rt.Session:
    """A session whose steps take the device (I/O binding) path, with the CPU as the device."""
    return rt.load(out, provider="cpu", io_binding=True)


def test_bound_steps_equal_host_steps(llama):
    host, bound = rt.load(llama, provider="cpu"), bound_on_cpu(llama)
    assert bound.generate(PROMPTS, max_new_tokens=8).ids == host.generate(PROMPTS, max_new_tokens=8).ids
    kwargs = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert bound.generate(PROMPTS, **kwargs).ids == host.generate(PROMPTS, **kwargs).ids
    ids = np.array([PROMPTS[0]])
    logits_host, cache_host = host.forward(ids[:, :5])
    logits_bound, cache_bound = bound.forward(ids[:, :5])
    np.testing.assert_allclose(logits_bound, logits_host, rtol=1e-6, atol=1e-6)
    assert isinstance(cache_bound.layers[0][0], ort.OrtValue) and cache_bound.length == 5
    tail_host, _ = host.forward(ids[:, 5:], cache=cache_host)
    tail_bound, _ = bound.forward(ids[:, 5:], cache=cache_bound)
    np.testing.assert_allclose(tail_bound, tail_host, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_head_graphs(dtype):
    logits_BSV = np.random.default_rng(0).standard_normal((3, 4, 50)).astype(dtype)
    onnx_type = {np.float32: 1, np.float16: 10}[dtype]

    def run(name):
        return _head_session(name, onnx_type, CPU).run(None, {"logits": logits_BSV})[0]

    np.testing.assert_array_equal(run("all"), logits_BSV.astype(np.float32))
    np.testing.assert_array_equal(run("last"), logits_BSV[:, -1].astype(np.float32))
    np.testing.assert_array_equal(run("argmax"), logits_BSV[:, -1].astype(np.float32).argmax(-1))


def test_fp16_export_runs_on_cpu(tmp_path):
    model = make_model("llama", num_hidden_layers=2, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    session = rt.load(moe_onnx.export(model, tmp_path / "fp16", dtype="fp16"), provider="cpu")
    logits, cache = session.forward([PROMPTS[0]])
    assert logits.dtype == np.float32 and cache.layers[0][0].dtype == np.float16
    assert len(session.generate(PROMPTS, max_new_tokens=4).ids[1]) == 4


def test_sampling_filters():
    rng = np.random.default_rng(0)
    logits_BV = rng.standard_normal((2, 1000)) * 3
    greedy = logits_BV.argmax(-1)
    np.testing.assert_array_equal(sample(logits_BV, SamplingConfig(1.0, top_k=1), rng), greedy)
    np.testing.assert_array_equal(sample(logits_BV, SamplingConfig(1.0, top_p=1e-9), rng), greedy)
    top5 = set(np.argsort(-logits_BV[0])[:5])
    assert {int(sample(logits_BV[:1], SamplingConfig(2.0, top_k=5), rng)[0]) for _ in range(50)} <= top5


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (0, 0.999), (40, 0.5), (200, 1.0), (1, 0.3)])
def test_candidates_match_a_full_sort(top_k, top_p):
    scaled_V = np.random.default_rng(1).standard_normal(5000) * 2
    probs_V = np.exp(scaled_V - scaled_V.max())
    probs_V /= probs_V.sum()
    order = np.argsort(-probs_V, kind="stable")[: top_k or None]
    keep = np.searchsorted(np.cumsum(probs_V[order]), top_p) + 1 if top_p < 1 else len(order)
    expected = order[:keep]
    order_C, probs_C = _candidates(scaled_V, SamplingConfig(1.0, top_k, top_p))
    np.testing.assert_array_equal(order_C, expected)
    np.testing.assert_allclose(probs_C, probs_V[expected] / probs_V[expected].sum())


def test_no_filter_keeps_the_whole_vocabulary():
    order_C, probs_C = _candidates(np.arange(10.0), SamplingConfig(1.0))
    assert sorted(order_C) == list(range(10)) and np.isclose(probs_C.sum(), 1.0)


def test_sampling_differs_by_seed_and_repeats_with_it():
    logits_BV = np.zeros((1, 100))
    draw = [sample(logits_BV, SamplingConfig(1.0), np.random.default_rng(s))[0] for s in (1, 1, 2, 3, 4)]
    assert draw[0] == draw[1] and len(set(draw)) > 1


def _metaspace_tokenizer(tmp_path):
    """A SentencePiece-style tokenizer (Metaspace "▁", byte fallback) like Llama's and Mistral's."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"], show_progress=False)
    tok.train_from_iterator(["the cat sat on the mat, " * 20, "hello world"], trainer)
    trained = json.loads(tok.to_str())["model"]
    vocab = dict(trained["vocab"])
    vocab.update({f"<0x{i:02X}>": len(vocab) + i for i in range(256)})
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(["<unk>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    return TextTokenizer(tmp_path / "tokenizer.json")


def test_stream_decoder_keeps_spaces_and_characters(tmp_path):
    tok = _metaspace_tokenizer(tmp_path)
    text = "the cat sat on the mat, 日本 ✓ hello"
    ids = tok.encode(text)
    decoder = StreamDecoder(tok)
    deltas = [decoder.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + decoder.flush() == tok.decode(ids) == text
    assert sum(1 for d in deltas if d) > 5  # really incremental, not all held to the end


@pytest.mark.parametrize("io_binding", [False, True])
def test_logits_to_keep_computes_the_last_positions_only(llama, io_binding):
    session = rt.load(llama, provider="cpu", io_binding=io_binding)
    ids = np.array([PROMPTS[0]])
    full, _ = session.forward(ids)
    for keep in (1, 3, 100):
        kept, _ = session.forward(ids, logits_to_keep=keep)
        assert kept.shape == (1, min(keep, ids.shape[1]), full.shape[-1])
        np.testing.assert_allclose(kept, full[:, -kept.shape[1]:], rtol=1e-5, atol=1e-5)
    with pytest.raises(rt.RuntimeInputError, match="logits_to_keep"):
        session.forward(ids, logits_to_keep=-1)


@pytest.mark.parametrize("io_binding", [False, True])
def test_exports_with_the_old_optional_logits_to_keep_still_run(llama, tmp_path, io_binding):
    """Exports before 2026-12-05 take ``logits_to_keep`` as an input with a default (0): the runtime
    feeds it only when it keeps fewer positions, and generates as from today's export."""
    import shutil

    import onnx
    from onnx import helper

    legacy = tmp_path / "legacy"
    shutil.copytree(llama, legacy)
    model = onnx.load(str(legacy / "model.onnx"), load_external_data=False)
    for value in [*model.graph.input, *model.graph.node]:
        if hasattr(value, "type") and value.name == "num_logits_to_keep":
            value.name = "logits_to_keep"
        for i, name in enumerate(getattr(value, "input", [])):
            if name == "num_logits_to_keep":
                value.input[i] = "logits_to_keep"
    model.graph.initializer.append(helper.make_tensor("logits_to_keep", onnx.TensorProto.INT64, [], [0]))
    onnx.save(model, str(legacy / "model.onnx"))
    old = rt.load(legacy, provider="cpu", io_binding=io_binding)
    assert [i.name for i in old.inference_session.get_overridable_initializers()] == ["logits_to_keep"]
    new = rt.load(llama, provider="cpu", io_binding=io_binding)
    assert old.generate(PROMPTS, max_new_tokens=6).ids == new.generate(PROMPTS, max_new_tokens=6).ids
    ids = np.array([PROMPTS[0]])
    np.testing.assert_allclose(old.forward(ids)[0], new.forward(ids)[0], rtol=1e-6)
    assert old.forward(ids, logits_to_keep=2)[0].shape[1] == 2
