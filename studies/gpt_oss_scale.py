"""A laptop-class MoE: a gpt-oss-20b-shaped MXFP4 checkpoint exported, prepared and run under a cap.

    python -m studies.gpt_oss_scale [--work /tmp/gpt-oss-scale] [--cap-gib 16] [--cold]
        [--llama-cpp DIR] [--prompt 64] [--steps 32] [--texts skewed,uniform] [--threads 2]
        [--scale 1.0] [--tiny] [--keep]

Writes a random-weight checkpoint with gpt-oss-20b's shape (hidden 2880, 24 layers alternating
sliding window 128 / full attention, 32 experts of width 2880, top-4, vocab 201088, 64 heads of 64,
8 KV heads, attention sinks, YaRN) in the hub's layout: experts as MXFP4 ``*_blocks`` / ``*_scales``
(random FP4 codes, E8M0 exponents 118-121), everything else bf16, ``quantization_config: mxfp4``,
as sharded safetensors written one tensor at a time. Then, each in a child process whose peak RSS
is sampled over its whole process tree: ``moe-onnx export --weights int4``; with ``--llama-cpp``
the converter's GGUF of the same checkpoint (MXFP4 experts kept as they are, the rest Q8_0, as
ggml-org ships gpt-oss); the checkpoint deleted; llama-bench on the GGUF (prefill and decode from
one ``-p PROMPT -n STEPS`` run) uncapped and under a cgroup cap of ``--cap-gib`` GiB, and the GGUF
deleted; ``moe-onnx prepare`` (the prepared onnxruntime copy); last, :mod:`studies.edge_memory`'s
measured child (load, prefill ``--prompt`` tokens, decode ``--steps``) under the same caps. That
order keeps the disk low: the prepare of the full-size export (12.5 GiB) needs about 3.3x its
weights free beside it while it builds (its fused graph and the packed copy; the realign then
frees its source as it copies). The export (and the GGUF) are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from studies import edge_memory
from studies.edge_scale import export_sizes
from studies.shards import write_shards

SHAPE = dict(hidden_size=2880, num_hidden_layers=24, num_local_experts=32, intermediate_size=2880,
             num_experts_per_tok=4, vocab_size=201088, num_attention_heads=64, num_key_value_heads=8,
             head_dim=64, sliding_window=128)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_local_experts=8, intermediate_size=64,
            num_experts_per_tok=2, vocab_size=512, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, sliding_window=8)
SHARD_BYTES = 4 << 30
BF16, U8 = "BF16", "U8"
GGUF = "gpt-oss-mxfp4.gguf"


def config(scale: float = 1.0, tiny: bool = False) -> dict:
    """gpt-oss-20b's config.json (hub fields), ``--scale`` shrinking its layers and experts."""
    shape = dict(TINY if tiny else SHAPE)
    layers = max(2, round(shape["num_hidden_layers"] * scale))
    experts = max(4, round(shape["num_local_experts"] * scale))
    shape.update(num_hidden_layers=layers, num_local_experts=experts)
    return {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], **shape,
            "experts_per_token": shape["num_experts_per_tok"],
            "layer_types": [("sliding_attention", "full_attention")[i % 2] for i in range(layers)],
            "attention_bias": True, "rms_norm_eps": 1e-5, "hidden_act": "silu", "swiglu_limit": 7.0,
            "max_position_embeddings": 131072, "initial_context_length": 4096, "rope_theta": 150000.0,
            "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": False, "original_max_position_embeddings": 4096},
            "tie_word_embeddings": False, "eos_token_id": shape["vocab_size"] - 2, "pad_token_id": None,
            "bos_token_id": None, "torch_dtype": "bfloat16", "quantization_config": {"quant_method": "mxfp4"}}


