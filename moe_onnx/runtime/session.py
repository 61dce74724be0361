"""An embeddable decoder session over a moe-onnx export: forward with a KV cache, and generate.

Only onnxruntime, numpy and tokenizers are imported: no torch. One :class:`Session` may serve
several threads at once; everything that changes during a call lives in that call.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from moe_onnx import dtypes, manifest
from moe_onnx.contract import LOGITS_TO_KEEP, NUM_LOGITS_TO_KEEP, TOKEN_INPUTS, is_static, past_names
from moe_onnx.errors import MoeOnnxError, RuntimeInputError
from moe_onnx.runtime import inputs, memory, providers
from moe_onnx.runtime import ort_cache as ort_cache_module
from moe_onnx.runtime.cache import KVCache
from moe_onnx.runtime.generate import Generation, GenerationRequest
from moe_onnx.runtime.steps import BoundSteps, HostSteps
from moe_onnx.runtime.threads import session_options
from moe_onnx.runtime.tokenizer import load_tokenizer

__all__ = ["ModelInfo", "RuntimeInputError", "Session", "load"]


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about an export, read from its manifest."""

    num_layers: int
    kv_dims: tuple[tuple[int, int], tuple[int, int]]  # per layer: (heads, dim) of the cached key, the value
    vocab_size: int
    max_positions: int
    dtype: str
    eos_ids: tuple[int, ...]
    pad_id: int
    kv_cache: str = "concat"  # "static": a preallocated buffer the graph updates in place
    layer_types: tuple[str, ...] = ()  # hybrid models: each layer's token mixer (spec.LAYER_TYPES)
    state_names: tuple[str, ...] = ()  # their recurrent states' inputs (past_conv.{i} ...), graph order
    state_shapes: tuple[tuple[int, ...], ...] = ()  # each state's shape without the batch

    @property
    def attention_layers(self) -> int:
        """Layers with a KV cache (every layer unless the model is a hybrid)."""
        return len(past_names(self.num_layers, self.layer_types)) // 2

    @classmethod
    def read(cls, out: Path) -> ModelInfo:
        spec = (m := manifest.read(out)).spec
        eos, pad = _generation_ids(out)
        return cls(spec.num_layers, m.kv_dims, spec.vocab_size, spec.max_position_embeddings, m.dtype,
                   eos, pad, m.kv_cache, spec.layer_types, tuple(spec.state_shapes()),
                   tuple(spec.state_shapes().values()))


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

    def __init__(self, out, provider: str = "auto", threads: int | None = None, *,
                 tf32: bool = False, io_binding: bool | None = None, spin: bool = True,
                 profile_prefix: str | None = None, ort_cache: str = "auto"):
        """``tf32`` lets CUDA run fp32 MatMuls in TensorFloat-32 (faster, ~1e-3 relative error:
        off by default so fp32 logits match PyTorch's to 1e-4). ``io_binding`` keeps the KV cache
        and logits in onnxruntime-allocated memory between steps; None = on CUDA only.
        ``spin=False`` stops this session's own pool from spinning after a run: less CPU burnt
        between calls, a slower next call. A process holding several sessions can give them one
        pool instead (:func:`moe_onnx.runtime.threads.share_threads`, before the first session).
        ``profile_prefix`` turns on onnxruntime's profiler (:mod:`moe_onnx.runtime.profile`).
        ``ort_cache`` (``auto`` | ``on`` | ``off``): on CPU, load the export's prepared copy
        (:mod:`moe_onnx.runtime.ort_cache`: weights mapped from a file, not copied; built on first
        use), ``auto`` for exports of 256 MiB of weights or more."""
        self.path = Path(out)
        self.info = ModelInfo.read(self.path)
        wanted = providers.resolve(provider)
        if self.info.dtype == "bf16" and wanted.ep != providers.CUDA:
            raise MoeOnnxError(
                f"{self.path} is a bf16 export, which needs the CUDA provider (ONNX Runtime's CPU "
                "provider has no bfloat16 kernels); re-export with --dtype fp32 or fp16 to run on CPU"
            )
        model, self.prepared = _model_file(self.path, wanted.ep, ort_cache, threads)
        self._session = _inference_session(model, wanted, threads, tf32, spin, profile_prefix,
                                           optimized=self.prepared, dtype=self.info.dtype)
        _check_graph(self._session, self.info, self.path)
        #: ``{EP: {op_type: nodes}}``, the placed provider first: what ran where (``inspect --provider``)
        self.assignment = providers.check_placement(self._session, wanted, self.path)
        self.provider = wanted.name
        # The provider the model really got: ONNX Runtime may fall back to CPU for this graph.
        self.providers = self._session.get_providers()
        # Where the KV cache lives between steps: the device's memory for CUDA and WebGPU (the
        # OpenVINO EP, on the CPU, takes host arrays).
        devices = {providers.CUDA: "cuda", providers.PLUGINS["webgpu"].ep: "webgpu"}
        self.device = devices.get(self.providers[0], "cpu")
        if self.device != "cuda" and wanted.ep == providers.CUDA:
            if provider == "cuda":
                raise providers.ProviderError(f"ONNX Runtime could not place {self.path} on CUDA")
            providers.log.info("moe-onnx runtime: %s fell back to CPU", self.path)
        if self.info.dtype == "bf16" and self.device != "cuda":
            raise MoeOnnxError(f"{self.path} is a bf16 export and ONNX Runtime placed it on CPU")
        static = self.info.kv_cache == "static"  # always bound: present and past share a buffer
        if static or (io_binding if io_binding is not None else self.device != "cpu"):
            self._steps = BoundSteps(self._session, self.providers, self.device, 0, static=static,
                                     placement=wanted)
        else:
            self._steps = HostSteps(self._session)
        self.tokenizer = load_tokenizer(self.path)

    @property
    def inference_session(self) -> ort.InferenceSession:
        """The underlying onnxruntime session (for tools that feed the graph directly)."""
        return self._session

    # -- one forward step -------------------------------------------------------------------
    def empty_cache(self, batch: int, capacity: int = 0) -> KVCache:
        """A cache of ``batch`` rows and no positions, on this session's device. ``capacity``: the
        positions a static export's buffers should hold without growing (prompt + new tokens)."""
        return self._steps.empty_cache(batch, self.info.kv_dims, capacity)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                logits_to_keep: int = 0):
        """Run ``input_ids`` [B, S] after ``cache`` (empty when None).

        ``attention_mask`` covers past + new positions ([B, P+S]; all ones when None) and
        ``position_ids`` default to the mask's running count. Returns ``(logits [B, S, V]``
        float32 numpy, ``new cache)``; the given cache is not modified. On CUDA the cache stays
        on the GPU; pass it back as it is. ``logits_to_keep = n > 0`` computes the logits of the
        last n positions only (``[B, n, V]``): the lm_head is skipped for the others.
        """
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise RuntimeInputError(f"logits_to_keep must be a non-negative int, got {logits_to_keep!r}")
        ids = inputs.check_ids(input_ids, self.info.vocab_size)
        cache = self._check_cache(cache, ids.shape[0])
        mask = inputs.check_mask(attention_mask, ids, cache.length)
        positions = inputs.check_positions(position_ids, mask, ids, self.info.max_positions)
        logits_BSV, cache = self._steps.forward(ids, mask, positions, cache, logits_to_keep)
        return logits_BSV.astype(np.float32, copy=False), cache

    def next_tokens(self, ids_BS, mask_BT, positions_BS, cache: KVCache, sampling, rng):
        """One step that returns the next token id of every row ``[B]`` and the new cache.

        Unchecked (the generate loop validates its request once): use :meth:`forward` for
        inputs from outside. On CUDA a greedy pick happens on the device.
        """
        return self._steps.next_tokens(ids_BS, mask_BT, positions_BS, cache, sampling, rng)

    def step(self, ids_BS, mask_BT, positions_BS, cache: KVCache, logits_to_keep: int = 0):
        """One unchecked forward whose outputs stay where onnxruntime put them: ``(logits [B, S, V],
        new cache)``, the logits a device OrtValue under I/O binding, else numpy in the graph's dtype.

        For tools that time the graph itself (``moe-onnx bench``): no input checks and no host copy
        of the logits, which :meth:`forward` makes. A static export's kept logits are a buffer the
        same thread's next step reuses: read them before it.
        """
        return self._steps.run(ids_BS, mask_BT, positions_BS, cache, logits_to_keep)

    def _check_cache(self, cache: KVCache | None, batch: int) -> KVCache:
        if cache is None:
            return self.empty_cache(batch)
        if (not isinstance(cache, KVCache) or len(cache.layers) != self.info.attention_layers
                or len(cache.states) != len(self.info.state_names)):
            raise RuntimeInputError(
                f"cache must be a KVCache of {self.info.attention_layers} attention layers "
                f"and {len(self.info.state_names)} states from this session"
            )
        if cache.device != self.device or cache.batch != batch:
            raise RuntimeInputError(
                f"the cache holds {cache.batch} rows on {cache.device}; "
                f"input_ids has {batch} rows on {self.device}"
            )
        info = self.info
        for name, shape, state in zip(info.state_names, info.state_shapes, cache.states, strict=True):
            got = tuple(state.shape() if isinstance(state, ort.OrtValue) else state.shape)
            if got != (batch, *shape):
                raise RuntimeInputError(f"the cache's {name} is {list(got)}, not [{batch}, "
                                        f"{', '.join(map(str, shape))}] (batch, then this model's state)")
        return cache

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompt_or_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop=(), stream: bool = False):
        """Generate from a prompt (text or ids) or a batch of them (left-padded).

        Greedy when ``temperature == 0``. Stops at EOS (from generation_config.json), at any of
        the ``stop`` strings, or after ``max_new_tokens``. With ``stream=True`` returns an
        iterator of :class:`~moe_onnx.runtime.generate.Token` whose ``.result`` is filled at the
        end; otherwise a :class:`~moe_onnx.runtime.generate.GenerationResult`.
        """
        request = GenerationRequest.make(self, prompt_or_ids, max_new_tokens, temperature,
                                         top_k, top_p, seed, stop)
        generation = Generation(self, request)
        if stream:
            return generation
        for _ in generation:
            pass
        return generation.result


