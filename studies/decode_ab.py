"""Decode steps only: several exports side by side through the runtime's own step.

    python -m studies.decode_ab OUT [OUT ...] [--contexts 128,2000] [--rounds 5] [--steps 20]
    python -m studies.decode_ab --builtin coarse --weights int4,int4:128 \
        --kv-cache concat,static:fp16

Each export builds one cache per context (the bench's :class:`~moe_onnx.benchmarks.runners.OnnxRunner`)
and times ``--steps`` decode steps per round from it, a fresh random token each, the exports and
contexts interleaved round by round (:func:`moe_onnx.benchmarks.timing.interleave`) on one shared
onnxruntime pool. Unlike ``moe-onnx bench`` nothing else runs between the rounds (no prefill,
no dense twins): an A/B of graph variants (``--kv-cache``, ``--kv-dtype``, impls) on one model.
Prints the p50 per export and context and each round's median. ``--builtin SHAPE`` exports the
bench's own MoE model of that shape once per ``--weights`` and ``--kv-cache`` entry
(``format[:block]``, ``kind[:kv dtype]``) instead.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import numpy as np

from moe_onnx import manifest
from moe_onnx.benchmarks.runners import onnx_runner
from moe_onnx.benchmarks.timing import Stats, Unit, flat, interleave
from moe_onnx.benchmarks.variants import weight_export_options
from moe_onnx.runtime.threads import share_threads


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outs", nargs="*")
    p.add_argument("--builtin", choices=["coarse", "fine"], default=None)
    p.add_argument("--weights", default="fp32",
                   help="--builtin: weight formats, comma-separated (fp32, int8, int4, int4:128 ...)")
    p.add_argument("--kv-cache", default="concat,static:fp16", help="--builtin: caches to compare")
    p.add_argument("--contexts", default="128,2000")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="--builtin: the shape's tiny twin (a smoke test)")
    args = p.parse_args(argv)
    if args.builtin:
        with tempfile.TemporaryDirectory(prefix="moe-onnx-ab-") as tmp:
            args.outs = _export_builtin(args, Path(tmp))
            return _run(args)
    if not args.outs:
        p.error("give exports (OUT ...) or --builtin SHAPE")
    _run(args)


def _export_builtin(args, tmp: Path) -> list[str]:
    import moe_onnx
    from moe_onnx.benchmarks.models import build_models, shape_named

    shape = shape_named(args.builtin, args.tiny)
    model = build_models(shape)[f"{shape.name}-moe"]
    outs = []
    for weights, entry in itertools.product(args.weights.split(","), args.kv_cache.split(",")):
        kind, _, kv_dtype = entry.partition(":")
        out = tmp / f"{shape.name}-{weights.replace(':', 'b')}-{kind}{'-' + kv_dtype if kv_dtype else ''}"
        moe_onnx.export(model, out, **weight_export_options(weights), kv_cache=kind,
                        kv_dtype=kv_dtype or None)
        outs.append(str(out))
    return outs


def _run(args) -> None:
    share_threads(args.threads)
    rng = np.random.default_rng(0)
    units = []
    for out in args.outs:
        vocab = manifest.read(out).spec.vocab_size
        runner = onnx_runner(Path(out), "cpu", args.threads)
        for context in (int(c) for c in args.contexts.split(",")):
            runner.prepare_decode(rng.integers(0, vocab, (1, context)))

            def step(runner=runner, context=context, vocab=vocab) -> float:
                return runner.decode_step(context, rng.integers(0, vocab, (1, 1)))

            units.append(Unit((out, context), step, reps=args.steps))
    samples = interleave(units, args.rounds, lambda *_: None)
    print(f"decode p50 ms, {args.rounds} interleaved rounds x {args.steps} steps, {args.threads} threads")
    for (out, context), per_round in samples.items():
        rounds = " ".join(f"{np.median(r) * 1e3:.2f}" for r in per_round)
        p50 = Stats.of(flat(per_round)).p50 * 1e3
        print(f"  {Path(out).name:28s} @{context:<6d} {p50:7.3f}   rounds: {rounds}")


if __name__ == "__main__":
    main()
