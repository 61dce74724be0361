"""Peers run on the same checkpoint: PyTorch eager, and transformers' own ONNX exporter.

- :class:`TorchRunner`: the transformers model itself, ``torch.no_grad``, batch-1 decode with its
  ``DynamicCache`` (cropped back after every step so the context stays fixed).
- :func:`export_for_generation` + :class:`GenerationRunner`: transformers' exporter in its best
  configuration for decoding, ``OnnxExporter().export_for_generation``: a ``prefill`` graph
  (``input_ids``, ``position_ids`` -> logits and the cache) and a ``decode`` graph (one token and
  ``input.past_key_values.layers.{i}.keys/values`` -> logits and the grown cache), batch 1. A
  decode step is one run of ``decode`` against the context's cache, as ours is.
- :func:`export_with_transformers` + :class:`RecomputeRunner`, the fallback when the generation
  export fails: ``OnnxExporter().export`` gives a prefill-only graph (no past inputs), and its
  "decode" is what a user of that graph has to do, recompute ``context + 1`` tokens per token;
  labelled :data:`HF_ONNX_PREFILL_ONLY`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from moe_onnx.benchmarks.timing import timed

TORCH, HF_ONNX = "torch-eager", "transformers-onnx"  # impl labels of the peers
HF_ONNX_PREFILL_ONLY = "transformers-onnx-prefill-only"  # the fallback: no KV cache in the graph


class TorchRunner:
    """PyTorch eager on ``threads`` threads (``torch.set_num_threads``), CPU."""

    def __init__(self, model, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.model, self.torch = model, torch
        self.caches: dict[int, object] = {}

    def _forward(self, ids: np.ndarray, cache=None):
        with self.torch.no_grad():
            return self.model(input_ids=self.torch.from_numpy(ids), past_key_values=cache, use_cache=True)

    def prefill(self, ids: np.ndarray) -> float:
        return timed(self._forward, ids)[0]

    def prepare_decode(self, context_ids: np.ndarray) -> None:
        self.caches[context_ids.shape[1]] = self._forward(context_ids).past_key_values

    def decode_step(self, context: int, token: np.ndarray) -> float:
        cache = self.caches[context]
        seconds = timed(self._forward, token, cache)[0]
        cache.crop(-token.shape[1])  # back to ``context`` tokens for the next sample
        return seconds


class RecomputeRunner:
    """A graph with only ``input_ids`` in: a decode step recomputes the prefix and the new token."""

    def __init__(self, session):
        self.session = session
        self.contexts: dict[int, np.ndarray] = {}

    def prefill(self, ids: np.ndarray) -> float:
        return timed(self.session.run, ["logits"], {"input_ids": ids})[0]

    def prepare_decode(self, context_ids: np.ndarray) -> None:
        self.contexts[context_ids.shape[1]] = context_ids

    def decode_step(self, context: int, token: np.ndarray) -> float:
        return self.prefill(np.concatenate([self.contexts[context], token], axis=1))


@contextlib.contextmanager
def captured_output():
    """Send fds 1 and 2 (Python prints and C++ logs alike) to a file; yield a reader of its tail.

    The exporter prints progress lines and warnings that would break the progress bar; on
    failure the tail explains why.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)

        def tail(chars: int = 400) -> str:
            log.flush()
            log.seek(0)
            return log.read()[-chars:]

        try:
            yield tail
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def export_with_transformers(model, out: Path) -> Path:
    """``OnnxExporter().export(model, sample, config=OnnxConfig(dynamic=True))``, saved to ``out``.

    Raises ``RuntimeError`` with the exporter's own last words when it fails.
    """
    import torch
    from transformers.exporters.exporter_onnx import OnnxConfig, OnnxExporter

    sample = {"input_ids": torch.randint(0, model.config.vocab_size, (1, 8))}
    with captured_output() as tail:
        try:
            exported = OnnxExporter().export(model, sample, config=OnnxConfig(dynamic=True))
            exported.save_pretrained(out)
        except Exception as err:  # noqa: BLE001 - any exporter failure is reported, not raised raw
            raise RuntimeError(f"{type(err).__name__}: {str(err)[:300]}") from err
    if not (out / "model.onnx").is_file():
        raise RuntimeError(f"no model.onnx written; exporter output ends: {tail()!r}")
    return out / "model.onnx"