def _model_file(out: Path, provider: str, ort_cache: str, threads: int | None = None) -> tuple[Path, bool]:
    """The graph file to load, and whether it is the prepared copy; refuses a load that cannot fit
    this process's memory before onnxruntime starts it."""
    model = out / "model.onnx"
    if not model.is_file():
        raise MoeOnnxError(f"{model} is missing: the export is incomplete")
    if provider != providers.CPU:  # the weights go to the device
        return model, False
    prepared = ort_cache_module.prepared_model(out, ort_cache)
    if prepared is not None:
        packing = ort_cache_module.packing_bytes(prepared, threads or os.cpu_count() or 1)
        need = memory.mapped_need(model, ort_cache_module.resident_bytes(prepared)) + packing
        memory.check_fits(need, f"decoding {out} (its weights outside the experts)")
        return prepared, True
    quantized = not dtypes.DTYPES[manifest.read(out).weights].compute  # int8, int4
    memory.check_fits(memory.copied_need(ort_cache_module.weights_bytes(out), quantized), f"loading {out}")
    return model, False


def _inference_session(path: Path, chosen: providers.Placement, threads: int | None, tf32: bool,
                       spin: bool = True, profile_prefix: str | None = None,
                       optimized: bool = False, dtype: str = "fp32") -> ort.InferenceSession:
    options = session_options(threads, spin=spin)
    if optimized:
        ort_cache_module.session_options_for_prepared(options)
    if profile_prefix:
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
    try:
        return providers.create_session(str(path), options, chosen, threads, tf32, dtype)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises several types for bad files
        detail = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise MoeOnnxError(
            f"cannot load {path} (damaged or incomplete export? re-export it): {detail}"
        ) from None


