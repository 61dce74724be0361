"""Batch decode: generated tokens per second at batch 1, 4 and 8, beside llama.cpp's batched decode.

    python -m studies.batch_decode [--shape coarse|fine] [--weights fp32|int8|int4]
        [--kv-cache concat|static[:fp16]] [--batches 1,4,8] [--prompt 128] [--new 32]
        [--rounds 3] [--threads 2] [--llama-cpp DIR]

Ours: the bench's built-in MoE model exported once, then ``Session.generate`` on ``B`` prompts
left-padded to the longest (lengths ``prompt``, ``prompt - 8``, ``prompt - 16`` ...), greedy,
``--new`` tokens each (the model has no end-of-sequence token, so every row runs to the end);
tokens/s is the generated tokens of every row over the decode time (prefill not counted), the
median over ``--rounds`` rounds, batches interleaved within each round.

llama.cpp (with ``--llama-cpp``, the directory ``scripts/build_llama_cpp.sh`` prints; it needs
``llama-batched-bench``): the same checkpoint in GGUF (f32, or q8_0 / q4_0 for ``--weights int8|int4``),
``llama-batched-bench -npp PROMPT -ntg NEW -npl 1,4,8 -t THREADS``: ``B`` sequences of the same
prompt length decoded together, one token each per step; its ``S_TG t/s`` is ``B * NEW`` over the
decode time, the same quantity as ours (its prompts are unpadded and random). One process per
round.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from moe_onnx import dtypes
from moe_onnx.benchmarks import llama_cpp
from moe_onnx.benchmarks.models import DEFAULT_SHAPES, build_models, shape_named


def left_padded_prompts(batch: int, prompt: int, vocab: int, rng) -> list[list[int]]:
    """``batch`` random prompts of ``prompt``, ``prompt - 8``, ... tokens (at least 1)."""
    return [rng.integers(0, vocab, max(1, prompt - 8 * b)).tolist() for b in range(batch)]


def decode_rate(result, new: int) -> float:
    """Every row's decoded tokens over the decode time; a row that stopped before ``new`` tokens is
    refused (the rate would then be of fewer rows than the batch)."""
    short = [len(row) for row in result.ids if len(row) != new]
    if short:
        raise RuntimeError(f"rows stopped early: {short} of {new} tokens")
    return result.decode_tokens / result.decode_seconds


def ours(out: Path, batches: list[int], prompt: int, new: int, rounds: int,
         threads: int) -> tuple[dict[int, float], dict[int, int]]:
    """Median decode tokens/s of ``Session.generate`` per batch size, and the tokens each batch
    decoded per run (every row's ``new`` tokens but the prefill's first)."""
    from moe_onnx.runtime import load

    session = load(out, provider="cpu", threads=threads)
    rng = np.random.default_rng(0)
    prompts = {b: left_padded_prompts(b, prompt, session.info.vocab_size, rng) for b in batches}
    for b in batches:  # warm: allocations and onnxruntime's first-run work out of the timing
        session.generate(prompts[b], max_new_tokens=2)
    samples: dict[int, list[float]] = {b: [] for b in batches}
    tokens: dict[int, int] = {}
    for _ in range(rounds):
        for b in batches:
            result = session.generate(prompts[b], max_new_tokens=new)
            samples[b].append(decode_rate(result, new))
            tokens[b] = result.decode_tokens
    return {b: float(np.median(v)) for b, v in samples.items()}, tokens


def llama_batched(tree: Path, gguf: Path, batches: list[int], prompt: int, new: int, rounds: int,
                  threads: int) -> dict[int, float]:
    """Median ``S_TG`` tokens/s of ``llama-batched-bench`` per batch size."""
    binary = tree / "build" / "bin" / "llama-batched-bench"
    if not binary.is_file():
        raise SystemExit(f"{binary} is missing: run scripts/build_llama_cpp.sh (it builds it)")
    samples: dict[int, list[float]] = {b: [] for b in batches}
    ctx = max(batches) * (prompt + new) + 64
    for _ in range(rounds):
        stdout, _ = llama_cpp._run([binary, "-m", gguf, "-c", ctx, "-b", 2048, "-ub", 512, "-npp", prompt,
                                    "-ntg", new, "-npl", ",".join(map(str, batches)), "-t", threads,
                                    "--output-format", "jsonl"], "llama-batched-bench")
        for line in stdout.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                samples[row["pl"]].append(row["speed_tg"])
    return {b: float(np.median(v)) for b, v in samples.items() if v}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=[s.name for s in DEFAULT_SHAPES], default="coarse")
    p.add_argument("--weights", choices=["fp32", *dtypes.QUANTIZED_DTYPES], default="fp32")
    p.add_argument("--kv-cache", default="concat", help="concat, static or static:fp16")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-cpp", default=None)
    p.add_argument("--tiny", action="store_true", help="the tiny twin of the shape (a smoke test)")
    args = p.parse_args(argv)
    import moe_onnx

    batches = [int(b) for b in args.batches.split(",")]
    shape = shape_named(args.shape, args.tiny)
    model = build_models(shape)[f"{shape.name}-moe"]
    kind, _, kv_dtype = args.kv_cache.partition(":")
    with tempfile.TemporaryDirectory(prefix="moe-onnx-batch-") as tmp:
        weights = None if args.weights == "fp32" else args.weights
        out = moe_onnx.export(model, Path(tmp) / "out", weights=weights, kv_cache=kind,
                              kv_dtype=kv_dtype or None)
        mine, _ = ours(out, batches, args.prompt, args.new, args.rounds, args.threads)
        peer = {}
        if args.llama_cpp:
            llama = llama_cpp.LlamaCpp.locate(args.llama_cpp)
            checkpoint = llama_cpp.save_checkpoint(model, Path(tmp) / f"{shape.name}-moe")
            gguf = llama_cpp.convert(llama, checkpoint, Path(tmp) / "gguf", args.weights)
            peer = llama_batched(llama.tree, gguf, batches, args.prompt, args.new, args.rounds, args.threads)
    print(f"decode tokens/s (all rows), {shape.name} MoE, {args.weights}, {args.kv_cache} cache, prompt "
          f"~{args.prompt}, {args.new} new tokens, {args.threads} threads, median of {args.rounds} rounds")
    for b in batches:
        theirs = f"   llama.cpp {peer[b]:8.1f}" if b in peer else ""
        print(f"  batch {b:2d}   moe-onnx {mine[b]:8.1f}{theirs}")
    if not args.llama_cpp:
        print(f"  ({llama_cpp.SKIPPED})")


if __name__ == "__main__":
    main()
