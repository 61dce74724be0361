"""Is the sparsity real? Prefill through the default sparse impl vs the ``dense`` impl.

A random Mixtral-shaped model with many experts and k = 1 is exported twice (same weights);
both sessions run the same 256-token prompt, interleaved so machine drift hits both alike.
A sparse graph should approach E/k times less expert work than the dense one.

    python -m moe_onnx.benchmarks.sparsity [--experts 32] [--top-k 1] [--tokens 256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from moe_onnx.contract import prefill_feeds


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


def time_interleaved(sessions: dict, feeds: dict, rounds: int, per_round: int = 3) -> dict[str, list[float]]:
    """Rounds of (one untimed run + ``per_round`` timed runs) per session, sessions alternating.

    Alternating keeps slow drift fair to all; the untimed run after each switch keeps one
    session's cache and allocator state from being billed to the next.
    """
    times = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            s.run(["logits"], feeds)
            for _ in range(per_round):
                start = time.perf_counter()
                s.run(["logits"], feeds)
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
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
    args = p.parse_args()

    import onnxruntime as ort

    import moe_onnx

    model = build_model(args.experts, args.top_k, args.hidden, args.expert_size, args.layers)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in args.impls.split(","):
            out = moe_onnx.export(model, Path(tmp) / impl, moe_impl=impl)
            sessions[impl] = ort.InferenceSession(str(out / "model.onnx"), options, providers=["CPUExecutionProvider"])
        c = model.config
        ids = np.random.default_rng(0).integers(0, c.vocab_size, size=(1, args.tokens))
        feeds = prefill_feeds(ids, c.num_hidden_layers, c.num_key_value_heads, c.hidden_size // c.num_attention_heads)
        times = time_interleaved(sessions, feeds, args.rounds)
    print(
        f"prefill of {args.tokens} tokens, batch 1, fp32, CPU provider, {args.threads} threads; "
        f"E={args.experts} k={args.top_k} H={args.hidden} F={args.expert_size} layers={args.layers}; "
        f"median of {args.rounds} rounds x 3 runs, sessions alternating"
    )
    dense = statistics.median(times["dense"]) if "dense" in times else None
    for impl, ts in times.items():
        med = statistics.median(ts)
        speedup = f"  {dense / med:5.1f}x faster than dense" if dense else ""
        print(f"  {impl:9s} {med * 1e3:8.1f} ms  (min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f}){speedup}")


if __name__ == "__main__":
    main()
