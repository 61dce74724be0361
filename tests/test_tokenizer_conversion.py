"""A checkpoint with only a SentencePiece tokenizer.model gets a tokenizer.json at export, so
text prompts work with the torch-free runtime; the ids are SentencePiece's own."""

import io
import json
import logging
import random
import sys

import pytest
import sentencepiece as spm
from models import make_model

import moe_onnx
import moe_onnx.runtime as rt

VOCAB = 320  # 3 specials + 256 byte pieces + merges

WORDS = ("the quick brown fox jumps over lazy dog model expert router token layer weight export graph "
         "sparse dense mixture attention cache prefill decode Hello World Llama Mistral").split()


def train_llama_style_spm() -> bytes:
    """A tiny BPE model with Llama's settings: byte fallback, digits split, no normalization,
    whitespace kept as it is."""
    rng = random.Random(0)
    sentences = []
    for _ in range(400):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99999)))
        sentences.append(" ".join(words) + rng.choice([".", ",", "!", "?", ""]))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, minloglevel=2,
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def spm_model() -> bytes:
    return train_llama_style_spm()


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
