"""The embeddable runtime against transformers: greedy generation token for token, sampling, threads."""

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from models import byte_level_tokenizer, make_model

import moe_onnx
import moe_onnx.runtime as rt
from moe_onnx.errors import MoeOnnxError

PROMPTS = [[5, 17, 33, 2, 9, 64, 71, 12], [40, 3, 99]]


def hf_greedy(model, prompts, n):
    longest = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, longest - len(p):], mask[b, longest - len(p):] = torch.tensor(p), 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[:, longest:].tolist()


GREEDY_CASES = ("llama", "mixtral", "qwen3_moe", "granitemoe", "granitemoeshared", "phimoe", "ernie4_5_moe",
                "gpt_oss", "glm4_moe", "deepseek_v2", "deepseek_v2_groups", "deepseek_v3", "lfm2_moe",
                "afmoe", "granitemoehybrid", "granitemoehybrid_dense_rope", "qwen3_next", "qwen3_5_moe")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rt")
    result = {}
    for case in GREEDY_CASES:
        model = make_model(case, eos_token_id=None, bos_token_id=None, pad_token_id=None)
        result[case] = (model, moe_onnx.export(model, tmp / case))
    return result


@pytest.mark.parametrize("case", GREEDY_CASES)
def test_greedy_equals_transformers(exports, case):
    model, out = exports[case]
    session = rt.load(out, provider="cpu")
    result = session.generate(PROMPTS, max_new_tokens=20)
    assert result.ids == hf_greedy(model, PROMPTS, 20)
    assert result.decode_tokens == 2 * 19 and result.prompt_tokens == 11


def test_streaming_yields_the_same_tokens(exports):
    session = rt.load(exports["mixtral"][1], provider="cpu")
    tokens = list(session.generate(PROMPTS[0], max_new_tokens=10, stream=True))
    assert [t.id for t in tokens] == session.generate(PROMPTS[0], max_new_tokens=10).ids[0]


def test_sampling_is_reproducible_with_a_seed(exports):
    session = rt.load(exports["qwen3_moe"][1], provider="cpu")
    kwargs = dict(max_new_tokens=16, temperature=1.5, top_k=50, top_p=0.95)
    a = session.generate(PROMPTS, seed=1, **kwargs).ids
    assert a == session.generate(PROMPTS, seed=1, **kwargs).ids
    assert a != session.generate(PROMPTS, seed=2, **kwargs).ids


def test_threads_share_one_session(exports):
    session = rt.load(exports["mixtral"][1], provider="cpu", threads=1)
    calls = [dict(prompt_or_ids=PROMPTS[i % 2], max_new_tokens=12, temperature=1.0, seed=i) for i in range(4)]
    serial = [session.generate(**c).ids for c in calls]
    parallel = [None] * 4

    def work(i):
        parallel[i] = session.generate(**calls[i]).ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert parallel == serial


def test_forward_with_cache_matches_full_sequence(exports):
    session = rt.load(exports["llama"][1], provider="cpu")
    ids = np.array([PROMPTS[0]])
    full, _ = session.forward(ids)
    head, cache = session.forward(ids[:, :5])
    tail, cache = session.forward(ids[:, 5:], cache=cache)
    np.testing.assert_allclose(np.concatenate([head, tail], axis=1), full, rtol=1e-4, atol=1e-5)
    assert cache.length == ids.shape[1]


@pytest.mark.parametrize("bad, message", [
    ([[5, 128]], "outside the vocabulary"),
    ([], "empty"),
    (np.array([[1.5, 2.0]]), "integers"),
    (np.array([[[1, 2]]]), "2-D"),
])
def test_bad_inputs_are_clear_errors(exports, bad, message):
    session = rt.load(exports["llama"][1], provider="cpu")
    with pytest.raises(MoeOnnxError, match=message):
        if isinstance(bad, np.ndarray):
            session.forward(bad)
        else:
            session.generate(bad, max_new_tokens=2)


