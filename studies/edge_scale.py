"""A real-size edge MoE on this machine: an OLMoE-1B-7B-shaped checkpoint exported to int4 and run.

    python -m studies.edge_scale [--work /tmp/edge-scale] [--weights int4] [--threads 2]
        [--impls dispatch,fused] [--block-size 32] [--kv-cache concat|static:fp16] [--context 512]
        [--llama-cpp DIR] [--rounds 3] [--scale 1.0] [--keep]

Writes a random-weight checkpoint with OLMoE-1B-7B's shape (hidden 2048, 16 layers, 64 experts of
width 1024, top-8, vocab 50304: ~6.9 B parameters) as sharded bf16 safetensors (~14 GB; never in
memory whole), then times ``moe-onnx export --weights int4`` per ``--impls`` entry in a child
process (wall time, peak RSS of that process), and decode ms/token at context 512 and a 256-token
prefill through the runtime. With ``--llama-cpp DIR`` (``scripts/build_llama_cpp.sh``) the same
checkpoint is converted to GGUF (its bf16, then ``llama-quantize`` to Q4_0 / Q8_0 for int4 / int8)
and timed by llama-bench at the same threads, context and prompt, flash attention probed as in
the bench; every engine runs in the same interleaved rounds (4 untimed, then ``--steps`` timed
decode steps per round). ``--scale`` shrinks the layer count and expert count for a quick check.
Nothing here is committed or downloaded; the checkpoint and the bf16 GGUF are deleted unless
``--keep``. A model this size does not fit a CPU's last-level cache: decode reads its weights from
memory, where the small bench models may stay in a large L3.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from studies import shards

SHAPE = dict(hidden_size=2048, num_hidden_layers=16, num_experts=64, intermediate_size=1024,
             num_experts_per_tok=8, vocab_size=50304, num_attention_heads=16, num_key_value_heads=16)
# --tiny: the same checkpoint layout, export, runtime and llama.cpp path on a model of a few MB
TINY = dict(hidden_size=64, num_hidden_layers=2, num_experts=8, intermediate_size=32, num_experts_per_tok=2,
            vocab_size=512, num_attention_heads=4, num_key_value_heads=4)
SHARD_BYTES = 2 << 30


def _config(scale: float, tiny: bool = False) -> dict:
    shape = dict(TINY if tiny else SHAPE)
    shape["num_hidden_layers"] = max(1, round(shape["num_hidden_layers"] * scale))
    shape["num_experts"] = max(8, round(shape["num_experts"] * scale))
    return {"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], **shape,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "norm_topk_prob": False, "clip_qkv": None, "tie_word_embeddings": False, "hidden_act": "silu",
            "bos_token_id": None, "eos_token_id": 50279, "pad_token_id": 1, "attention_bias": False,
            "torch_dtype": "bfloat16"}


def _tensors(cfg: dict):
    """(name, shape) of every tensor, in checkpoint order (hub OLMoE names)."""
    H, F, E, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_experts"], cfg["vocab_size"]
    yield "model.embed_tokens.weight", (V, H)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{p}self_attn.{proj}.weight", (H, H)
        yield f"{p}self_attn.q_norm.weight", (H,)
        yield f"{p}self_attn.k_norm.weight", (H,)
        yield f"{p}input_layernorm.weight", (H,)
        yield f"{p}post_attention_layernorm.weight", (H,)
        yield f"{p}mlp.gate.weight", (E, H)
        for e in range(E):
            for proj, shape in (("gate_proj", (F, H)), ("up_proj", (F, H)), ("down_proj", (H, F))):
                yield f"{p}mlp.experts.{e}.{proj}.weight", shape
    yield "model.norm.weight", (H,)
    yield "lm_head.weight", (V, H)


def write_checkpoint(out: Path, scale: float, tiny: bool = False) -> int:
    """Sharded bf16 safetensors of random weights, written one tensor at a time (a shared random
    pool sliced at varying offsets: fast, and neighbouring tensors differ). Returns the bytes.

    Shards by :func:`studies.shards.write_shards` (the safetensors library writes a whole shard
    from memory, and its numpy API has no bfloat16)."""
    cfg = _config(scale, tiny)
    return shards.write_random_checkpoint(out, cfg, _tensors(cfg), SHARD_BYTES)


def _export(src: Path, out: Path, weights: str, impl: str = "dispatch", block_size: int = 32,
            kv_cache: str = "concat") -> dict:
    """``moe-onnx export`` in a child process: wall seconds and the child's peak RSS. ``kv_cache``:
    ``concat``, ``static`` or ``static:fp16`` (a static cache stored in fp16)."""
    kind, _, kv_dtype = kv_cache.partition(":")
    code = ("import resource, sys, time, moe_onnx\n"
            "t = time.perf_counter()\n"
            f"moe_onnx.export({str(src)!r}, {str(out)!r}, weights={weights!r}, moe_impl={impl!r}, "
            f"block_size={block_size}, kv_cache={kind!r}, kv_dtype={kv_dtype or None!r}, force=True, "
            "progress=False)\n"
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, maxrss_kb = result.stdout.split()[-2:]
    return {"export_s": float(seconds), "export_peak_rss_mb": int(maxrss_kb) / 1024}


def _time(runners: dict, vocab: int, context: int, prompt: int, steps: int, rounds: int) -> dict:
    """``{engine: {"prefill": [[s]...], "decode": [[s, ...]...]}}``: every engine in the same
    interleaved rounds (one untimed + one timed prefill; 4 untimed + ``steps`` timed decode steps;
    llama-bench: one process per round and phase)."""
    from moe_onnx.benchmarks import llama_cpp
    from moe_onnx.benchmarks.timing import Unit, interleave

    rng = np.random.default_rng(0)
    ids, context_ids = rng.integers(0, vocab, (1, prompt)), rng.integers(0, vocab, (1, context))
    units = []
    for name, runner in runners.items():
        if isinstance(runner, llama_cpp.LlamaBenchRunner):
            units += [Unit((name, "prefill"), llama_cpp.RoundSamples(runner, "prefill", prompt, 1), 1),
                      Unit((name, "decode"), llama_cpp.RoundSamples(runner, "decode", context, steps), steps)]
            continue
        runner.prepare_decode(context_ids)

        def step(r=runner) -> float:
            return r.decode_step(context, rng.integers(0, vocab, (1, 1)))

        units += [Unit((name, "prefill"), lambda r=runner: r.prefill(ids), 1),
                  Unit((name, "decode"), step, steps, warmup=4)]
    samples = interleave(units, rounds, lambda *a: None)
    return {name: {phase: samples[(name, phase)] for phase in ("prefill", "decode")} for name in runners}


def _report(samples: dict, context: int, prompt: int) -> None:
    """p50 per engine and phase; with llama.cpp, its time over each of ours per round."""
    from moe_onnx.benchmarks.timing import Stats, flat, paired_ratio

    for name, phases in samples.items():
        decode, prefill = Stats.of(flat(phases["decode"])), Stats.of(flat(phases["prefill"]))
        print(f"  {name:24s} prefill {prompt} tokens {prefill.p50 * 1e3:8.0f} ms   "
              f"decode at context {context}: {decode.p50 * 1e3:6.1f} ms/token p50 "
              f"({decode.p90 * 1e3:.1f} p90)", flush=True)
    llama = [n for n in samples if n.startswith("llama.cpp")]
    for peer in llama:
        for name in samples:
            if name in llama:
                continue
            cells = []
            for phase in ("prefill", "decode"):
                value, low, high, _ = paired_ratio(samples[peer][phase], samples[name][phase])
                cells.append(f"{phase} {value:.2f} [{low:.2f} .. {high:.2f}]")
            print(f"  {peer} / {name}: {'; '.join(cells)} (> 1: ours is faster)", flush=True)


def export_sizes(out: Path) -> str:
    """``files … GB; params total … B, active … B, weights read per token … MB`` of an export."""
    from moe_onnx import manifest

    m = manifest.read(out)
    files = sum(f.stat().st_size for f in out.glob("model.onnx*"))
    return (f"files {files / 1e9:.2f} GB; params total {m.params['total'] / 1e9:.2f} B, "
            f"active {m.params['active_per_token'] / 1e9:.2f} B, "
            f"weights read per token {m.bytes_per_token / 1e6:.0f} MB")


def _export_all(src: Path, work: Path, args, size: int) -> dict[str, Path]:
    """Each ``--impls`` entry exported (and its figures printed): ``{"moe-onnx <impl>": folder}``."""
    outs = {}
    for impl in args.impls.split(","):
        out = work / f"export-{args.weights}-b{args.block_size}-{impl}-{args.kv_cache.replace(':', '-')}"
        figures = _export(src, out, args.weights, impl, args.block_size, args.kv_cache)
        print(f"export --weights {args.weights} --block-size {args.block_size} --moe-impl {impl} "
              f"--kv-cache {args.kv_cache}: "
              f"{figures['export_s']:.0f} s, peak RSS {figures['export_peak_rss_mb']:.0f} MB "
              f"(budget 0.5 x checkpoint + 400 MB = {size / 2e6 + 400:.0f} MB), {export_sizes(out)}",
              flush=True)
        outs[f"moe-onnx {impl}"] = out
    return outs


def main(argv=None) -> None:
    from moe_onnx import manifest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/edge-scale")
    parser.add_argument("--weights", default="int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--impls", default="dispatch", help="MoE impls to export, comma-separated")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--kv-cache", default="concat", help="concat, static or static:fp16")
    parser.add_argument("--llama-cpp", default=None, help="a llama.cpp build: time it on the same checkpoint")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a model of a few MB (a smoke test)")
    args = parser.parse_args(argv)
    from moe_onnx.benchmarks import llama_cpp
    from moe_onnx.benchmarks.runners import onnx_runner
    from moe_onnx.runtime.threads import share_threads

    llama = llama_cpp.LlamaCpp.locate(args.llama_cpp) if args.llama_cpp else None
    work = Path(args.work)
    src = work / "checkpoint"
    start = time.perf_counter()
    size = write_checkpoint(src, args.scale, args.tiny)
    print(f"checkpoint: {size / 1e9:.2f} GB bf16 in {time.perf_counter() - start:.0f} s", flush=True)
    outs = _export_all(src, work, args, size)
    gguf = None
    if llama:
        llama_cpp.write_stub_tokenizer(src, _config(args.scale, args.tiny)["vocab_size"])
        start = time.perf_counter()
        # the checkpoint is the same for the same --scale (seeded): its GGUFs are kept per scale
        folder = work / f"gguf-{'tiny' if args.tiny else 'scale'}{args.scale:g}"
        gguf = llama_cpp.convert(llama, src, folder, args.weights, source="bf16")
        print(f"llama.cpp: {gguf.name} ({gguf.stat().st_size / 1e9:.2f} GB) converted and quantized in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    if not args.keep:
        shutil.rmtree(src)
        for full in work.glob("gguf-*/*-bf16.gguf"):
            full.unlink()
    share_threads(args.threads)
    runners = {name: onnx_runner(out, "cpu", args.threads) for name, out in outs.items()}
    if gguf:
        runners[f"llama.cpp {llama_cpp.gguf_type(args.weights)}"] = llama_cpp.LlamaBenchRunner(
            llama, gguf, args.threads)
    vocab = manifest.read(next(iter(outs.values()))).spec.vocab_size
    print(f"CPU, {args.threads} threads, {args.rounds} interleaved rounds:", flush=True)
    samples = _time(runners, vocab, args.context, args.prompt, args.steps, args.rounds)
    _report(samples, args.context, args.prompt)
    for name, runner in runners.items():
        if isinstance(runner, llama_cpp.LlamaBenchRunner):
            print(f"  {name}: flash attention {runner.flash_attn}", flush=True)


if __name__ == "__main__":
    main()
