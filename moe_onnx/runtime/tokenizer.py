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

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=self.add_bos).ids

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
    ends in U+FFFD. The delta is held back until the character completes.
    """

    def __init__(self, tokenizer: TextTokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd") or not text.startswith(self._emitted):
            return ""
        delta, self._emitted = text[len(self._emitted):], text
        return delta

    def flush(self) -> str:
        text = self._tok.decode(self._ids)
        delta = text[len(self._emitted):] if text.startswith(self._emitted) else ""
        self._emitted = text
        return delta
