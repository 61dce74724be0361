"""Peers run on the same checkpoint: PyTorch eager, and transformers' own ONNX exporter.

- :class:`TorchRunner`: the transformers model itself, ``torch.no_grad``, batch-1 decode with its
  ``DynamicCache`` (cropped back after every step so the context stays fixed).
- :func:`export_with_transformers` + :class:`RecomputeRunner`: ``transformers.exporters.OnnxExporter``
  used plainly gives a prefill-only graph (``input_ids`` in, ``logits`` and presents out, no past
  inputs). Its decode figure is what a user of that graph has to do: recompute the whole prefix,
  ``context + 1`` tokens, for every new token.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from moe_onnx.benchmarks.timing import timed

TORCH, HF_ONNX = "torch-eager", "transformers-onnx"  # impl labels of the peers


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


def recompute_runner(path: Path, threads: int) -> RecomputeRunner:
    """transformers' exported graph on the CPU provider with ``threads`` intra-op threads."""
    import onnxruntime as ort

    from moe_onnx.runtime.threads import session_options

    session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    return RecomputeRunner(session)
