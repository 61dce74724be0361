"""The main job on the shipped reference models: export, generate, compare sparse with dense.

    moe-onnx demo [--models reference_models] [--work out/demo]

1. exports the trained MoE (with the default sparse dispatch, and with the ``dense`` impl as the
   baseline) and its two dense twins;
2. streams a greedy completion of a code prompt through the runtime;
3. prints, per model: total and active parameters, held-out perplexity in PyTorch (from
   training.json) and through the ONNX graph, decode ms/token and prefill tokens/s through the
   runtime (``Session.forward``), the models interleaved in rounds as ``moe-onnx bench`` does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from moe_onnx import manifest
from moe_onnx.errors import MoeOnnxError
from moe_onnx.reference import MODEL_NAMES, default_models_dir

PROMPT = "def fibonacci(n):\n    "


def export_all(models: Path, work: Path) -> dict[str, Path]:
    """``{label: export dir}``; an export whose source hash matches is reused."""
    import moe_onnx

    jobs = [("moe", "moe", "auto"), ("moe (dense impl)", "moe", "dense"),
            ("dense-active", "dense-active", "auto"), ("dense-total", "dense-total", "auto")]
    outs = {}
    for label, name, impl in jobs:
        src = models / name
        if not (src / "config.json").exists():
            raise MoeOnnxError(f"no reference model at {src}: run python -m moe_onnx.reference.train")
        out = work / (name if impl == "auto" else f"{name}-{impl}")
        if not _fresh(out, src):
            print(f"exporting {src} -> {out} ({impl})", file=sys.stderr)
            moe_onnx.export(src, out, moe_impl=impl, force=True)
        outs[label] = out
    return outs


def _fresh(out: Path, src: Path) -> bool:
    from moe_onnx.exporter.checkpoint import open_checkpoint, sha256_files

    try:
        m = manifest.read(out)
    except manifest.ManifestError:
        return False
    return m.source.get("sha256") == sha256_files(open_checkpoint(src).files())


def complete(out: Path, threads: int) -> None:
    """Stream a greedy completion of the code prompt to stdout."""
    import moe_onnx.runtime as rt

    session = rt.load(out, provider="auto", threads=threads)
    print(f"\n--- greedy completion by the MoE ({session.device}) ---\n{PROMPT}", end="")
    stream = session.generate(PROMPT, max_new_tokens=64, stream=True)
    for token in stream:
        print(token.text, end="", flush=True)
    r = stream.result
    print(f"\n--- prefill {r.prefill_tokens_per_second:.0f} tok/s, "
          f"decode {r.decode_tokens_per_second:.0f} tok/s ---\n")


def measure(outs: dict[str, Path], threads: int, rounds: int = 3,
            steps: int = 16) -> dict[str, tuple[float, float]]:
    """``{label: (decode ms/token at context 64, prefill tokens/s at 256)}`` through the runtime on
    CPU, medians over ``rounds`` rounds in which every model takes its turn (see
    :func:`moe_onnx.benchmarks.timing.interleave`). Decode steps all run against one 64-token past."""
    import moe_onnx.runtime as rt
    from moe_onnx.benchmarks.timing import Stats, Unit, flat, interleave, timed

    units = []
    for label, out in outs.items():
        session = rt.load(out, provider="cpu", threads=threads)
        rng = np.random.default_rng(0)  # the same prompt and tokens for every model
        ids = rng.integers(0, session.info.vocab_size, size=(1, 256))
        past = session.forward(ids[:, :64])[1]

        def decode(session=session, past=past, rng=rng) -> float:
            token = rng.integers(0, session.info.vocab_size, size=(1, 1))
            return timed(session.forward, token, cache=past)[0]

        def prefill(session=session, ids=ids) -> float:
            return timed(session.forward, ids)[0]

        units += [Unit((label, "decode"), decode, steps), Unit((label, "prefill"), prefill, 1)]
    samples = interleave(units, rounds, progress=lambda *_: None)
    medians = {key: Stats.of(flat(per_round)).p50 for key, per_round in samples.items()}
    return {label: (medians[(label, "decode")] * 1e3, 256 / medians[(label, "prefill")]) for label in outs}


def compare(models: Path, outs: dict[str, Path], threads: int, eval_windows: int) -> str:
    """The table of the worked example: parameters, perplexity, speed."""
    from moe_onnx.evaluation import onnx_quality, token_windows

    speeds = measure(outs, threads)
    lines = [f"{'model':18s} {'total':>8s} {'active':>8s} {'ppl torch':>9s} {'ppl onnx':>9s} "
             f"{'decode ms/tok':>13s} {'prefill tok/s':>13s}"]
    for label, out in outs.items():
        training = json.loads((models / label.split(" ")[0] / "training.json").read_text())
        windows = token_windows(out / "tokenizer.json", _held_out(training), training["budget"]["context"])
        ppl = onnx_quality(out, windows[:eval_windows], threads=threads).perplexity
        ms, tps = speeds[label]
        p = manifest.read(out).params
        lines.append(f"{label:18s} {p['total'] / 1e6:7.2f}M {p['active_per_token'] / 1e6:7.2f}M "
                     f"{training['heldout_ppl']:9.3f} {ppl:9.3f} {ms:13.2f} {tps:13.0f}")
    return "\n".join(lines)


def _held_out(training: dict) -> list[Path]:
    from moe_onnx.reference.corpus import stdlib_files

    names = set(training["heldout_files"])
    return [f for f in stdlib_files()[1] if f.name in names]


def run_demo(models: Path | None = None, work: Path = Path("out/demo"), threads: int = 2) -> None:
    """Export, generate and compare (see the module docstring)."""
    models = Path(models) if models else default_models_dir()
    if not all((models / n / "config.json").exists() for n in MODEL_NAMES):
        raise MoeOnnxError(f"{models} lacks the reference models {', '.join(MODEL_NAMES)}")
    outs = export_all(models, Path(work))
    complete(outs["moe"], threads)
    eval_windows = json.loads((models / "moe" / "training.json").read_text())["budget"]["eval_windows"]
    print("held-out perplexity (PyTorch from training.json, ONNX through the exported graph), CPU provider, "
          f"{threads} threads, fp32, batch 1; decode at context 64, prefill of 256 tokens, medians of 3 "
          "rounds over the four models in turn:")
    print(compare(models, outs, threads, eval_windows))
