"""A ``tokenizer.json`` for checkpoints that ship only a SentencePiece ``tokenizer.model``.

The runtime reads ``tokenizer.json`` with the ``tokenizers`` library (no transformers at run time;
``tokenizer.model`` itself only through the optional sentencepiece package). Many
Llama/Mistral-era checkpoints have only ``tokenizer.model``:
at export it is converted with transformers (the tokenizer class the checkpoint declares, else
Llama's with SentencePiece's whitespace rules), and the result is kept only if it encodes sample
text to exactly the ids SentencePiece gives (with the BOS the runtime adds). Without transformers or
sentencepiece, or when no conversion agrees, one warning says so and the export goes on.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("moe_onnx.export")

# Text the converted tokenizer must encode exactly as SentencePiece does.
SAMPLES = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    " a leading space,  two  spaces, and a trailing one ",
    "tabs\tand\nnew lines\n\nin 1234567 numbers: 3.14159",
    "def f(x):\n    return x ** 2  # code",
    "naïve café, Ünïcödé – 日本語のテキスト 😀",
)


def convert_sentencepiece(src_dir: Path, out: Path) -> bool:
    """Write ``out/tokenizer.json`` converted from ``src_dir/tokenizer.model`` when the source has
    no ``tokenizer.json``. Call it after the source's tokenizer files are copied into ``out``.
    Returns whether it was written; a failure is one warning, never an error."""
    model = src_dir / "tokenizer.model"
    if not model.is_file() or (src_dir / "tokenizer.json").exists():
        return False
    try:
        import sentencepiece  # noqa: F401 - transformers' conversion reads the model with it
        import transformers  # noqa: F401
    except ImportError as err:
        log.warning("%s not converted to tokenizer.json (needs %s: pip install transformers sentencepiece); "
                    "text prompts will need token ids instead",
                    model, err.name or "transformers and sentencepiece")
        return False
    target = out / "tokenizer.json"
    problems = []
    for label, make in _candidates(src_dir):
        try:
            with _quiet_transformers():
                tokenizer = make()
            tokenizer.backend_tokenizer.save(str(target))
            mismatch = _mismatch(model, target)
        except Exception as err:  # noqa: BLE001 - transformers raises many types; we only warn
            problems.append(f"{label}: {_first_line(err)}")
            continue
        if mismatch is None:
            log.info("converted %s to tokenizer.json (%s)", model, label)
            return True
        problems.append(f"{label}: {mismatch}")
    target.unlink(missing_ok=True)
    log.warning("%s not converted to tokenizer.json (%s); text prompts will need token ids instead",
                model, "; ".join(problems))
    return False


def _candidates(src_dir: Path):
    """The tokenizer the checkpoint declares (tokenizer_config.json / config.json), as
    transformers converts it; then Llama's with SentencePiece's own whitespace handling (the
    layout of Llama 2's tokenizer.json), for checkpoints whose tokenizer.model is Llama's format
    and which transformers' conversion encodes differently (e.g. a leading space)."""
    from transformers import AutoTokenizer, LlamaTokenizer

    add_bos = _adds_bos(src_dir)

    def declared():
        return AutoTokenizer.from_pretrained(src_dir, trust_remote_code=False, add_bos_token=add_bos)

    def llama_sentencepiece_whitespace():
        from tokenizers import normalizers

        tokenizer = LlamaTokenizer.from_pretrained(src_dir, add_bos_token=add_bos)
        backend = tokenizer.backend_tokenizer
        # What SentencePiece does: a dummy-prefix "▁", then every space a "▁"; no pre-split.
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
        return tokenizer

    yield "AutoTokenizer", declared
    yield "LlamaTokenizer with SentencePiece whitespace", llama_sentencepiece_whitespace


def _adds_bos(folder: Path) -> bool:
    """The runtime's rule: add BOS unless tokenizer_config.json says ``add_bos_token: false``
    (the sample check reads the result as the runtime does, so the two cannot drift apart)."""
    config = folder / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text()).get("add_bos_token", True))
    except (OSError, ValueError, AttributeError):
        return True


def _mismatch(model: Path, converted: Path) -> str | None:
    """How the converted tokenizer, read as the runtime reads it, differs from SentencePiece on
    the sample text; None when it does not."""
    import sentencepiece as spm

    from moe_onnx.runtime.tokenizer import TextTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok = TextTokenizer(converted)
    bos = [sp.bos_id()] if tok.add_bos and sp.bos_id() >= 0 else []
    for text in SAMPLES:
        want, got = bos + sp.encode(text), tok.encode(text)
        if want != got:
            return f"it encodes {text!r} to {got[:8]}... where sentencepiece gives {want[:8]}..."
    return None


@contextmanager
def _quiet_transformers():
    """Silence transformers' warnings and logging while a tokenizer is converted."""
    from transformers.utils import logging as tf_logging

    level = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tf_logging.set_verbosity(level)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