class GenerationRunner:
    """transformers' ``prefill`` + ``decode`` graphs: the decode graph runs against the cache the
    prefill graph made for each context (it returns a grown copy; the context's cache stays).

    Each graph holds every weight, so one session is held at a time, the other loaded when asked
    for: the bench runs a variant's prefills and builds its pasts, then its decode steps."""

    def __init__(self, load: Callable[[str], object], pasts: list[str]):
        self._load, self._held = load, {}
        self._pasts = pasts  # the decode graph's past inputs, in the prefill graph's present order
        self.caches: dict[int, dict] = {}

    def _session(self, name: str):
        if name not in self._held:
            self._held.clear()  # the other graph's session (and its weights) first
            self._held[name] = self._load(name)
        return self._held[name]

    @property
    def prefill_session(self):
        return self._session("prefill.onnx")

    @property
    def decode_session(self):
        return self._session("decode.onnx")

    def _positions(self, start: int, n: int) -> np.ndarray:
        return np.arange(start, start + n, dtype=np.int64)[None]

    def prefill(self, ids: np.ndarray) -> float:
        feeds = {"input_ids": ids, "position_ids": self._positions(0, ids.shape[1])}
        return timed(self.prefill_session.run, ["logits"], feeds)[0]

    def prepare_decode(self, context_ids: np.ndarray) -> None:
        n, session = context_ids.shape[1], self.prefill_session
        presents = [o.name for o in session.get_outputs()][1:]
        outputs = session.run(presents, {"input_ids": context_ids, "position_ids": self._positions(0, n)})
        self.caches[n] = dict(zip(self._pasts, outputs, strict=True))

    def decode_step(self, context: int, token: np.ndarray) -> float:
        feeds = {"input_ids": token, "position_ids": self._positions(context, 1), **self.caches[context]}
        return timed(self.decode_session.run, ["logits"], feeds)[0]


def export_for_generation(model, out: Path) -> Path:
    """``OnnxExporter().export_for_generation(model, sample, config=OnnxConfig(dynamic=True))``
    saved to ``out`` (``prefill.onnx``, ``decode.onnx``). Raises ``RuntimeError`` with the
    exporter's own last words when it fails."""
    import torch
    from transformers.exporters.exporter_onnx import OnnxConfig, OnnxExporter

    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    sample = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with captured_output() as tail:
        try:
            exported = OnnxExporter().export_for_generation(model, sample, config=OnnxConfig(dynamic=True))
            exported.save_pretrained(out)
        except Exception as err:  # noqa: BLE001 - any exporter failure is reported, not raised raw
            raise RuntimeError(f"{type(err).__name__}: {str(err)[:300]}") from err
    for name in ("prefill.onnx", "decode.onnx"):
        if not (out / name).is_file():
            raise RuntimeError(f"no {name} written; exporter output ends: {tail()!r}")
    return out


def export_in_child(shape: str, tiny: bool, model: str, out: Path, generation: bool = True) -> Path:
    """:func:`export_for_generation` (or, ``generation=False``, :func:`export_with_transformers`)
    of a built-in model (:func:`moe_onnx.benchmarks.models.build_model`: seeded, so the weights
    are the bench's own) in a child process, which returns the memory it took: after
    ``torch.export`` a process keeps about the model's size that no ``del`` gives back."""
    fn = "export_for_generation" if generation else "export_with_transformers"
    code = ("import sys\nfrom pathlib import Path\nfrom moe_onnx.benchmarks import models, peers\n"
            "shape = models.shape_named(sys.argv[1], sys.argv[2] == 'tiny')\n"
            f"print(peers.{fn}(models.build_model(shape, sys.argv[3]), Path(sys.argv[4])))\n")
    args = [shape, "tiny" if tiny else "default", model, str(out)]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise RuntimeError(lines[-1][:400] if lines else f"exit status {result.returncode}")
    return Path(result.stdout.split()[-1])


def generation_runner(path: Path, threads: int) -> GenerationRunner:
    """transformers' generation graphs on the CPU provider with ``threads`` intra-op threads."""
    import onnx
    import onnxruntime as ort

    from moe_onnx.runtime.threads import session_options

    def load(name: str):
        return ort.InferenceSession(str(path / name), session_options(threads),
                                    providers=["CPUExecutionProvider"])

    graph = onnx.load(str(path / "decode.onnx"), load_external_data=False).graph
    return GenerationRunner(load, [i.name for i in graph.input if "past_key_values" in i.name])


def recompute_runner(path: Path, threads: int) -> RecomputeRunner:
    """transformers' exported graph on the CPU provider with ``threads`` intra-op threads."""
    import onnxruntime as ort

    from moe_onnx.runtime.threads import session_options

    session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    return RecomputeRunner(session)
