"""A checkpoint with only a SentencePiece tokenizer.model gets a tokenizer.json at export when the
conversion is exact; otherwise the runtime reads tokenizer.model with sentencepiece itself. Either
way text prompts work with the torch-free runtime and the ids are SentencePiece's own."""

import io
import json
import logging
import random
import sys

import pytest
import sentencepiece as spm
from click.testing import CliRunner
from models import make_model

import moe_onnx
import moe_onnx.runtime as rt
from moe_onnx.cli import main
from moe_onnx.runtime.tokenizer import StreamDecoder

VOCAB = 320  # 3 specials + 256 byte pieces + merges

WORDS = ("the quick brown fox jumps over lazy dog model expert router token layer weight export graph "
         "sparse dense mixture attention cache prefill decode Hello World Llama Mistral").split()


def train_spm(llama_style: bool = True) -> bytes:
    """A tiny BPE model with byte fallback and digits split. ``llama_style``: Llama's settings (no
    normalization, whitespace kept as it is), which convert to tokenizer.json exactly; otherwise
    SentencePiece's defaults (NFKC, extra whitespace removed), which transformers' conversion
    encodes differently ('Hello' included), so the export writes no tokenizer.json."""
    rng = random.Random(0)
    sentences = []
    for _ in range(400):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99999)))
        sentences.append(" ".join(words) + rng.choice([".", ",", "!", "?", ""]))
    whitespace = dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                      allow_whitespace_only_pieces=True) if llama_style else {}
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, split_digits=True, minloglevel=2, **whitespace,
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def spm_model() -> bytes:
    return train_spm()


def make_source(tmp_path, spm_model: bytes, tokenizer_config: dict | None):
    src = tmp_path / "src"
    make_model("llama", vocab_size=VOCAB).save_pretrained(src)
    (src / "tokenizer.model").write_bytes(spm_model)
    if tokenizer_config is not None:
        (src / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert not (src / "tokenizer.json").exists()
    return src


TEXTS = (
    "the quick brown fox",
    "Hello World, sparse experts route 12345 tokens!",
    "  two leading spaces\tand a tab\nand a new line  ",
    "accents é à ü, CJK 模型 and an emoji 🙂 fall back to bytes",
)


@pytest.mark.parametrize("tokenizer_config", [
    {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
     "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    None,  # tokenizer.model alone
], ids=["with-tokenizer-config", "tokenizer-model-only"])
def test_sentencepiece_only_checkpoint_gets_tokenizer_json(tmp_path, spm_model, tokenizer_config):
    src = make_source(tmp_path, spm_model, tokenizer_config)
    out = moe_onnx.export(src, tmp_path / "out")
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer.model").is_file()
    assert "tokenizer.json" in json.loads((out / "moe_onnx.json").read_text())["tokenizer_files"]

    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    session = rt.load(out, provider="cpu")
    assert session.tokenizer is not None
    for text in TEXTS:
        assert session.tokenizer.encode(text) == [sp.bos_id()] + sp.encode(text), text

    result = session.generate("the quick brown fox", max_new_tokens=8)
    assert result.prompt_tokens == 1 + len(sp.encode("the quick brown fox"))
    assert result.ids[0] and isinstance(result.text, str)
    specials = {sp.unk_id(), sp.bos_id(), sp.eos_id()}
    assert result.text == sp.decode([i for i in result.ids[0] if i not in specials])


def test_add_bos_false_is_respected(tmp_path, spm_model):
    src = make_source(tmp_path, spm_model, {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False})
    out = moe_onnx.export(src, tmp_path / "out")
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    assert rt.load(out, provider="cpu").tokenizer.encode(TEXTS[1]) == sp.encode(TEXTS[1])


def test_without_sentencepiece_warns_and_exports(tmp_path, spm_model, monkeypatch, caplog):
    src = make_source(tmp_path, spm_model, None)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails as if not installed
    with caplog.at_level(logging.WARNING, logger="moe_onnx"):
        out = moe_onnx.export(src, tmp_path / "out")
    assert (out / "model.onnx").is_file() and (out / "tokenizer.model").is_file()
    assert not (out / "tokenizer.json").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "tokenizer.model" in warnings[0] and "sentencepiece" in warnings[0]


def test_unconvertible_model_is_not_written(tmp_path, spm_model, monkeypatch, caplog):
    """A conversion that disagrees with SentencePiece is dropped with a warning, not shipped."""
    from moe_onnx.exporter import tokenizer_files

    src = make_source(tmp_path, spm_model, None)
    monkeypatch.setattr(tokenizer_files, "SAMPLES", ("a sample",))
    original = spm.SentencePieceProcessor.encode
    monkeypatch.setattr(spm.SentencePieceProcessor, "encode",
                        lambda self, text, *a, **k: original(self, text, *a, **k) + [3])
    with caplog.at_level(logging.WARNING, logger="moe_onnx"):
        out = moe_onnx.export(src, tmp_path / "out")
    assert not (out / "tokenizer.json").exists()
    assert any("not converted" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def inexact_export(tmp_path_factory):
    """An export of a checkpoint whose tokenizer.model does not convert exactly: no tokenizer.json."""
    tmp = tmp_path_factory.mktemp("inexact")
    src = make_source(tmp, train_spm(llama_style=False), None)
    out = moe_onnx.export(src, tmp / "out")
    assert not (out / "tokenizer.json").exists() and (out / "tokenizer.model").is_file()
    return out


def test_inexact_model_is_read_by_sentencepiece(inexact_export):
    sp = spm.SentencePieceProcessor(model_file=str(inexact_export / "tokenizer.model"))
    tok = rt.load(inexact_export, provider="cpu").tokenizer
    assert tok is not None
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == [sp.bos_id()] + sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids[1:]), text
        decoder = StreamDecoder(tok)
        deltas = [decoder.push(i) for i in ids]
        assert all("\ufffd" not in d for d in deltas), text  # byte-fallback characters arrive whole
        assert "".join(deltas) + decoder.flush() == sp.decode(ids[1:]), text


def test_inexact_model_generates_from_text(inexact_export):
    sp = spm.SentencePieceProcessor(model_file=str(inexact_export / "tokenizer.model"))
    session = rt.load(inexact_export, provider="cpu")
    stream = session.generate("Hello World", max_new_tokens=12, stream=True)
    streamed = "".join(token.text for token in stream)
    assert stream.result.prompt_tokens == 1 + len(sp.encode("Hello World"))
    assert streamed == stream.result.text == sp.decode(
        [i for i in stream.result.ids[0] if not (sp.is_control(i) or sp.is_unknown(i))])
    cli = CliRunner().invoke(main, ["run", str(inexact_export), "--prompt", "Hello World",
                                    "--max-new-tokens", "4"])
    assert cli.exit_code == 0, cli.output
    assert "tok/s" in cli.output


def test_without_sentencepiece_text_names_the_package(inexact_export, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails as if not installed
    session = rt.load(inexact_export, provider="cpu")
    assert session.tokenizer is None
    assert session.generate([1, 5, 9], max_new_tokens=2).ids  # ids still work
    with pytest.raises(rt.RuntimeInputError, match=r"sentencepiece package: pip install"):
        session.generate("Hello World", max_new_tokens=2)
    cli = CliRunner().invoke(main, ["run", str(inexact_export), "--prompt", "Hello World"])
    assert cli.exit_code == 2 and cli.output.startswith("error: ") and cli.output.count("\n") == 1, cli.output
    assert "pip install 'moe-onnx[spm]'" in cli.output
