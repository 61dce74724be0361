"""What ``logits_to_keep`` saves at prefill on a large vocabulary.

    python -m studies.logits_to_keep [--vocab 152064] [--lengths 256,2000] [--threads 2]

A random Llama twin (hidden 512, 4 layers, 8 heads / 4 KV, FFN 2816, vocabulary 152,064 as in
Qwen2/Qwen3) is exported once; its prefill is timed through the runtime asking for every
position's logits (``logits_to_keep=0``, what every generate step used to compute) and for the
last only (``1``, what generation asks for now), interleaved in rounds in one process.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    import moe_onnx
    from moe_onnx.benchmarks.timing import Stats, Unit, flat, interleave, timed
    from moe_onnx.runtime import Session

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--lengths", default="256,2000")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="hidden 64, one layer (a smoke test)")
    args = parser.parse_args(argv)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    size = dict(hidden_size=64, num_hidden_layers=1, intermediate_size=128) if args.tiny else dict(
        hidden_size=512, num_hidden_layers=4, intermediate_size=2816)
    config = LlamaConfig(vocab_size=args.vocab, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=4096, tie_word_embeddings=False, **size)
    with tempfile.TemporaryDirectory() as tmp:
        out = moe_onnx.export(LlamaForCausalLM(config).eval(), Path(tmp) / "twin", progress=False)
        session = Session(out, provider="cpu", threads=args.threads)
        rng = np.random.default_rng(0)
        lengths = [int(n) for n in args.lengths.split(",")]
        prompts = {n: rng.integers(0, args.vocab, (1, n)) for n in lengths}

        def prefill(n: int, keep: int) -> float:
            return timed(session.forward, prompts[n], logits_to_keep=keep)[0]

        units = [Unit((n, keep), (lambda n=n, keep=keep: prefill(n, keep)), 2)
                 for n in lengths for keep in (0, 1)]
        samples = interleave(units, args.rounds, lambda *a: None)
    print(f"Llama twin, vocabulary {args.vocab}, fp32, CPU, {args.threads} threads; prefill ms p50 "
          f"({args.rounds} rounds x 2, through Session.forward, host copy of the logits included)")
    for n in lengths:
        every, last = (Stats.of(flat(samples[(n, keep)])).p50 * 1e3 for keep in (0, 1))
        print(f"  {n:5d} tokens: every position {every:9.1f}   last only {last:8.1f}   ({every / last:.1f}x)")


if __name__ == "__main__":
    main()
