"""The default exports on every runtime reachable here: runs? parity? decode ms? One table.

    python -m studies.provider_matrix [--work DIR] [--context 64] [--steps 32] [--threads 2] [--json F]

The shipped reference MoE (``reference_models/moe``) exported as the CLI does (``fp32``, ``fp16``,
``int8``, ``int4``, and ``static``: fp32 with ``--kv-cache static``), each run by:

- ``onnxruntime CPU``: the runtime, ``rt.load(OUT, provider="cpu")``;
- ``onnxruntime + OpenVINO EP`` and ``onnxruntime + WebGPU EP``: the runtime on the plugin EPs
  (``provider="openvino" | "webgpu"``); the nodes each took beside the cell;
- ``OpenVINO`` itself (``ov.Core().compile_model`` on ``model.onnx``; f32 precision asked for
  fp32 exports, as the runtime asks its EP);
- onnx's ``ReferenceEvaluator``;
- ``onnxruntime-web wasm (Chromium)`` and ``onnxruntime-web WebGPU (Chromium)``: the ``moe-onnx
  web`` page in headless Chromium (wasm with 2 threads, cross-origin isolated; or WebGPU on the
  SwiftShader adapter Chromium brings), driven by ``moe_onnx.web.run_page``: greedy generation of
  ``WEB_TOKENS`` tokens from ``WEB_PROMPT``; its parity cell is whether the page's greedy ids equal
  the baseline's below, its ms the page's decode time per token (contexts 9 to 40, not 64).

Parity: a 6-token prefill and one decode step on the returned cache, against onnxruntime CPU with
float32 ``MatMulNBits`` kernels (so quantized exports compare the same dequantized weights; a
runtime quantizing activations shows here), as max |difference| / max |logit| over both steps.
Decode ms: the median of ``--steps`` one-token steps against ``--context`` tokens (after 4
untimed), the same past for every runtime; the runtimes through the runtime's own step
(``OnnxRunner``), OpenVINO and the evaluator on host arrays. A runtime that refuses an export gets
its own error, first line, in the cell. Every runtime runs in this process, one after another:
nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import moe_onnx
from moe_onnx import contract as io
from moe_onnx import manifest
from moe_onnx.quantize import FLOAT32_MATMULNBITS
from moe_onnx.reference import default_models_dir

PROMPT = [[5, 17, 33, 2, 9, 64]]
EXPORTS = {"fp32": {}, "fp16": {"dtype": "fp16"}, "int8": {"weights": "int8"}, "int4": {"weights": "int4"},
           "static": {"kv_cache": "static"}}
RUNTIMES = ("onnxruntime CPU", "onnxruntime + OpenVINO EP", "onnxruntime + WebGPU EP", "OpenVINO",
            "onnx ReferenceEvaluator", "onnxruntime-web wasm (Chromium)", "onnxruntime-web WebGPU (Chromium)")
WEB = {"onnxruntime-web wasm (Chromium)": "wasm", "onnxruntime-web WebGPU (Chromium)": "webgpu"}
WEB_PROMPT, WEB_TOKENS = "def fibonacci(n):", 32
PLUGIN = {"onnxruntime CPU": "cpu", "onnxruntime + OpenVINO EP": "openvino",
          "onnxruntime + WebGPU EP": "webgpu"}


def feeds_for(out: Path, ids: np.ndarray, capacity: int) -> dict:
    """A prefill of ``ids`` from an empty cache; a static export's buffers hold ``capacity``."""
    m = manifest.read(out)
    spec, static = m.spec, m.kv_cache == "static"
    feeds = io.prefill_feeds(ids, spec.num_layers, m.kv_dims, m.kv.numpy, False, spec.layer_types,
                             spec.state_shapes(), m.compute.numpy)
    if static:
        feeds.update(io.empty_pasts(ids.shape[0], spec.num_layers, m.kv_dims, m.kv.numpy, capacity,
                                    spec.layer_types))
    return feeds


def next_feeds(out: Path, outputs: dict, past: int, token: int = 7) -> dict:
    """The one-token step after ``past`` positions, its pasts the previous step's presents."""
    spec = manifest.read(out).spec
    step = {io.INPUT_IDS: np.array([[token]], np.int64), io.ATTENTION_MASK: np.ones((1, past + 1), np.int64),
            io.POSITION_IDS: np.array([[past]], np.int64), **io.keep_all()}
    names = io.cache_names(spec.num_layers, spec.layer_types)
    step.update({name: outputs[io.present(name)] for name in names})
    return step