def tensors(cfg: dict):
    """(name, dtype, shape) of every tensor, in checkpoint order (hub gpt-oss names; each MXFP4
    pair's blocks just before its scales, as llama.cpp's converter expects)."""
    H, F, E, V = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_local_experts", "vocab_size"))
    Q, KV = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    yield "model.embed_tokens.weight", BF16, (V, H)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield f"{p}input_layernorm.weight", BF16, (H,)
        yield f"{p}self_attn.sinks", BF16, (cfg["num_attention_heads"],)
        for proj, rows in (("q_proj", Q), ("k_proj", KV), ("v_proj", KV)):
            yield f"{p}self_attn.{proj}.weight", BF16, (rows, H)
            yield f"{p}self_attn.{proj}.bias", BF16, (rows,)
        yield f"{p}self_attn.o_proj.weight", BF16, (H, Q)
        yield f"{p}self_attn.o_proj.bias", BF16, (H,)
        yield f"{p}post_attention_layernorm.weight", BF16, (H,)
        yield f"{p}mlp.router.weight", BF16, (E, H)
        yield f"{p}mlp.router.bias", BF16, (E,)
        # [E, out rows, in / 32 blocks, 16 bytes] and one exponent per block
        for proj, rows, inputs in (("gate_up_proj", 2 * F, H), ("down_proj", H, F)):
            yield f"{p}mlp.experts.{proj}_blocks", U8, (E, rows, inputs // 32, 16)
            yield f"{p}mlp.experts.{proj}_scales", U8, (E, rows, inputs // 32)
            yield f"{p}mlp.experts.{proj}_bias", BF16, (E, rows)
    yield "model.norm.weight", BF16, (H,)
    yield "lm_head.weight", BF16, (V, H)


def _pools() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    normal = (rng.standard_normal(1 << 22, dtype=np.float32) * 0.02).view(np.uint32)
    return {"bf16": (normal >> 16).astype(np.uint16),  # bfloat16 bit patterns: the float32's top half
            "blocks": rng.integers(0, 256, 1 << 22, dtype=np.uint8),  # every FP4 code, both nibbles
            "scales": rng.integers(118, 122, 1 << 22, dtype=np.uint8)}  # 2^-9 .. 2^-6: |w| <= 0.09


def _write_cycled(f, pool: np.ndarray, start: int, count: int) -> None:
    """``count`` values of ``pool`` from ``start`` on, cycling, written a pool's length at a time."""
    while count:
        chunk = pool[start:start + count]
        f.write(chunk.tobytes())
        count -= chunk.size
        start = 0


def _write_tensor(f, name: str, dtype: str, shape: tuple, pools: dict, seed: int) -> None:
    count = int(np.prod(shape))
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        f.write(np.full(count, 0x3F80, np.uint16).tobytes())  # norms: 1.0
        return
    pool = pools["bf16" if dtype == BF16 else name.rsplit("_", 1)[1]]
    _write_cycled(f, pool, seed * 7919 % pool.size, count)


def write_checkpoint(out: Path, scale: float = 1.0, tiny: bool = False) -> int:
    """The checkpoint as sharded safetensors, written one tensor at a time (never in memory whole:
    :func:`studies.shards.write_shards`). Returns the bytes of tensor data."""
    cfg = config(scale, tiny)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    pools = _pools()

    def write(f, tensor, dtype, shape, n, k):
        _write_tensor(f, tensor, dtype, shape, pools, n * 1_000_003 + k)

    return write_shards(out, tensors(cfg), SHARD_BYTES, write,
                        keep_with_next=lambda name: name.endswith("_blocks"))  # a pair stays in one shard


def timed(cmd: list, interval: float = 0.1) -> tuple[float, float, str]:
    """Run ``cmd``: (wall seconds, peak RSS of its whole process tree in MB, stdout). The tree's
    sum is sampled, since ``moe-onnx prepare`` works in child processes that ``ru_maxrss`` of the
    command would not count."""
    import psutil

    start, peak = time.perf_counter(), 0
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        rss = 0
        try:
            for p in [parent, *parent.children(recursive=True)]:
                rss += p.memory_info().rss
        except psutil.Error:  # a process ended while sampled
            pass
        peak = max(peak, rss)
        time.sleep(interval)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... failed ({proc.returncode}): {stderr[-2000:]}")
    return time.perf_counter() - start, peak / 1e6, stdout


def _gguf(llama, src: Path, work: Path, vocab: int) -> Path:
    """llama.cpp's converter on the checkpoint: MXFP4 experts repacked as they are, the rest Q8_0."""
    from moe_onnx.benchmarks import llama_cpp

    llama_cpp.write_stub_tokenizer(src, vocab)
    gguf = work / GGUF
    seconds, peak, _ = timed([sys.executable, "-c", llama_cpp._CONVERT, llama.tree, src, "--outtype", "q8_0",
                              "--outfile", gguf])
    print(f"llama.cpp convert_hf_to_gguf.py --outtype q8_0: {seconds:.0f} s, peak RSS {peak:.0f} MB, "
          f"GGUF {gguf.stat().st_size / 1e9:.2f} GB", flush=True)
    return gguf


def _row(name: str, cap: str, text: str, r: dict, routed: int) -> str:
    gib = edge_memory._gib
    if "error" in r:
        return f"| {name} | {cap} | {text} | {r['error']} | | | | | | | |"
    prefill = f"{r['prefill_ms']:.0f}" if "prefill_ms" in r else f"{r['prefill_s'] * 1e3:.0f}"
    if "load_s" not in r:  # llama.cpp: its wall time includes its load
        return f"| {name} | {cap} | {text} | | | | {prefill} | {r['decode_ms']:.1f} | | | {r['wall_s']:.1f} |"
    after = r["after_load"]
    hit = max(0.0, 1 - r["read_mb_per_token"] * 1e6 / routed) if routed else 1.0
    return (f"| {name} | {cap} | {text} | {r['load_s']:.1f} | "
            f"{gib(after['RssAnon'])} / {gib(after['RssFile'])} | {gib(r['end']['VmHWM'])} | {prefill} | "
            f"{r['decode_ms']:.1f} | {r['read_mb_per_token']:.1f} | {hit:.0%} | {r['wall_s']:.1f} |")


def _caps(size: int, args) -> list[tuple[str, int | None]]:
    """(label, bytes) of each cap: none, then ``--cap-gib`` (with its multiple of the files)."""
    if not args.cap_gib:
        return [("none", None)]
    cap = int(args.cap_gib * (1 << 30))
    return [("none", None), (f"{edge_memory._gib(cap)} GiB ({cap / size:.3f}x)", cap)]


def llama_rows(llama, gguf: Path, caps: list, args) -> list[str]:
    """llama.cpp's rows, one per cap (run before the prepared copy is built: the GGUF can then be
    deleted first, and the disk never holds it beside the build)."""
    rows = []
    for label, cap in caps:
        if args.cold:
            edge_memory._drop_caches()
        result = edge_memory.run_llama(llama.bench, gguf, cap, args)
        rows.append(_row("llama.cpp MXFP4 + Q8_0", label, "its own", result, 0))
    return rows


def measure(out: Path, caps: list, llama: list[str], args) -> None:
    """The memory table: ours (the prepared copy) per cap and text, then llama.cpp's rows."""
    size = sum(f.stat().st_size for f in out.glob("model.onnx*"))
    routed = edge_memory.routed_bytes_per_token(out)
    print(f"\nexport: {edge_memory._gib(size)} GiB of model files; a token routes to {routed / 1e6:.0f} MB "
          f"of expert weights; prompt {args.prompt}, {args.steps} decode steps, {args.threads} threads\n")
    print(f"| engine | cap | text | load s | anon / file GiB after load | peak GiB "
          f"| prefill {args.prompt} ms | decode ms/token | MB read/token | expert bytes in memory "
          "| process wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for label, cap in caps:
        for text in args.texts.split(","):
            if args.cold:
                edge_memory._drop_caches()
            result = edge_memory.run_ours(out, cap, "on", text, args)
            print(_row("moe-onnx int4, prepared copy", label, text, result, routed), flush=True)
    print("\n".join(llama), flush=True)


def _arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpt-oss-scale"))
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the layers and experts")
    parser.add_argument("--tiny", action="store_true", help="a model of a few MB (a smoke test)")
    parser.add_argument("--cap-gib", type=float, default=16.0, help="the memory cap (0: uncapped only)")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every run (root)")
    parser.add_argument("--llama-cpp", default=None, help="a llama.cpp build: run it on the same checkpoint")
    parser.add_argument("--texts", default="skewed,uniform")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per measured run")
    parser.add_argument("--keep", action="store_true", help="keep the export and the GGUF")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    from moe_onnx.benchmarks import llama_cpp

    args = _arguments(argv)
    llama = llama_cpp.LlamaCpp.locate(args.llama_cpp) if args.llama_cpp else None
    work, cfg = args.work, config(args.scale, args.tiny)
    src, out = work / "checkpoint", work / "export-int4"
    start = time.perf_counter()
    size = write_checkpoint(src, args.scale, args.tiny)
    print(f"checkpoint: {size / 1e9:.2f} GB (MXFP4 experts, bf16 rest), {cfg['num_hidden_layers']} layers of "
          f"{cfg['num_local_experts']} experts, written in {time.perf_counter() - start:.0f} s", flush=True)
    try:
        seconds, peak, _ = timed([sys.executable, "-m", "moe_onnx.cli", "export", src, "-o", out,
                                  "--weights", "int4", "--force"])
        files = sum(f.stat().st_size for f in out.glob("model.onnx*"))
        print(f"export --weights int4: {seconds:.0f} s, peak RSS {peak:.0f} MB, {export_sizes(out)}",
              flush=True)
        caps = _caps(files, args)
        gguf = _gguf(llama, src, work, cfg["vocab_size"]) if llama else None
        shutil.rmtree(src)  # needed no more: the disk holds at most two copies of the model at a time
        llama_table = llama_rows(llama, gguf, caps, args) if llama else []
        if gguf and not args.keep:
            gguf.unlink()
        seconds, peak, _ = timed([sys.executable, "-m", "moe_onnx.cli", "prepare", out])
        cache = sum(f.stat().st_size for f in (out / "ort-cache").rglob("*") if f.is_file())
        print(f"prepare: {seconds:.0f} s, peak RSS {peak:.0f} MB (process tree), prepared copy "
              f"{cache / (1 << 30):.2f} GiB", flush=True)
        measure(out, caps, llama_table, args)
    finally:
        if not args.keep:  # what this run wrote, whatever stage it reached
            for path in (src, out):
                shutil.rmtree(path, ignore_errors=True)
            (work / GGUF).unlink(missing_ok=True)


if __name__ == "__main__":
    main()

