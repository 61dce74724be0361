"""Is the sparsity real? Prefill through the default sparse impl vs the ``dense`` impl.

A random Mixtral-shaped model with many experts and k = 1 is exported once per impl (same
weights); every export runs the same 256-token prompt through the bench's runner, interleaved in
rounds (:func:`moe_onnx.benchmarks.timing.interleave`) so machine drift hits all alike. A sparse
graph should approach E/k times less expert work than the dense one.

Each impl's line also gives the rows per expert (tokens x k / E) and the GB/s at which its prefill
reads the expert weights (each expert's three matrices once per layer; a lower bound, since the
time includes attention and the lm_head): the figure that says whether few rows per expert are
handled at the weights' bandwidth.

    python -m studies.sparsity [--experts 32] [--top-k 1] [--tokens 256]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from moe_onnx.benchmarks.runners import onnx_runner
from moe_onnx.benchmarks.timing import Stats, Unit, flat, interleave, paired_ratio


def build_model(experts: int, top_k: int, hidden: int, expert_size: int, layers: int, seed: int = 0):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=2048, hidden_size=hidden, intermediate_size=expert_size, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, num_local_experts=experts,
        num_experts_per_tok=top_k, max_position_embeddings=4096,
    )
    return MixtralForCausalLM(config).eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--expert-size", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--impls", default="dispatch,gather,dense")
    args = p.parse_args(argv)

    import moe_onnx

    model = build_model(args.experts, args.top_k, args.hidden, args.expert_size, args.layers)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, args.tokens))
    units = []
    with tempfile.TemporaryDirectory() as tmp:
        for impl in args.impls.split(","):
            runner = onnx_runner(moe_onnx.export(model, Path(tmp) / impl, moe_impl=impl), "cpu", args.threads)
            units.append(Unit((impl,), lambda runner=runner: runner.prefill(ids), reps=3))
        by_key = interleave(units, args.rounds, lambda *_: None)
        samples = {key[0]: per_round for key, per_round in by_key.items()}
    print(
        f"prefill of {args.tokens} tokens, batch 1, fp32, CPU provider, {args.threads} threads; "
        f"E={args.experts} k={args.top_k} H={args.hidden} F={args.expert_size} layers={args.layers}; "
        f"median of {args.rounds} interleaved rounds x 3 runs; speed-up: median over rounds of dense / impl"
    )
    expert_bytes = args.layers * args.experts * 3 * args.hidden * args.expert_size * 4  # fp32, each read once
    rows = args.tokens * args.top_k / args.experts
    print(f"  {rows:g} rows per expert; {expert_bytes / 1e6:.0f} MB of expert weights")
    for impl, per_round in samples.items():
        s = Stats.of(flat(per_round))
        speedup = ""
        if "dense" in samples:
            speedup = f"  {paired_ratio(samples['dense'], per_round)[0]:5.1f}x faster than dense"
        rate = f"  expert weights at {expert_bytes / s.p50 / 1e9:5.1f} GB/s" if impl != "dense" else ""
        spread = f"(min {s.min * 1e3:.1f}, max {s.max * 1e3:.1f})"
        print(f"  {impl:9s} {s.p50 * 1e3:8.1f} ms  {spread}{speedup}{rate}")


if __name__ == "__main__":
    main()