def test_context_beyond_max_positions(exports):
    session = rt.load(exports["llama"][1], provider="cpu")
    with pytest.raises(MoeOnnxError, match="maximum context"):
        session.generate([1, 2, 3], max_new_tokens=300)


def test_not_an_export_and_truncated_model(exports, tmp_path):
    with pytest.raises(MoeOnnxError, match="not a moe-onnx export"):
        rt.load(tmp_path)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(exports["llama"][1], broken)
    data = (broken / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(MoeOnnxError, match="cannot load"):
        rt.load(broken, provider="cpu")


def test_cuda_request_without_gpu_is_an_error():
    if rt.providers.cuda_usable():
        pytest.skip("a usable CUDA provider exists here")
    with pytest.raises(rt.ProviderError, match="CUDA provider is not usable"):
        rt.providers.resolve("cuda")


def test_runtime_does_not_import_torch():
    code = "import sys, moe_onnx.runtime; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.cuda
def test_cuda_greedy_matches_cpu(exports):
    if not rt.providers.cuda_usable():
        pytest.skip("no usable CUDA provider")
    _, out = exports["mixtral"]
    gpu = rt.load(out, provider="cuda")
    assert gpu.device == "cuda"
    on_gpu = gpu.generate(PROMPTS, max_new_tokens=12).ids
    assert on_gpu == rt.load(out, provider="cpu").generate(PROMPTS, max_new_tokens=12).ids
    _, cache = gpu.forward(np.array([PROMPTS[0]]))
    assert cache.layers[0][0].device_name().lower() == "cuda"  # the cache stays on the GPU
    sampled = dict(max_new_tokens=8, temperature=1.0, seed=4)
    assert gpu.generate(PROMPTS, **sampled).ids == gpu.generate(PROMPTS, **sampled).ids


def test_stream_decoder_never_splits_a_character(tmp_path):
    from moe_onnx.runtime.tokenizer import StreamDecoder, TextTokenizer

    byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer(tmp_path / "tokenizer.json")
    text = "日本語 ünïcödé ✓ def"
    ids = tok.encode(text)
    assert len(ids) > len(text.encode("utf-8")) // 3  # multi-byte characters span several tokens
    decoder = StreamDecoder(tok)
    deltas = [decoder.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + decoder.flush() == text


def test_text_prompt_eos_and_cli(tmp_path):
    import json

    from click.testing import CliRunner

    from moe_onnx.cli import main

    tok = byte_level_tokenizer()
    model = make_model("qwen3_moe", vocab_size=tok.get_vocab_size(), eos_token_id=None, pad_token_id=None)
    model.save_pretrained(tmp_path / "src")
    tok.save(str(tmp_path / "src" / "tokenizer.json"))
    out = moe_onnx.export(tmp_path / "src", tmp_path / "out")
    session = rt.load(out, provider="cpu")
    result = session.generate("def f(x):", max_new_tokens=12)
    assert len(result.ids[0]) == 12 and isinstance(result.text, str)
    stream = session.generate("def f(x):", max_new_tokens=12, stream=True)
    assert "".join(t.text for t in stream) == stream.result.text == result.text
    stop = result.text[len(result.text) // 2:][:2]
    cut = session.generate("def f(x):", max_new_tokens=12, stop=[stop])
    assert cut.text == result.text[: result.text.index(stop)] and len(cut.ids[0]) < 12
    # EOS from generation_config.json stops generation: make the first generated token the EOS.
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": result.ids[0][0]}))
    stopped = rt.load(out, provider="cpu").generate("def f(x):", max_new_tokens=12)
    assert stopped.ids[0] == result.ids[0][:1]
    cli = CliRunner().invoke(main, ["run", str(out), "--prompt", "def f(x):", "--max-new-tokens", "4",
                                    "--json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.output.splitlines()[0])["ids"] == result.ids[0][:1]
    assert "tok/s" in cli.output
