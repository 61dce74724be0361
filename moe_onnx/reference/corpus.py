"""The training text every machine has: the Python standard library's own top-level sources.

Files are listed in sorted order; a file is held out for evaluation when the SHA-1 of its name
falls in bucket 0 of 10, so the split depends on names only, not on the Python build.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files), both sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    held_out = [f for f in files if int(hashlib.sha1(f.name.encode()).hexdigest(), 16) % 10 == 0]
    train = [f for f in files if f not in held_out]
    return train, held_out


def files_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def train_tokenizer(files: list[Path], vocab_size: int):
    """A byte-level BPE tokenizer (tokenizers library) with an ``<|endoftext|>`` EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train([str(f) for f in files], trainer)
    return tokenizer


def token_stream(tokenizer, files: list[Path]) -> np.ndarray:
    """All files' tokens, each file followed by EOS, as one int64 array."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for f in files:
        ids += tokenizer.encode(f.read_text(encoding="utf-8", errors="replace")).ids + [eos]
    return np.asarray(ids, dtype=np.int64)
