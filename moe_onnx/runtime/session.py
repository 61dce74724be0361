"""An embeddable decoder session over a moe-onnx export: forward with a KV cache, and generate.

Only onnxruntime, numpy and tokenizers are imported: no torch. One :class:`Session` may serve
several threads at once; everything that changes during a call lives in that call.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from moe_onnx.errors import MoeOnnxError
from moe_onnx.runtime import providers
from moe_onnx.runtime.cache import KVCache
from moe_onnx.runtime.tokenizer import TextTokenizer

log = logging.getLogger("moe_onnx.runtime")
_KV_DTYPES = {"fp32": np.float32, "fp16": np.float16}


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
    kv_dtype: type
    eos_ids: tuple[int, ...]
    pad_id: int

    @classmethod
    def read(cls, out: Path) -> ModelInfo:
        path = out / "moe_onnx.json"
        if not path.is_file():
            raise MoeOnnxError(f"{out} is not a moe-onnx export (no moe_onnx.json)")
        try:
            manifest = json.loads(path.read_text())
            spec = manifest["spec"]
        except (ValueError, KeyError):
            raise MoeOnnxError(f"{path} is not a valid moe-onnx manifest") from None
        if manifest.get("dtype") not in _KV_DTYPES:
            raise MoeOnnxError(f"the runtime runs fp32 and fp16 exports; {out} is {manifest.get('dtype')}")
        eos, pad = _generation_ids(out)
        return cls(spec["num_layers"], spec["num_kv_heads"], spec["head_dim"], spec["vocab_size"],
                   spec["max_position_embeddings"], _KV_DTYPES[manifest["dtype"]], eos, pad)


def _generation_ids(out: Path) -> tuple[tuple[int, ...], int]:
    path = out / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
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
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(str(self.path / "model.onnx"), options, providers=self.providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises several types for bad files
            raise MoeOnnxError(f"cannot load {self.path / 'model.onnx'}: {str(err).splitlines()[0][:300]}") from None
        self._outputs = [o.name for o in self._session.get_outputs()]
        tok_path = self.path / "tokenizer.json"
        self.tokenizer = TextTokenizer(tok_path) if tok_path.is_file() else None

    # -- one forward step -------------------------------------------------------------------
    def empty_cache(self, batch: int) -> KVCache:
        i = self.info
        return KVCache.empty(i.num_layers, batch, i.num_kv_heads, i.head_dim, i.kv_dtype, self.device)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        """Run ``input_ids`` [B, S] after ``cache`` (empty when None).

        ``attention_mask`` covers past + new positions ([B, P+S]; all ones when None) and
        ``position_ids`` default to the mask's running count. Returns ``(logits [B, S, V],
        new cache)``; the given cache is not modified.
        """
        ids = self._check_ids(input_ids)
        cache = cache if cache is not None else self.empty_cache(ids.shape[0])
        mask = self._check_mask(attention_mask, ids, cache.length)
        if position_ids is None:
            position_ids = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -ids.shape[1]:]
        positions = np.ascontiguousarray(position_ids, dtype=np.int64)
        if positions.shape != ids.shape:
            raise RuntimeInputError(f"position_ids has shape {positions.shape}, expected {ids.shape}")
        if positions.size and positions.max() >= self.info.max_positions:
            raise RuntimeInputError(
                f"position {int(positions.max())} is beyond the model's maximum of {self.info.max_positions} positions"
            )
        if self.device == "cuda":
            return self._forward_cuda(ids, mask, positions, cache)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        for i, (key, value) in enumerate(cache.layers):
            feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = key, value
        outputs = self._session.run(self._outputs, feeds)
        return outputs[0], KVCache(list(zip(outputs[1::2], outputs[2::2], strict=True)), "cpu")

    def _forward_cuda(self, ids, mask, positions, cache: KVCache):
        """I/O binding: past and present stay on the GPU; only logits come back to the host."""
        binding = self._session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("position_ids", positions)
        for i, (key, value) in enumerate(cache.layers):
            binding.bind_ortvalue_input(f"past_key_values.{i}.key", key)
            binding.bind_ortvalue_input(f"past_key_values.{i}.value", value)
        binding.bind_output("logits", "cpu")
        for name in self._outputs[1:]:
            binding.bind_output(name, "cuda", 0)
        self._session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        layers = list(zip(outputs[1::2], outputs[2::2], strict=True))
        return outputs[0].numpy(), KVCache(layers, "cuda")

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


def load(out, provider: str = "auto", threads: int | None = None) -> Session:
    """Load the export in ``out`` on ``auto`` (CUDA when usable, else CPU), ``cuda`` or ``cpu``."""
    return Session(out, provider=provider, threads=threads)
