"""Per-token overhead of the runtime's Python generate loop against a bare ``InferenceSession.run``.

Both decode the same greedy continuation of the same prompt on the same export (a random llama,
one step >= 5 ms here); the bare loop is the least Python a caller could write: feed the
presents back as pasts and argmax the last logits. The two take turns in rounds
(:func:`moe_onnx.benchmarks.timing.interleave`) so drift hits both alike. With ``--kv-cache
static`` the bare loop is the least a caller of that contract writes: one zeroed buffer per
past, bound as both past and present (I/O binding), the logits bound to the host.

    python -m studies.runtime_overhead [--hidden 1024] [--layers 8] [--tokens 32] \
        [--kv-cache concat|static]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from moe_onnx.benchmarks.timing import Stats, Unit, flat, interleave, paired_ratio
from moe_onnx.contract import past_names, prefill_feeds


def bare_decode(session, info, prompt: np.ndarray, steps: int) -> float:
    """Seconds per decode step of a minimal loop over ``InferenceSession.run``."""
    names = [o.name for o in session.get_outputs()]
    pasts = past_names(info.num_layers)
    outputs = session.run(names, prefill_feeds(prompt, info.num_layers, info.kv_dims))
    length = prompt.shape[1]
    start = time.perf_counter()
    for _ in range(steps):
        token = outputs[0][:, -1].argmax(-1)[:, None]
        feeds = {"input_ids": token, "attention_mask": np.ones((1, length + 1), np.int64),
                 "position_ids": np.array([[length]]), "num_logits_to_keep": np.array(1)}
        feeds.update(zip(pasts, outputs[1:], strict=True))
        outputs = session.run(names, feeds)
        length += 1
    return (time.perf_counter() - start) / steps


def bare_decode_static(session, info, prompt: np.ndarray, steps: int) -> float:
    """:func:`bare_decode` for a static-cache export: buffers for prompt + steps, bound in place."""
    import onnxruntime as ort

    names = [o.name for o in session.get_outputs()]
    length = prompt.shape[1]
    from moe_onnx.runtime.steps import CAPACITY_STEP  # buffers as large as the runtime's

    capacity = -(-(length + steps) // CAPACITY_STEP) * CAPACITY_STEP
    shapes = [(1, heads, capacity, dim) for heads, dim in info.kv_dims]
    pasts = past_names(info.num_layers)
    buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shapes[j % 2], np.float32))
               for j in range(len(pasts))]

    def run(ids, total):
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        binding.bind_cpu_input("position_ids", np.arange(total - ids.shape[1], total)[None])
        binding.bind_cpu_input("num_logits_to_keep", np.array(0))
        binding.bind_output(names[0], "cpu")  # first: get_outputs() keeps the binding order
        for past, present, value in zip(pasts, names[1:], buffers, strict=True):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    logits = run(prompt, length)
    start = time.perf_counter()
    for _ in range(steps):
        logits = run(logits[:, -1].argmax(-1)[:, None], length + 1)
        length += 1
    return (time.perf_counter() - start) / steps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache", choices=["concat", "static"], default="concat")
    args = p.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import moe_onnx
    import moe_onnx.runtime as rt

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                         num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8)
    with tempfile.TemporaryDirectory() as tmp:
        out = moe_onnx.export(LlamaForCausalLM(config).eval(), f"{tmp}/llama", kv_cache=args.kv_cache)
        session = rt.load(out, provider="cpu", threads=args.threads)
        prompt = np.random.default_rng(0).integers(0, 8192, size=(1, 16))

        def runtime() -> float:
            result = session.generate(prompt[0].tolist(), max_new_tokens=args.tokens + 1)
            return result.decode_seconds / result.decode_tokens

        def bare() -> float:
            loop = bare_decode_static if args.kv_cache == "static" else bare_decode
            return loop(session.inference_session, session.info, prompt, args.tokens)

        units = [Unit(("bare",), bare, 1), Unit(("runtime",), runtime, 1)]
        samples = interleave(units, args.rounds, lambda *_: None)
    bare_s, runtime_s = samples[("bare",)], samples[("runtime",)]
    print(f"decode step, llama hidden {args.hidden} x {args.layers} layers, fp32, {args.kv_cache} cache, "
          "CPU provider, "
          f"{args.threads} threads, {args.tokens} steps x {args.rounds} interleaved rounds, medians:")
    print(f"  bare InferenceSession.run loop  {Stats.of(flat(bare_s)).p50 * 1e3:7.2f} ms/token")
    print(f"  Session.generate                {Stats.of(flat(runtime_s)).p50 * 1e3:7.2f} ms/token  "
          f"(ratio {paired_ratio(runtime_s, bare_s)[0]:.3f}, median over rounds)")


if __name__ == "__main__":
    main()
