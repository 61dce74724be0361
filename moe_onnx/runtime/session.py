"""An embeddable decoder session over a moe-onnx export: forward with a KV cache, and generate.

Only onnxruntime, numpy and tokenizers are imported: no torch. One :class:`Session` may serve
several threads at once; everything that changes during a call lives in that call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from moe_onnx.contract import TOKEN_INPUTS, past_names
from moe_onnx.errors import MoeOnnxError
from moe_onnx.runtime import providers
from moe_onnx.runtime.cache import KVCache
from moe_onnx.runtime.steps import BoundSteps, HostSteps
from moe_onnx.runtime.tokenizer import TextTokenizer

_DTYPES = ("fp32", "fp16", "bf16")


class RuntimeInputError(MoeOnnxError):
    """Inputs that the model cannot take (token ids, shapes, dtypes, context length)."""


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about an export, read from its manifest."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    dtype: str
    eos_ids: tuple[int, ...]
    pad_id: int

    @classmethod
    def read(cls, out: Path) -> ModelInfo:
        path = out / "moe_onnx.json"
        if not out.is_dir():
            raise MoeOnnxError(f"{out} is not a directory (expected a moe-onnx export folder)")
        if not path.is_file():
            raise MoeOnnxError(f"{out} is not a moe-onnx export (no moe_onnx.json)")
        try:
            manifest = json.loads(path.read_text())
            spec, dtype = manifest["spec"], manifest["dtype"]
            sizes = [int(spec[k]) for k in ("num_layers", "num_kv_heads", "head_dim", "vocab_size",
                                             "max_position_embeddings")]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MoeOnnxError(f"{path} is not a valid moe-onnx manifest ({type(err).__name__}: {err})") from None
        if dtype not in _DTYPES:
            raise MoeOnnxError(f"{path}: unknown dtype {dtype!r} (expected one of {', '.join(_DTYPES)})")
        eos, pad = _generation_ids(out)
        return cls(*sizes, dtype, eos, pad)


def _generation_ids(out: Path) -> tuple[tuple[int, ...], int]:
    path = out / "generation_config.json"
    try:
        gen = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        raise MoeOnnxError(f"{path} is not valid JSON") from None
    eos = gen.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    pad = gen.get("pad_token_id")
    return eos_ids, int(pad if pad is not None else (eos_ids[0] if eos_ids else 0))


class Session:
    """A loaded export. Use :func:`moe_onnx.runtime.load` to make one."""

    def __init__(self, out, provider: str = "auto", threads: int | None = None):
        self.path = Path(out)
        self.info = ModelInfo.read(self.path)
        self.providers = providers.resolve(provider)
        self.device = "cuda" if self.providers[0] == providers.CUDA else "cpu"
        if self.info.dtype == "bf16" and self.device != "cuda":
            raise MoeOnnxError(
                f"{self.path} is a bf16 export, which needs the CUDA provider (ONNX Runtime's CPU "
                "provider has no bfloat16 kernels); re-export with --dtype fp32 or fp16 to run on CPU"
            )
        self._session = _inference_session(self.path / "model.onnx", self.providers, threads)
        _check_graph(self._session, self.info, self.path)
        if self.device == "cuda":
            self._steps = BoundSteps(self._session, self.info.num_layers, self.providers, "cuda", 0)
        else:
            self._steps = HostSteps(self._session, self.info.num_layers)
        tok_path = self.path / "tokenizer.json"
        self.tokenizer = TextTokenizer(tok_path) if tok_path.is_file() else None

    # -- one forward step -------------------------------------------------------------------
    def empty_cache(self, batch: int) -> KVCache:
        """A cache of ``batch`` rows and no positions, on this session's device."""
        return self._steps.empty_cache(batch, self.info.num_kv_heads, self.info.head_dim)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        """Run ``input_ids`` [B, S] after ``cache`` (empty when None).

        ``attention_mask`` covers past + new positions ([B, P+S]; all ones when None) and
        ``position_ids`` default to the mask's running count. Returns ``(logits [B, S, V]``
        float32 numpy, ``new cache)``; the given cache is not modified. On CUDA the cache stays
        on the GPU; pass it back as it is.
        """
        ids = self._check_ids(input_ids)
        cache = self._check_cache(cache, ids.shape[0])
        mask = self._check_mask(attention_mask, ids, cache.length)
        if position_ids is None:
            position_ids = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -ids.shape[1]:]
        positions = np.asarray(position_ids)
        if positions.shape != ids.shape or positions.dtype.kind not in "iu":
            raise RuntimeInputError(f"position_ids must be integer {ids.shape}, got {positions.dtype} {positions.shape}")
        if positions.min() < 0 or positions.max() >= self.info.max_positions:
            raise RuntimeInputError(
                f"position {int(positions.max())} is outside the model's {self.info.max_positions} positions"
            )
        logits_BSV, cache = self._steps.forward(ids, mask, np.ascontiguousarray(positions, dtype=np.int64), cache)
        return logits_BSV.astype(np.float32, copy=False), cache

    def _check_ids(self, input_ids) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.dtype.kind not in "iu":
            raise RuntimeInputError(f"input_ids must hold integers, got dtype {ids.dtype}")
        if ids.ndim != 2:
            raise RuntimeInputError(f"input_ids must be 2-D [batch, seq], got shape {ids.shape}")
        if ids.shape[1] == 0:
            raise RuntimeInputError("input_ids is empty: need at least one token")
        if ids.min() < 0 or ids.max() >= self.info.vocab_size:
            bad = int(ids.max() if ids.max() >= self.info.vocab_size else ids.min())
            raise RuntimeInputError(f"token id {bad} is outside the vocabulary [0, {self.info.vocab_size})")
        return np.ascontiguousarray(ids, dtype=np.int64)

    def _check_cache(self, cache: KVCache | None, batch: int) -> KVCache:
        if cache is None:
            return self.empty_cache(batch)
        if not isinstance(cache, KVCache) or len(cache.layers) != self.info.num_layers:
            raise RuntimeInputError(f"cache must be a KVCache of {self.info.num_layers} layers from this session")
        if cache.device != self.device or cache.batch != batch:
            raise RuntimeInputError(
                f"the cache holds {cache.batch} rows on {cache.device}; input_ids has {batch} rows on {self.device}"
            )
        return cache

    def _check_mask(self, attention_mask, ids: np.ndarray, past: int) -> np.ndarray:
        expected = (ids.shape[0], past + ids.shape[1])
        if attention_mask is None:
            return np.ones(expected, dtype=np.int64)
        mask = np.asarray(attention_mask)
        if mask.shape != expected or mask.dtype.kind not in "iub":
            raise RuntimeInputError(f"attention_mask must be integer {expected}, got {mask.dtype} {mask.shape}")
        return np.ascontiguousarray(mask, dtype=np.int64)

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompt_or_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop=(), stream: bool = False):
        """Generate from a prompt (text or ids) or a batch of them (left-padded).

        Greedy when ``temperature == 0``. Stops at EOS (from generation_config.json), at any of
        the ``stop`` strings, or after ``max_new_tokens``. With ``stream=True`` returns an
        iterator of :class:`~moe_onnx.runtime.generate.Token` whose ``.result`` is filled at the
        end; otherwise a :class:`~moe_onnx.runtime.generate.GenerationResult`.
        """
        from moe_onnx.runtime.generate import Generation, GenerationRequest

        request = GenerationRequest.make(self, prompt_or_ids, max_new_tokens, temperature, top_k, top_p, seed, stop)
        generation = Generation(self, request)
        if stream:
            return generation
        for _ in generation:
            pass
        return generation.result


def _inference_session(path: Path, chosen: list[str], threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors reach the user through the exception, not the C++ log
    if threads:
        options.intra_op_num_threads = threads
    if not path.is_file():
        raise MoeOnnxError(f"{path} is missing: the export is incomplete")
    try:
        return ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises several types for bad files
        detail = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise MoeOnnxError(f"cannot load {path} (damaged or incomplete export? re-export it): {detail}") from None


def _check_graph(session: ort.InferenceSession, info: ModelInfo, out: Path) -> None:
    """The graph must take the inputs of the export contract for the manifest's layer count."""
    expected = [*TOKEN_INPUTS, *past_names(info.num_layers)]
    names = [i.name for i in session.get_inputs()]
    if names != expected:
        raise MoeOnnxError(
            f"{out / 'model.onnx'} does not follow the moe-onnx decoder contract for its manifest "
            f"({info.num_layers} layers): inputs are {names[:5]}{'...' if len(names) > 5 else ''}"
        )


def load(out, provider: str = "auto", threads: int | None = None) -> Session:
    """Load the export in ``out`` on ``auto`` (CUDA when usable, else CPU), ``cuda`` or ``cpu``."""
    return Session(out, provider=provider, threads=threads)
