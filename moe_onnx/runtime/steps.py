"""One decoder step on a loaded graph: on the host with numpy, or on a device with I/O binding.

Legend: B batch, S new tokens, T past + new positions, V vocabulary, G kv heads, D head_dim (of
the key or the value: an export's ``kv_dims``, which differ for MLA's latent cache).

:class:`HostSteps` (CPU) hands the ``present`` arrays onnxruntime returns straight back as the
next ``past``: no copy. :class:`BoundSteps` (CUDA) binds every ``present`` to device memory and
feeds those OrtValues back as ``past``, so the cache never leaves the GPU; the logits stay there
too, and a tiny head graph on the same device picks the last position (and, when greedy, its
argmax), so one token's host traffic is the new ids, the mask and positions up, the sampled ids
(or one row of logits per prompt, when sampling) down.

A static export (``kv_cache: "static"``) always runs bound, on the CPU too: each ``present`` is
bound to its own ``past`` buffer, so the graph's ``TensorScatter`` writes the new positions in
place. Buffers are zeroed, sized in multiples of :data:`CAPACITY_STEP` positions (the mask hides
the rest, as llama.cpp pads its KV view to 256), and grown by a copy when a step needs more
(see :meth:`BoundSteps.empty_cache` for when a capacity hint is taken).
"""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort

from moe_onnx import dtypes
from moe_onnx.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    LOGITS_TO_KEEP,
    NUM_LOGITS_TO_KEEP,
    POSITION_IDS,
    present,
)
from moe_onnx.runtime.cache import KVCache
from moe_onnx.runtime.sampling import SamplingConfig, sample
from moe_onnx.runtime.threads import session_options

CAPACITY_STEP = 256  # a static cache's capacity is a multiple of this


class HostSteps:
    """Steps on the CPU provider: numpy arrays in and out."""

    device = "cpu"

    def __init__(self, session: ort.InferenceSession):
        self._session = session
        self._io = GraphIO(session)
        self._keep, self._keep_required = _keeps_logits(session)

    def empty_cache(self, batch: int, kv_dims, capacity: int = 0) -> KVCache:
        """No positions; ``kv_dims`` the key's and the value's ``(G, D)``; zeroed states."""
        key, value = (np.zeros((batch, heads, 0, dim), dtype=self._io.kv_type) for heads, dim in kv_dims)
        states = tuple(np.zeros((batch, *shape), self._io.state_type) for shape in self._io.state_shapes)
        return KVCache([(key, value)] * self._io.attention_layers, "cpu", states=states)

    def forward(self, ids_BS, mask_BT, positions_BS, cache: KVCache,
                keep: int = 0) -> tuple[np.ndarray, KVCache]:
        """Logits ``[B, S, V]`` (the last ``keep`` positions when ``keep`` > 0 and the graph can)
        and the cache after these tokens."""
        feeds = {INPUT_IDS: ids_BS, ATTENTION_MASK: mask_BT, POSITION_IDS: positions_BS}
        feeds.update(zip(self._io.inputs, _flat(cache), strict=True))
        if self._keep and (keep or self._keep_required):
            feeds[self._keep] = np.array(keep, np.int64)
        outputs = self._session.run(self._io.outputs, feeds)
        return outputs[0], self._io.cache(outputs[1:], "cpu")

    run = forward  # the outputs already are where they stay: on the host

    def next_tokens(self, ids_BS, mask_BT, positions_BS, cache: KVCache, sampling: SamplingConfig,
                    rng: np.random.Generator) -> tuple[np.ndarray, KVCache]:
        """The next token id of every row ``[B]`` and the cache after ``ids_BS``."""
        logits_BSV, cache = self.forward(ids_BS, mask_BT, positions_BS, cache, keep=1)
        return sample(logits_BSV[:, -1], sampling, rng), cache


