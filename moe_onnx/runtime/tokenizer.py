"""Text in and out with the export's ``tokenizer.json`` (the tokenizers library, no transformers)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from moe_onnx.errors import MoeOnnxError


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
        return self._tok.encode(text, add_special_tokens=add).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()


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

    def __init__(self, tokenizer: TextTokenizer):
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
