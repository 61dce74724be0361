"""How ONNX Runtime's thread pools distort a multi-session bench, and which setting does not.

    python -m studies.threading_modes [--shape coarse] [--context 64] [--steps 40] [--threads 2]

One export of the bench's MoE shape is loaded twice (sessions A and B) in a fresh process per mode:
``per-session`` (onnxruntime's default: each session its own pool, spinning after a run),
``no-spin`` (own pools, spinning off) and ``shared`` (one process-wide pool, see
:mod:`moe_onnx.runtime.threads`). A's decode step at a fixed context is timed alone (A, A, A...)
and right after a B step each time (B, A, B, A...: what an interleaved bench does). A setting
that lets sessions disturb each other shows "after B" far above "alone".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]  # the child runs ``-m studies.threading_modes`` from here

MODES = ("per-session", "no-spin", "shared")


def _measure(out: str, mode: str, context: int, steps: int, threads: int) -> dict:
    """In this process: A's decode steps alone and after B's, in the given mode."""
    from moe_onnx.benchmarks.runners import OnnxRunner
    from moe_onnx.benchmarks.timing import Stats
    from moe_onnx.runtime import Session
    from moe_onnx.runtime.threads import share_threads

    if mode == "shared":
        share_threads(threads)
    opts = dict(provider="cpu", threads=threads, spin=mode != "no-spin")
    a, b = (OnnxRunner(Session(out, **opts)) for _ in range(2))
    rng = np.random.default_rng(0)
    vocab = a.session.info.vocab_size
    ids = rng.integers(0, vocab, (1, context))
    for runner in (a, b):
        runner.prepare_decode(ids)
    token = lambda: rng.integers(0, vocab, (1, 1))  # noqa: E731
    for _ in range(5):
        a.decode_step(context, token())
    alone = [a.decode_step(context, token()) for _ in range(steps)]
    after = []
    for _ in range(steps):
        b.decode_step(context, token())
        after.append(a.decode_step(context, token()))
    return {name: Stats.of(s).__dict__ for name, s in (("alone", alone), ("after_b", after))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="coarse")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="the tiny twin of the shape (a smoke test)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # internal: OUT MODE
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(args.child[0], args.child[1], args.context, args.steps, args.threads)))
        return
    import moe_onnx
    from moe_onnx.benchmarks.models import build_models, shape_named

    shape = shape_named(args.shape, args.tiny)
    with tempfile.TemporaryDirectory() as tmp:
        out = moe_onnx.export(build_models(shape)[f"{shape.name}-moe"], Path(tmp) / "moe", progress=False)
        print(f"{shape.name} MoE decode at context {args.context}, {args.threads} threads, ms p50 / p90 "
              f"({args.steps} steps each, a fresh process per mode, "
              f"modes interleaved over {args.rounds} rounds)")
        for r in range(args.rounds):
            for mode in MODES:
                cmd = [sys.executable, "-m", "studies.threading_modes", "--child", str(out), mode,
                       "--context", str(args.context), "--steps", str(args.steps),
                       "--threads", str(args.threads)]
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                                cwd=REPO).stdout)
                cells = "   ".join(
                    f"{k} {v['p50'] * 1e3:6.2f} / {v['p90'] * 1e3:6.2f}" for k, v in res.items()
                )
                print(f"round {r}  {mode:12s} {cells}", flush=True)


if __name__ == "__main__":
    main()