class BoundSteps:
    """Steps with I/O binding on ``device_type`` ("cuda", "webgpu"; "cpu" works too, which tests
    use). ``placement`` puts the head graphs where the decoder is (a plugin EP's devices); without
    it they take ``providers``."""

    def __init__(self, session: ort.InferenceSession, providers: list[str],
                 device_type: str = "cuda", device_id: int = 0, static: bool = False, placement=None):
        self._session = session
        self._static = static
        self._device = (device_type, device_id)
        self.device = device_type
        self._io = GraphIO(session)
        self._outputs = self._io.outputs
        self._kv_type = dtypes.by_ort(session.get_inputs()[3].type).onnx
        self._kv_numpy = self._io.kv_type
        logits_type = dtypes.by_ort(session.get_outputs()[0].type).onnx
        self._keep, self._keep_required = _keeps_logits(session)
        self._keep_values: dict[int, ort.OrtValue] = {}  # logits_to_keep n -> its scalar, made once
        self._logits_buffers: dict[tuple, ort.OrtValue] = {}  # static: (thread, B, keep) -> [B, keep, V]
        self._static_bindings: dict[int, tuple] = {}  # static: thread -> (layers, keep, logits, binding)
        self._vocab = session.get_outputs()[0].shape[-1]
        self._heads = {} if device_type == "cpu" else {
            name: _head_session(name, logits_type, providers, placement) for name in ("all", "last", "argmax")
        }

    def empty_cache(self, batch: int, kv_dims, capacity: int = 0) -> KVCache:
        """No positions (``kv_dims``: the key's and the value's ``(G, D)``); a static cache gets
        zeroed buffers for ``capacity`` positions (rounded up).

        On the CPU the hint is not taken: a step attends over the whole buffer, so buffers only
        as large as the positions in use (grown by a host copy every CAPACITY_STEP positions, a
        few µs per token amortized) keep a step's cost with the context, not with the hint. On a
        device, where growing means a round trip through the host, the buffers are sized once."""
        layers = self._io.attention_layers
        if self.device == "cpu":
            capacity = 0
        states = tuple(ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, *shape), self._io.state_type),
                                                        *self._device) for shape in self._io.state_shapes)
        if self._static:
            shapes = [(batch, heads, _round_up(max(capacity, 1)), dim) for heads, dim in kv_dims]
            buffers = [tuple(self._buffer(shape) for shape in shapes) for _ in range(layers)]
            return KVCache(buffers, self.device, 0, states)
        key, value = (ort.OrtValue.ortvalue_from_shape_and_type([batch, heads, 0, dim], self._kv_type,
                                                                *self._device) for heads, dim in kv_dims)
        return KVCache([(key, value)] * layers, self.device, states=states)

    def _buffer(self, shape, content: np.ndarray | None = None) -> ort.OrtValue:
        """A zeroed static-cache buffer on the device, ``content`` copied into its first positions."""
        host = np.empty(shape, self._kv_numpy)
        host[...] = 0  # written now: calloc's untouched pages would be faulted in by the first steps
        if content is not None:
            host[:, :, : content.shape[2]] = content
        return ort.OrtValue.ortvalue_from_numpy(host, *self._device)  # on the CPU: shares ``host``

    def _fit(self, cache: KVCache, needed: int) -> KVCache:
        """``cache`` itself when its buffers hold ``needed`` positions, else copies in larger ones."""
        if needed <= cache.capacity:
            return cache
        P, capacity = cache.length, _round_up(needed)

        def grown(t: ort.OrtValue) -> ort.OrtValue:  # key and value keep their own (G, D)
            B, G, _, D = t.shape()
            return self._buffer((B, G, capacity, D), t.numpy()[:, :, :P])

        layers = [tuple(grown(t) for t in kv) for kv in cache.layers]
        return KVCache(layers, self.device, P, cache.states)

    def forward(self, ids_BS, mask_BT, positions_BS, cache: KVCache,
                keep: int = 0) -> tuple[np.ndarray, KVCache]:
        """Logits ``[B, S, V]`` as float32 on the host (the last ``keep`` positions when ``keep`` > 0)
        and the cache."""
        logits, cache = self.run(ids_BS, mask_BT, positions_BS, cache, keep)
        return self._head("all", logits), cache

    def next_tokens(self, ids_BS, mask_BT, positions_BS, cache: KVCache, sampling: SamplingConfig,
                    rng: np.random.Generator) -> tuple[np.ndarray, KVCache]:
        """The next token id of every row ``[B]``; greedy picks it on the device."""
        logits, cache = self.run(ids_BS, mask_BT, positions_BS, cache, keep=1)
        if sampling.greedy:
            return self._head("argmax", logits), cache
        return sample(self._head("last", logits), sampling, rng), cache

    def run(self, ids_BS, mask_BT, positions_BS, cache: KVCache,
            keep: int = 0) -> tuple[ort.OrtValue, KVCache]:
        """Logits ``[B, S, V]`` (or the last ``keep``) left on the device (an OrtValue in the graph's
        dtype) and the cache."""
        if self._static:  # each present is its past: the graph's TensorScatter writes in place
            cache = self._fit(cache, cache.length + ids_BS.shape[1])
            kept = min(keep, ids_BS.shape[1])  # the graph keeps at most the S positions it has
            logits = self._logits_buffer(ids_BS.shape[0], kept) if keep and self._keep else None
            binding = self._static_binding(cache, keep, logits)
            _bind_tokens(binding, ids_BS, mask_BT, positions_BS)
            self._session.run_with_iobinding(binding)
            outputs = binding.get_outputs()
            logits = logits if logits is not None else outputs[0]
            states = tuple(outputs[len(outputs) - len(cache.states):]) if cache.states else ()
            return logits, KVCache(cache.layers, self.device, cache.length + ids_BS.shape[1], states)
        binding = self._binding(cache, keep)
        _bind_tokens(binding, ids_BS, mask_BT, positions_BS)
        for name in self._outputs:
            binding.bind_output(name, *self._device)
        self._session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0], self._io.cache(outputs[1:], self.device)

    def _binding(self, cache: KVCache, keep: int) -> ort.IOBinding:
        """A new binding of ``num_logits_to_keep`` and the pasts (the tokens are bound by the caller)."""
        binding = self._session.io_binding()
        if self._keep and (keep or self._keep_required):  # an input with a default binds as an OrtValue only
            if keep not in self._keep_values:
                self._keep_values[keep] = ort.OrtValue.ortvalue_from_numpy(np.array(keep, np.int64))
            binding.bind_ortvalue_input(self._keep, self._keep_values[keep])
        for name, value in zip(self._io.inputs, _flat(cache), strict=True):
            binding.bind_ortvalue_input(name, value)
        return binding

    def _static_binding(self, cache: KVCache, keep: int, logits: ort.OrtValue | None) -> ort.IOBinding:
        """The binding of a static step: pasts, presents bound to them, and the logits. A decode loop
        steps the same buffers with the same logits buffer every time, so the calling thread's last
        binding is kept and only the tokens are bound again (18 binds fewer per step for 4 layers);
        it is rebuilt when the buffers (grown), the keep or the logits buffer change, and never kept
        for an output onnxruntime allocates (no logits buffer), whose shape changes, nor on a device
        (see below)."""
        key = threading.get_ident()
        held = self._static_bindings.get(key)
        if held is not None and held[0] is cache.layers and held[1] == keep and held[2] is logits:
            return held[3]
        binding = self._binding(cache, keep)
        if logits is None:  # bound first: get_outputs() lists outputs in the order they were bound
            binding.bind_output(self._outputs[0], *self._device)
        else:
            binding.bind_ortvalue_output(self._outputs[0], logits)
        kv_outputs = self._outputs[1:1 + 2 * len(cache.layers)]
        for name, value in zip(kv_outputs, _flat(KVCache(cache.layers)), strict=True):
            binding.bind_ortvalue_output(name, value)
        # States are new tensors every step (bound last), never written over their inputs: a
        # recurrent mixer reads its past state while it writes the new one. Their inputs change
        # every step, so such a binding is not kept.
        for name in self._outputs[1 + 2 * len(cache.layers):]:
            binding.bind_output(name, *self._device)
        # Kept on the CPU only: binding a device value that a node on another provider reads (a
        # TensorScatter that WebGPU or OpenVINO leaves to the CPU provider) copies it at bind time,
        # and a kept binding would feed that stale copy to every later step.
        if logits is None or cache.states or self.device != "cpu":
            self._static_bindings.pop(key, None)
        else:
            self._static_bindings[key] = (cache.layers, keep, logits, binding)
        return binding

    def _logits_buffer(self, batch: int, keep: int) -> ort.OrtValue:
        """The ``[B, keep, V]`` logits of a static step, one buffer per shape and calling thread
        reused every step (no output to fetch after the run; threads generating at once on one
        session get their own). Read it before that thread's next step overwrites it."""
        key = (threading.get_ident(), batch, keep)
        if key not in self._logits_buffers:
            shape = [batch, keep, self._vocab]
            self._logits_buffers[key] = ort.OrtValue.ortvalue_from_shape_and_type(
                shape, np.float32, *self._device)
        return self._logits_buffers[key]

    def _head(self, name: str, logits: ort.OrtValue) -> np.ndarray:
        if self.device == "cpu":  # already on the host (a static cache binds on the CPU too)
            host = logits.numpy()  # a view of a buffer the next step may reuse: copied below
            if name == "argmax":
                return host[:, -1].argmax(-1)
            return np.array(host if name == "all" else host[:, -1], dtype=np.float32)
        head = self._heads[name]
        binding = head.io_binding()
        binding.bind_ortvalue_input("logits", logits)
        binding.bind_output("out", "cpu")
        head.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()


