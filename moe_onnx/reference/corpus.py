"""The training text every machine has: the Python standard library's own top-level sources.

Files are listed in sorted order; a file is held out for evaluation when the SHA-1 of its name
falls in bucket 0 of 10, so the split depends on names only, not on the Python build.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import numpy as np

EOS = "<|endoftext|>"


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files), both sorted and disjoint."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    held_out = [f for f in files if int(hashlib.sha1(f.name.encode()).hexdigest(), 16) % 10 == 0]
    train = [f for f in files if f not in held_out]
    return train, held_out


def files_digest(files: list[Path]) -> str:
    """SHA-256 (16 hex digits) over the files' names and bytes, in the order given."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def split_record(train: list[Path], held_out: list[Path]) -> dict:
    """The split as recorded in each checkpoint's training.json."""
    return {"corpus": "Python standard library, top-level *.py, sorted; held out: sha1(name) % 10 == 0",
            "python_stdlib": str(Path(sysconfig.get_paths()["stdlib"])),
            "train_files": [f.name for f in train], "train_files_digest": files_digest(train),
            "heldout_files": [f.name for f in held_out], "heldout_files_digest": files_digest(held_out)}


def train_tokenizer(files: list[Path], vocab_size: int):
    """A byte-level BPE tokenizer (tokenizers library) whose id 0 is ``<|endoftext|>`` (BOS and EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train([str(f) for f in files], trainer)
    return tokenizer


def save_tokenizer(tokenizer, folder: Path, max_length: int) -> None:
    """tokenizer.json plus a tokenizer_config.json that transformers' AutoTokenizer reads too."""
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
              "pad_token": EOS, "add_bos_token": False, "model_max_length": max_length}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def token_stream(tokenizer, files: list[Path]) -> np.ndarray:
    """All files' tokens, each file followed by EOS, as one int64 array."""
    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for f in files:
        ids += tokenizer.encode(f.read_text(encoding="utf-8", errors="replace")).ids + [eos]
    return np.asarray(ids, dtype=np.int64)