class GraphRunner:
    """A runtime that takes feeds and returns ``{output name: array}`` (OpenVINO, the evaluator,
    onnxruntime CPU with float32 kernels as the baseline)."""

    def __init__(self, kind: str, out: Path, threads: int):
        path = str(out / "model.onnx")
        self.kind = kind
        if kind == "baseline":
            options = ort.SessionOptions()
            options.add_session_config_entry(*FLOAT32_MATMULNBITS)
            options.intra_op_num_threads = threads
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            self.run = lambda feeds: dict(zip(names, session.run(None, feeds), strict=True))
        elif kind == "OpenVINO":
            import openvino as ov

            config = {"INFERENCE_NUM_THREADS": threads}
            if manifest.read(out).dtype == "fp32":
                config["INFERENCE_PRECISION_HINT"] = "f32"
            compiled = ov.Core().compile_model(path, "CPU", config)
            request = compiled.create_infer_request()

            def run(feeds):
                results = request.infer(feeds)
                return {o.get_any_name(): results[o] for o in compiled.outputs}
            self.run = run
        else:
            from onnx.reference import ReferenceEvaluator

            evaluator = ReferenceEvaluator(path)
            names = evaluator.output_names
            self.run = lambda feeds: dict(zip(names, evaluator.run(None, feeds), strict=True))


def two_steps(run, out: Path) -> tuple[list[np.ndarray], dict]:
    """Logits of the prefill of PROMPT and of one decode step; the step's outputs."""
    ids = np.array(PROMPT, np.int64)
    first = run(feeds_for(out, ids, ids.shape[1] + 1))
    second = run(next_feeds(out, first, ids.shape[1]))
    return [first[io.LOGITS], second[io.LOGITS]], second


def error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    pairs = [(g.astype(np.float32), w.astype(np.float32)) for g, w in zip(got, want, strict=True)]
    return max(float(np.abs(g - w).max() / np.abs(w).max()) for g, w in pairs)


def time_graph(run, out: Path, context: int, steps: int) -> float:
    """Median ms of a one-token step after ``context`` positions (host arrays)."""
    ids = np.random.default_rng(0).integers(0, manifest.read(out).spec.vocab_size, (1, context))
    first = run(feeds_for(out, ids, context + 1))
    step = next_feeds(out, first, context)
    times = []
    for i in range(4 + steps):
        start = time.perf_counter()
        run(step)
        if i >= 4:
            times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def time_session(session, context: int, steps: int) -> float:
    from moe_onnx.benchmarks.runners import OnnxRunner

    runner = OnnxRunner(session)
    ids = np.random.default_rng(0).integers(0, session.info.vocab_size, (1, context))
    runner.prepare_decode(ids)
    token = np.array([[7]], np.int64)
    for _ in range(4):
        runner.decode_step(context, token)
    return float(np.median([runner.decode_step(context, token) for _ in range(steps)]) * 1e3)


def baseline_greedy(out: Path, prompt: list[int], new: int) -> list[int]:
    """Greedy ids on onnxruntime CPU with float32 ``MatMulNBits`` kernels (the parity baseline;
    the runtime's default kernel quantizes activations to int8, which onnxruntime-web's does not)."""
    from moe_onnx.runtime.session import ModelInfo

    run, eos = GraphRunner("baseline", out, 2).run, set(ModelInfo.read(out).eos_ids)
    outputs = run(feeds_for(out, np.array([prompt], np.int64), 0))
    ids, past = [], len(prompt)
    while len(ids) < new:
        token = int(outputs[io.LOGITS][0, -1].argmax())
        if token in eos:
            break
        ids.append(token)
        outputs = run(next_feeds(out, outputs, past, token))
        past += 1
    return ids


