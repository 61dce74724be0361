"""Text in and out: the export's ``tokenizer.json`` with the tokenizers library, else its
SentencePiece ``tokenizer.model`` with the sentencepiece library (optional: the ``spm`` extra).
No transformers either way.

A ``tokenizer.model`` whose conversion to ``tokenizer.json`` is not exact (the export refuses
to write an inexact one) is read by SentencePiece itself, so text works for every checkpoint
that ships a tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer

from moe_onnx.errors import MoeOnnxError

SPM_INSTALL = "pip install 'moe-onnx[spm]' (or pip install sentencepiece)"


class TextCodec(Protocol):
    """What generation and the server need of a tokenizer."""

    add_bos: bool

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def load_tokenizer(folder: Path) -> TextCodec | None:
    """The export's tokenizer: ``tokenizer.json``, else ``tokenizer.model`` when sentencepiece is
    installed; None otherwise (:func:`no_tokenizer_message` says why)."""
    if (folder / "tokenizer.json").is_file():
        return TextTokenizer(folder / "tokenizer.json")
    if (folder / "tokenizer.model").is_file() and _has_sentencepiece():
        return SentencePieceTokenizer(folder / "tokenizer.model")
    return None


def no_tokenizer_message(folder: Path) -> str:
    """Why text cannot be given to the export in ``folder``, and what to do instead."""
    if (folder / "tokenizer.model").is_file():
        return (f"{folder} has only a SentencePiece tokenizer.model, which needs the sentencepiece "
                f"package: {SPM_INSTALL}; or give token ids, not text")
    return f"{folder} has no tokenizer.json: give token ids, not text"


def _has_sentencepiece() -> bool:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True


class TextTokenizer:
    """Encodes prompts and decodes generated ids incrementally."""

    def __init__(self, path: Path):
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise MoeOnnxError(f"cannot load tokenizer {path}: {err}") from None
        self.add_bos = _adds_bos(path.parent)

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of ``text``, with special tokens (BOS) as the export's ``add_bos_token`` says
        unless ``add_special_tokens`` decides: False for a rendered chat template, which holds its
        own BOS (as transformers' ``apply_chat_template`` tokenizes)."""
        add = self.add_bos if add_special_tokens is None else add_special_tokens
        # encode_batch releases the GIL (encode holds it): a server tokenizing a long prompt on a
        # worker thread keeps answering others meanwhile
        return self._tok.encode_batch([text], add_special_tokens=add)[0].ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()


class SentencePieceTokenizer:
    """Encodes and decodes with SentencePiece's own processor: the ids are exactly those the
    checkpoint was trained with, whatever its normalization and whitespace rules."""

    def __init__(self, path: Path):
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise MoeOnnxError(f"cannot load tokenizer {path}: {err}") from None
        self.add_bos = _adds_bos(path.parent) and self._sp.bos_id() >= 0

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of ``text``, BOS first as :meth:`TextTokenizer.encode` decides."""
        add = self.add_bos if add_special_tokens is None else add_special_tokens
        bos = [self._sp.bos_id()] if add and self._sp.bos_id() >= 0 else []
        return bos + self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without control and unknown pieces (as ``skip_special_tokens`` does),
        nor ids past the SentencePiece vocabulary (a model's padded embedding rows)."""
        size = self._sp.get_piece_size()
        return self._sp.decode([i for i in ids if 0 <= i < size and not self._skipped(i)])

    def _skipped(self, token_id: int) -> bool:
        return self._sp.is_control(token_id) or self._sp.is_unknown(token_id)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()


def _adds_bos(folder: Path) -> bool:
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return True
    try:
        return bool(json.loads(config.read_text()).get("add_bos_token", True))
    except ValueError:
        return True


class StreamDecoder:
    """Turns a growing list of ids into text deltas without splitting multi-byte characters.

    Byte-level BPE can end a token in the middle of a UTF-8 character; the decoded text then
    ends in U+FFFD and the delta is held back until the character completes. Only a window of
    recent ids is decoded per token (decoding everything would cost O(n) per token): the text
    of ``ids[prefix:read]`` was already emitted, ``ids[prefix:]`` minus it is new. Decoding from
    ``prefix`` rather than ``read`` keeps word-boundary spaces that a decoder (SentencePiece's
    leading "▁") drops at the start of a sequence.
    """

    def __init__(self, tokenizer: TextCodec):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # ids before this are out of the window
        self._read = 0  # ids before this have been emitted as text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        emitted = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        if (text.endswith("\ufffd") and not final) or not text.startswith(emitted):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(emitted):]