def _check_graph(session: ort.InferenceSession, info: ModelInfo, out: Path) -> None:
    """The graph must take the inputs of the export contract for the manifest's layer count."""
    expected = [*TOKEN_INPUTS, *past_names(info.num_layers, info.layer_types), *info.state_names]
    names = [i.name for i in session.get_inputs()]
    # Exports before 2026-12-05 take the optional logits_to_keep; before it, neither.
    if names not in (expected, [*expected, NUM_LOGITS_TO_KEEP], [*expected, LOGITS_TO_KEEP]):
        raise MoeOnnxError(
            f"{out / 'model.onnx'} does not follow the moe-onnx decoder contract for its manifest "
            f"({info.num_layers} layers): inputs are {names[:5]}{'...' if len(names) > 5 else ''}"
        )
    if is_static(session.get_inputs()[3].shape) != (info.kv_cache == "static"):
        raise MoeOnnxError(f"{out / 'model.onnx'}'s KV cache inputs do not match its manifest's "
                           f"kv_cache {info.kv_cache!r}")
    for past, (heads, dim) in zip(session.get_inputs()[3:5], info.kv_dims, strict=True):
        if past.shape[1] != heads or past.shape[3] != dim:
            raise MoeOnnxError(f"{out / 'model.onnx'}'s {past.name} is {past.shape}, not the "
                               f"[batch, {heads}, positions, {dim}] of its manifest's kv_dims")


def load(out, provider: str = "auto", threads: int | None = None, **options) -> Session:
    """Load the export in ``out`` on ``auto`` (CUDA when usable, else CPU), ``cpu``, ``cuda``,
    ``openvino`` or ``webgpu`` (onnxruntime's plugin EPs: :mod:`moe_onnx.runtime.providers`);
    ``options`` are :class:`Session`'s keyword options (``tf32``, ``io_binding``)."""
    return Session(out, provider=provider, threads=threads, **options)