def web_cell(out: Path, ep: str = "wasm") -> dict:
    """The ``moe-onnx web`` page for ``out`` in headless Chromium: greedy ids equal the baseline's?"""
    import moe_onnx.runtime as rt
    from moe_onnx.web import run_page

    page = run_page(out, WEB_PROMPT, WEB_TOKENS, ep)
    if "error" in page:
        return {"runs": False, "why": page["error"][:300]}
    want = baseline_greedy(out, rt.load(out, provider="cpu").tokenizer.encode(WEB_PROMPT), WEB_TOKENS)
    return {"runs": True, "greedy_equal": page["ids"] == want,
            "decode_ms": 1e3 / page["decodeTokensPerSecond"],
            "placement": f"{page['ep']}" + (f", {page['threads']} threads" if page["ep"] == "wasm" else "")}


def cell(runtime: str, out: Path, want: list[np.ndarray], args) -> dict:
    """One runtime on one export: ``{"runs", "error" | "greedy_equal", "decode_ms", "placement" |
    "why"}``."""
    import moe_onnx.runtime as rt
    from moe_onnx.runtime.providers import describe_assignment

    try:
        if runtime in WEB:
            return web_cell(out, WEB[runtime])
        if runtime in PLUGIN:
            session = rt.load(out, provider=PLUGIN[runtime], threads=args.threads, ort_cache="off")

            def run(feeds):
                logits, cache = session.forward(feeds[io.INPUT_IDS], feeds[io.ATTENTION_MASK],
                                                feeds[io.POSITION_IDS], state["cache"])
                state["cache"] = cache
                return logits

            state = {"cache": None}
            first = run({io.INPUT_IDS: np.array(PROMPT), io.ATTENTION_MASK: np.ones((1, 6), np.int64),
                         io.POSITION_IDS: np.arange(6)[None]})
            second = run({io.INPUT_IDS: np.array([[7]]), io.ATTENTION_MASK: np.ones((1, 7), np.int64),
                          io.POSITION_IDS: np.array([[6]])})
            return {"runs": True, "error": error([first, second], want),
                    "decode_ms": time_session(session, args.context, args.steps),
                    "placement": describe_assignment(session.assignment)}
        runner = GraphRunner(runtime, out, args.threads)
        got, _ = two_steps(runner.run, out)
        steps = args.steps if runtime == "OpenVINO" else max(3, args.steps // 8)  # the evaluator is slow
        return {"runs": True, "error": error(got, want),
                "decode_ms": time_graph(runner.run, out, args.context, steps)}
    except Exception as err:  # noqa: BLE001 - a runtime's refusal is the cell's content
        return {"runs": False, "why": first_line(err)}


def first_line(err: Exception) -> str:
    """The line of a runtime's error that says what failed (OpenVINO's first line only says where)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    telling = [line for line in lines if "conversion rule" in line or "Conversion is failed" in line]
    return ((telling or lines or [type(err).__name__])[0])[:300]


def _parity(c: dict) -> str:
    if "greedy_equal" in c:
        return "greedy equal" if c["greedy_equal"] else "greedy DIFFERS"
    return f"rel {c['error']:.0e}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="where the exports go (a temporary folder)")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--exports", default=",".join(EXPORTS))
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--json", help="write the cells here")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="provider-matrix-"))
    runtimes = [r for r in args.runtimes.split(",") if r]
    cells: dict[str, dict[str, dict]] = {}
    for name in args.exports.split(","):
        out = moe_onnx.export(default_models_dir() / "moe", work / name, force=True, **EXPORTS[name])
        want, _ = two_steps(GraphRunner("baseline", out, args.threads).run, out)
        cells[name] = {runtime: cell(runtime, out, want, args) for runtime in runtimes}
        for runtime, c in cells[name].items():
            text = (f"{_parity(c)}, {c['decode_ms']:.2f} ms" if c["runs"] else f"refused: {c['why']}")
            print(f"{name:7s} {runtime:28s} {text}" + (f"  [{c['placement']}]" if c.get("placement") else ""),
                  flush=True)
    print("\n| runtime | " + " | ".join(cells) + " |")
    print("|---|" + "---|" * len(cells))
    for runtime in runtimes:
        row = []
        for name in cells:
            c = cells[name][runtime]
            row.append(f"{_parity(c)} / {c['decode_ms']:.2f} ms" if c["runs"] else "refused")
        print(f"| {runtime} | " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(cells, indent=1))


if __name__ == "__main__":
    main()
