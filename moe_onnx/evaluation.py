"""Evaluation through the deployed graph: perplexity on text files, routing statistics.

Used by ``moe-onnx eval``, ``moe-onnx inspect --routing`` and the reference models (training and
demo).

Text is tokenized with the export's ``tokenizer.json`` (no special tokens), the files' tokens are
concatenated in the order given and cut into non-overlapping windows of ``window`` tokens (the
tail that does not fill a window is dropped). Each window is one independent sequence (empty KV
cache); every position but the first predicts the next token. :func:`torch_quality` applies the identical
method to a PyTorch model, so the two perplexities are comparable digit for digit.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moe_onnx import manifest
from moe_onnx.contract import prefill_feeds
from moe_onnx.errors import MoeOnnxError
from moe_onnx.graphs.moe import ROUTE_SUFFIX as _ROUTE
from moe_onnx.quantize import float32_kernels
from moe_onnx.runtime import providers
from moe_onnx.runtime.threads import session_options

ROUTE_SUFFIX = "moe." + _ROUTE  # layers.{i}.moe.route.experts


@dataclass
class QualityReport:
    """Perplexity over ``tokens`` predicted tokens, and tokens routed to each expert per layer."""

    tokens: int
    nll: float  # mean negative log-likelihood, nats per token
    windows: int
    window: int
    routing: dict[int, list[int]] = field(default_factory=dict)  # layer -> count per expert

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def token_windows(tokenizer_json: Path, files: list[Path], window: int) -> np.ndarray:
    """``[N, window]`` int64 token windows from the concatenated files."""
    from tokenizers import Tokenizer

    if not Path(tokenizer_json).is_file():
        raise MoeOnnxError(f"no tokenizer.json at {tokenizer_json}: perplexity needs the tokenizer")
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    ids: list[int] = []
    for path in files:
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            raise MoeOnnxError(f"cannot read {path}: {err.strerror}") from None
        ids += tokenizer.encode(text, add_special_tokens=False).ids
    n = len(ids) // window
    if n == 0:
        raise MoeOnnxError(f"the text files hold {len(ids)} tokens, fewer than one window of {window}")
    return np.asarray(ids[: n * window], dtype=np.int64).reshape(n, window)


def _nll_sum(logits_BWV: np.ndarray, windows_BW: np.ndarray) -> float:
    logits = logits_BWV[:, :-1].astype(np.float64)
    targets = windows_BW[:, 1:]
    peak = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - peak).sum(-1)) + peak[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return float((log_z - picked).sum())


def _routing_session(onnx_dir: Path, routing: bool, threads: int | None, exact_matmul: bool = False,
                     provider: str = "cpu"):
    """A session over the export on ``provider`` (cpu | cuda | openvino | webgpu | auto); with
    ``routing`` the chosen-expert values become outputs."""
    import onnx

    options = session_options(threads)
    chosen, dtype = providers.resolve(provider), manifest.read(onnx_dir).dtype

    def create(model):
        with float32_kernels(options) if exact_matmul else contextlib.nullcontext():
            session = providers.create_session(model, options, chosen, threads, dtype=dtype)
        providers.check_placement(session, chosen, onnx_dir)  # a plugin that took nothing: refused
        return session

    model_path = Path(onnx_dir) / "model.onnx"
    if not routing:
        return create(str(model_path)), []
    proto = onnx.load(str(model_path), load_external_data=False)
    names = [n for node in proto.graph.node for n in node.output if n.endswith(ROUTE_SUFFIX)]
    if not names:
        raise MoeOnnxError(f"{onnx_dir} exposes no routing (dense model, or the fused MoE op hides it)")
    for name in names:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    # The edited graph is loaded from bytes; its weights stay in the export's own data file.
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(Path(onnx_dir).resolve())
    )
    return create(proto.SerializeToString()), names


def onnx_quality(onnx_dir, windows: np.ndarray, *, batch: int = 4, routing: bool = False, threads=None,
                 exact_matmul: bool = False, provider: str = "cpu") -> QualityReport:
    """Perplexity (and routing counts) of ``windows`` through the export in ``onnx_dir``;
    ``exact_matmul`` runs quantized weights in float32 arithmetic
    (:func:`moe_onnx.quantize.float32_kernels`)."""
    m = manifest.read(onnx_dir)
    spec = m.spec
    session, route_names = _routing_session(Path(onnx_dir), routing, threads, exact_matmul, provider)
    E = spec.moe.num_experts if spec.moe else 0
    counts = {int(n.split(".")[1]): np.zeros(E, np.int64) for n in route_names}
    total = 0.0
    outputs = ["logits", *route_names]
    for start in range(0, len(windows), batch):
        ids = windows[start : start + batch]
        feeds = prefill_feeds(ids, spec.num_layers, m.kv_dims, m.kv.numpy, m.kv_cache == "static",
                              spec.layer_types, spec.state_shapes(), m.compute.numpy)
        logits, *routes = session.run(outputs, feeds)
        total += _nll_sum(logits, ids)
        for name, chosen in zip(route_names, routes, strict=True):
            counts[int(name.split(".")[1])] += np.bincount(chosen.reshape(-1), minlength=E)
    n = windows.shape[0] * (windows.shape[1] - 1)
    routing = {k: v.tolist() for k, v in counts.items()}
    return QualityReport(n, total / n, windows.shape[0], windows.shape[1], routing)


def torch_quality(model, windows: np.ndarray, *, batch: int = 4) -> QualityReport:
    """The same windows and the same loss through a PyTorch (transformers) model."""
    import torch  # noqa: TID251 - the PyTorch side of the comparison, imported only here

    total = 0.0
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            ids = windows[start : start + batch]
            logits = model(input_ids=torch.from_numpy(ids)).logits.float().numpy()
            total += _nll_sum(logits, ids)
    n = windows.shape[0] * (windows.shape[1] - 1)
    return QualityReport(n, total / n, windows.shape[0], windows.shape[1])


def evaluate(onnx_dir, text_files, *, window: int | None = None, routing: bool = False,
             max_windows: int | None = None, threads=None, provider: str = "cpu") -> QualityReport:
    """Perplexity of the export on ``text_files`` (see the module docstring for the method)."""
    spec = manifest.read(onnx_dir).spec
    window = window or min(256, spec.max_position_embeddings)
    windows = token_windows(Path(onnx_dir) / "tokenizer.json", [Path(f) for f in text_files], window)
    if max_windows:
        windows = windows[:max_windows]
    return onnx_quality(onnx_dir, windows, routing=routing, threads=threads, provider=provider)


def format_report(report: QualityReport) -> str:
    """Perplexity line plus, when present, tokens per expert per layer and a balance figure."""
    lines = [f"perplexity {report.perplexity:.4g} (nll {report.nll:.4f} nats/token) over {report.tokens} "
             f"predicted tokens, {report.windows} windows of {report.window}"]
    for layer, counts in sorted(report.routing.items()):
        c = np.asarray(counts)
        share = c / max(c.sum(), 1)
        # max/mean load: 1.0 is a perfect balance, E means one expert takes everything.
        imbalance = share.max() * len(c) if c.sum() else 0.0
        per_expert = " ".join(str(x) for x in c)
        lines.append(f"layer {layer:2d} tokens per expert: {per_expert}  (max/mean {imbalance:.2f})")
    return "\n".join(lines)