def _keeps_logits(session: ort.InferenceSession) -> tuple[str | None, bool]:
    """The graph's input that keeps the last n logits, and whether it must be fed:
    ``num_logits_to_keep`` (required, 0 = all), the optional ``logits_to_keep`` of exports made
    before 2026-12-05, or none (older exports compute every logit)."""
    if any(i.name == NUM_LOGITS_TO_KEEP for i in session.get_inputs()):
        return NUM_LOGITS_TO_KEEP, True
    optional = session.get_overridable_initializers()  # an input with a default is listed here
    legacy = any(i.name == LOGITS_TO_KEEP for i in [*session.get_inputs(), *optional])
    return (LOGITS_TO_KEEP if legacy else None), False


def _round_up(positions: int) -> int:
    return -(-positions // CAPACITY_STEP) * CAPACITY_STEP


def _flat(cache: KVCache) -> list:
    """The cache's tensors in the graph's input order: keys and values, then states."""
    return [tensor for layer in cache.layers for tensor in layer] + list(cache.states)


class GraphIO:
    """The cache's inputs and outputs of a loaded graph, by name: each attention layer's
    ``past_key_values.{i}.key`` / ``.value``, then each recurrent state (``past_conv.{i}`` ...),
    and the outputs that follow them (``present.{i}.key`` ..., ``present_conv.{i}`` ...)."""

    def __init__(self, session: ort.InferenceSession):
        graph_inputs = session.get_inputs()
        kv = [i for i in graph_inputs if i.name.startswith("past_key_values.")]
        kv_names = {i.name for i in kv}
        states = [i for i in graph_inputs if i.name.startswith("past_") and i.name not in kv_names]
        self.inputs = [i.name for i in kv] + [i.name for i in states]
        self.outputs = [LOGITS] + [present(name) for name in self.inputs]
        self.attention_layers = len(kv) // 2
        self.kv_type = dtypes.by_ort(kv[0].type).numpy
        self.state_shapes = [tuple(i.shape[1:]) for i in states]
        self.state_type = dtypes.by_ort(states[0].type).numpy if states else np.float32

    def cache(self, presents: list, device: str) -> KVCache:
        """The cache that the outputs after ``logits`` make (in :attr:`outputs`' order)."""
        kv = presents[: 2 * self.attention_layers]
        layers = list(zip(kv[0::2], kv[1::2], strict=True))
        return KVCache(layers, device, states=tuple(presents[2 * self.attention_layers:]))


def _head_session(name: str, logits_type: int, providers: list[str], placement=None) -> ort.InferenceSession:
    """A few-node graph on the decoder's device over its logits ``[B, S, V]``.

    ``all``: every position as float32; ``last``: the last position ``[B, V]`` as float32;
    ``argmax``: its argmax ``[B]`` (int64). The cast precedes ArgMax because bfloat16 logits
    have neither a numpy type nor an ArgMax kernel.
    """
    from onnx import TensorProto, helper

    nodes, source = [], "logits"
    if name != "all":  # pick the last position first: only one row per prompt gets cast
        index = helper.make_tensor("minus_one", TensorProto.INT64, [], [-1])
        nodes.append(helper.make_node("Constant", [], ["last_index"], value=index))
        nodes.append(helper.make_node("Gather", ["logits", "last_index"], ["last_raw"], axis=1))
        source = "last_raw"
    nodes.append(helper.make_node("Cast", [source], ["float"], to=TensorProto.FLOAT))
    if name == "argmax":
        nodes.append(helper.make_node("ArgMax", ["float"], ["argmax"], axis=-1, keepdims=0))
    nodes.append(helper.make_node("Identity", ["argmax" if name == "argmax" else "float"], ["out"]))
    out_type = TensorProto.INT64 if name == "argmax" else TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, f"head_{name}",
        [helper.make_tensor_value_info("logits", logits_type, ["B", "S", "V"])],
        [helper.make_tensor_value_info("out", out_type, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = session_options(1)  # a few nodes over one row per prompt: no thread pool needed
    plugin = placement is not None and placement.plugin
    listed = placement.add_to(options) if plugin else providers  # a plugin's devices go on the options
    return ort.InferenceSession(model.SerializeToString(), options, providers=listed or None)


def _bind_tokens(binding: ort.IOBinding, ids_BS, mask_BT, positions_BS) -> None:
    """This step's ids, mask and positions (host arrays; bound again every step)."""
    binding.bind_cpu_input(INPUT_IDS, ids_BS)
    binding.bind_cpu_input(ATTENTION_MASK, mask_BT)
    binding.bind_cpu_input(POSITION_IDS, positions_BS)
