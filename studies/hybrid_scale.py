"""A hybrid MoE at a released size beside llama.cpp: LFM2-8B-A1B's shape, exported to int4 and run.

    python -m studies.hybrid_scale OUTDIR --family lfm2_moe [--llama-cpp TREE] [--weights int4]
        [--threads 2] [--contexts 64,512] [--prompt 256] [--steps 16] [--rounds 3]
        [--layers N] [--hidden H] [--vocab V] [--keep]

Writes a random-weight checkpoint in the released layout with the released config (LFM2-8B-A1B:
hidden 2048, 24 layers, short convolutions (kernel 3) everywhere but attention at layers 2, 6, 10,
14, 18 and 21, 32 heads of 64 with 8 KV heads, the first 2 feed-forwards dense of width 7168, the
other 22 sparse: 32 experts of width 1792, top-4, sigmoid router with an expert bias; vocabulary
65536, tied embeddings: 8.34 B parameters) as sharded bf16 safetensors, one tensor at a time (the
weights drawn like :mod:`studies.edge_scale`'s, std 0.02: routing spreads over the experts). Then:
``moe-onnx export --weights int4`` in a child process (its wall time and peak RSS); with
``--llama-cpp`` the converter's bf16 GGUF of the same checkpoint (with a stub tokenizer) quantized
to Q4_0 / Q8_0; the checkpoint and the bf16 GGUF deleted (unless ``--keep``); the export's prepared
onnxruntime copy built (``ort_cache``, what ``rt.load`` maps); a stability check of the export
(prefill against token-by-token decode of the same prompt, greedy tokens twice: finite, equal).

Then ``--rounds`` rounds, each engine in turn (the first alternating between rounds), all at
``--threads``: ours in one fresh child process per round (``rt.load`` with ``ort_cache="auto"``
timed, then a ``--prompt``-token prefill, 1 untimed + 2 timed, and per context of ``--contexts`` 4
untimed + ``--steps`` timed decode steps against exactly that context; its peak RSS over the
whole run); llama.cpp as llama-bench processes (``-p PROMPT -n 0`` and ``-p 0 -n 1 -d CONTEXT``,
1 untimed + the same timed repetitions, flash attention probed per phase and length as the bench
does), its load time the wall time of a one-token run, its memory sampled in an extra untimed
run of each phase in the first round. Memory is peak RSS with its anonymous and file-backed
(mapped weights: shared, reclaimable) shares; ours is read at the end of the child.
``--layers`` / ``--hidden`` / ``--vocab`` shrink the model (a smoke test); the released pattern of
layer types is cut to ``--layers``. Before each engine's turn the study waits (up to
``--wait-quiet`` seconds) until other jobs use under a quarter of a core.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from studies import shards
from studies.edge_scale import _export, export_sizes

ATTENTION = (2, 6, 10, 14, 18, 21)  # LFM2-8B-A1B's full-attention layers; every other one a conv
RELEASED = dict(hidden_size=2048, num_hidden_layers=24, intermediate_size=7168, moe_intermediate_size=1792,
                num_experts=32, num_experts_per_tok=4, num_dense_layers=2, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=65536)
SHARD_BYTES = 4 << 30


def lfm2_moe_config(layers: int | None = None, hidden: int | None = None, vocab: int | None = None) -> dict:
    """LFM2-8B-A1B's config.json (the released fields); ``layers`` / ``hidden`` / ``vocab`` shrink it,
    widths and heads in the released proportions (heads of 64)."""
    shape = dict(RELEASED)
    if hidden:
        shape.update(hidden_size=hidden, intermediate_size=hidden * 7 // 2,
                     moe_intermediate_size=hidden * 7 // 8, num_attention_heads=max(1, hidden // 64),
                     num_key_value_heads=max(1, hidden // 256))
    if layers:
        shape.update(num_hidden_layers=layers, num_dense_layers=min(2, layers // 2))
    if vocab:
        shape["vocab_size"] = vocab
    n = shape["num_hidden_layers"]
    types = ["full_attention" if i in ATTENTION else "conv" for i in range(24)] * (n // 24 + 1)
    return {"model_type": "lfm2_moe", "architectures": ["Lfm2MoeForCausalLM"], **shape,
            "layer_types": types[:n], "conv_L_cache": 3, "conv_bias": False, "norm_eps": 1e-5,
            "norm_topk_prob": True, "use_expert_bias": True, "routed_scaling_factor": 1.0,
            "max_position_embeddings": 128000, "rope_theta": 1000000.0, "tie_word_embeddings": True,
            "bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0, "initializer_range": 0.02,
            "use_cache": True, "torch_dtype": "bfloat16"}


def lfm2_moe_tensors(cfg: dict):
    """(name, shape) of every tensor of the released checkpoint, layer by layer (experts stored one
    by one as w1 / w3 / w2; tied embeddings: no lm_head)."""
    H, V, E = cfg["hidden_size"], cfg["vocab_size"], cfg["num_experts"]
    D = H // cfg["num_attention_heads"]
    Q, KV = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D
    yield "model.embed_tokens.weight", (V, H)
    for i, kind in enumerate(cfg["layer_types"]):
        p = f"model.layers.{i}."
        yield f"{p}operator_norm.weight", (H,)
        if kind == "conv":
            yield f"{p}conv.in_proj.weight", (3 * H, H)
            yield f"{p}conv.conv.weight", (H, 1, cfg["conv_L_cache"])
            yield f"{p}conv.out_proj.weight", (H, H)
        else:
            for proj, rows in (("q_proj", Q), ("k_proj", KV), ("v_proj", KV)):
                yield f"{p}self_attn.{proj}.weight", (rows, H)
            yield f"{p}self_attn.out_proj.weight", (H, Q)
            yield f"{p}self_attn.q_layernorm.weight", (D,)
            yield f"{p}self_attn.k_layernorm.weight", (D,)
        yield f"{p}ffn_norm.weight", (H,)
        if i < cfg["num_dense_layers"]:
            F = cfg["intermediate_size"]
            for w, shape in (("w1", (F, H)), ("w3", (F, H)), ("w2", (H, F))):
                yield f"{p}feed_forward.{w}.weight", shape
            continue
        F = cfg["moe_intermediate_size"]
        yield f"{p}feed_forward.gate.weight", (E, H)
        yield f"{p}feed_forward.expert_bias", (E,)
        for e in range(E):
            for w, shape in (("w1", (F, H)), ("w3", (F, H)), ("w2", (H, F))):
                yield f"{p}feed_forward.experts.{e}.{w}.weight", shape
    yield "model.embedding_norm.weight", (H,)


FAMILIES = {"lfm2_moe": (lfm2_moe_config, lfm2_moe_tensors)}


def write_checkpoint(out: Path, cfg: dict, tensors) -> int:
    """Sharded bf16 safetensors of random weights (std 0.02, a shared pool sliced at varying
    offsets, as :func:`studies.edge_scale.write_checkpoint`); norms 1, expert biases 0. The bytes."""
    return shards.write_random_checkpoint(out, cfg, tensors(cfg), SHARD_BYTES, zero_suffixes=("expert_bias",))


# -- our side: one child process per round ------------------------------------------------------------

def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) << 10
    return 0


def stability(session, prompt: int = 16, new: int = 8) -> dict:
    """The export's first tokens: one prefill of ``prompt`` random ids against the same ids fed
    half as a prefill and then one by one (the recurrent mixers' chunked and step forms), and a
    greedy generation run twice. Finite, and the same argmax, the same tokens?"""
    ids = np.random.default_rng(1).integers(100, session.info.vocab_size, (1, prompt))
    whole, _ = session.forward(ids)
    half = prompt // 2
    parts, cache = session.forward(ids[:, :half])
    steps = [parts]
    for t in range(half, prompt):
        logits, cache = session.forward(ids[:, t:t + 1], cache=cache)
        steps.append(logits)
    stepped = np.concatenate(steps, axis=1)
    tokens = [session.generate(ids, max_new_tokens=new).ids[0] for _ in range(2)]
    scale = float(np.abs(whole).max())
    return {"finite": bool(np.isfinite(whole).all() and np.isfinite(stepped).all()),
            "argmax_equal": int((whole.argmax(-1) == stepped.argmax(-1)).sum()), "positions": prompt,
            "max_rel_diff": float(np.abs(whole - stepped).max() / scale), "logit_std": float(whole.std()),
            "tokens": [int(t) for t in tokens[0]], "tokens_repeat": tokens[0] == tokens[1]}


def child(export: str, threads: int, prompt: int, contexts: list[int], steps: int, check: bool) -> dict:
    """One round of ours in this process: load, prefill, decode at each context."""
    import moe_onnx.runtime as rt
    from moe_onnx.benchmarks.runners import OnnxRunner

    start = time.perf_counter()
    session = rt.load(export, provider="cpu", threads=threads, ort_cache="auto")
    result = {"load_s": time.perf_counter() - start, "prepared": session.prepared,
              "rss_after_load": _vm("VmRSS")}
    runner, rng = OnnxRunner(session), np.random.default_rng(0)
    vocab = session.info.vocab_size
    ids = rng.integers(0, vocab, (1, prompt))
    runner.prefill(ids)
    result["prefill"] = [runner.prefill(ids) for _ in range(2)]
    for context in contexts:
        runner.prepare_decode(rng.integers(0, vocab, (1, context)))
        for _ in range(4):
            runner.decode_step(context, rng.integers(0, vocab, (1, 1)))
        result[f"decode@{context}"] = [runner.decode_step(context, rng.integers(0, vocab, (1, 1)))
                                       for _ in range(steps)]
        del runner.pasts[context]
    if check:
        result["check"] = stability(session)
    return {**result, "peak_rss": _vm("VmHWM"), "anon": _vm("RssAnon"), "file": _vm("RssFile")}


def run_ours(export: Path, args, check: bool) -> dict:
    cmd = [sys.executable, "-m", "studies.hybrid_scale", str(export), "--child",
           "--threads", str(args.threads), "--prompt", str(args.prompt),
           "--contexts", args.contexts, "--steps", str(args.steps)]
    done = subprocess.run(cmd + (["--check"] if check else []), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"our round failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- llama.cpp's side -----------------------------------------------------------------------------

def peak_memory(cmd: list) -> dict:
    """Run ``cmd`` (untimed) and sample its memory every 10 ms: peak RSS (``VmHWM``) and the
    largest anonymous and file-backed shares seen (``RssAnon``, ``RssFile``), bytes."""
    peak = {"peak_rss": 0, "anon": 0, "file": 0}
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    keys = {"VmHWM": "peak_rss", "RssAnon": "anon", "RssFile": "file"}
    while True:  # read before polling: a zombie's status is still readable until it is reaped
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in keys:
                    peak[keys[key]] = max(peak[keys[key]], int(value.split()[0]) << 10)
        except (OSError, ValueError, IndexError):
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}")
    return peak


def llama_round(runner, args, contexts: list[int], first: bool) -> dict:
    """One round of llama-bench processes: load time, then every phase (1 untimed + the timed
    repetitions); in the first round each phase's peak RSS is sampled in an untimed run."""
    from moe_onnx.benchmarks import llama_cpp

    phases = [("prefill", args.prompt, 2)] + [("decode", c, args.steps) for c in contexts]
    result = {}
    if first:  # flash attention probed, then one untimed run of each phase, its memory sampled
        for phase, length, _ in phases:
            runner.samples(phase, length, 1)
            fa = runner.flash_attn[f"{phase}@{length}"]
            memory = peak_memory([runner.llama.bench, *llama_cpp.bench_args(
                runner.gguf, args.threads, phase, length, 1, fa)])
            result = {k: max(v, result.get(k, 0)) for k, v in memory.items()}
    start = time.perf_counter()
    llama_cpp._run([runner.llama.bench, "-m", runner.gguf, "-t", args.threads, "-p", 1, "-n", 0, "-r", 1,
                    "-o", "json"], "llama-bench load")
    result["load_s"] = time.perf_counter() - start
    for phase, length, reps in phases:
        key = "prefill" if phase == "prefill" else f"decode@{length}"
        result[key] = runner.samples(phase, length, reps + 1)[1:]
    return result


# -- the run ------------------------------------------------------------------------------------------

def _load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _busy(seconds: float = 2.0) -> float:
    """The machine's busy CPU time over ``seconds``, in cores (this process sleeps meanwhile)."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    (total0, idle0), _ = sample(), time.sleep(seconds)
    total1, idle1 = sample()
    return os.cpu_count() * (1 - (idle1 - idle0) / max(1, total1 - total0))


def wait_quiet(limit_s: float, threshold: float = 0.25) -> float:
    """Wait (up to ``limit_s``) until other jobs use under ``threshold`` cores: a shared machine's
    test runs would otherwise land in a timed phase. The seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s and _busy() > threshold:
        time.sleep(10)
    return time.perf_counter() - start


def _phases(args) -> list[str]:
    return ["prefill"] + [f"decode@{c}" for c in _contexts(args)]


def _contexts(args) -> list[int]:
    return [int(c) for c in args.contexts.split(",")]


def report(rounds: dict, args) -> None:
    """The markdown table (medians over every round's samples) and llama.cpp's time over ours per
    phase (median of the per-round ratios, [lowest .. highest round])."""
    from moe_onnx.benchmarks import llama_cpp
    from moe_onnx.benchmarks.timing import flat, paired_ratio

    phases = _phases(args)
    heads = [f"prefill {args.prompt} ms" if p == "prefill" else f"decode @{p[7:]} ms" for p in phases]
    for name, runs in rounds.items():
        for r, run in enumerate(runs):
            cells = ", ".join(f"{p} {np.median(run[p]) * 1e3:.1f}" for p in phases)
            print(f"  {name} round {r + 1}: load {run['load_s']:.1f} s, {cells} ms", flush=True)
    print("| engine | load s | peak RSS GiB (anon + file) | " + " | ".join(heads) + " |")
    print("|---|---|---|" + "---|" * len(phases))
    for name, runs in rounds.items():
        load = np.median([r["load_s"] for r in runs])
        top = max(runs, key=lambda r: r.get("peak_rss", 0))
        memory = " + ".join(f"{top.get(k, 0) / (1 << 30):.2f}" for k in ("anon", "file"))
        cells = [f"{np.median(flat([r[p] for r in runs])) * 1e3:.1f}" for p in phases]
        print(f"| {name} | {load:.1f} | {top.get('peak_rss', 0) / (1 << 30):.2f} ({memory}) | "
              + " | ".join(cells) + " |")
    peers = {w: f"llama.cpp {llama_cpp.gguf_type(w).upper()}" for w in _list(args.weights)}
    for ours, w, _ in engines(args):
        if peers[w] not in rounds:
            continue
        cells = []
        for p in phases:
            value, low, high, _ = paired_ratio([r[p] for r in rounds[peers[w]]], [r[p] for r in rounds[ours]])
            cells.append(f"{p} {value:.2f} [{low:.2f} .. {high:.2f}]")
        print(f"{peers[w]} / {ours}: " + "; ".join(cells) + " (> 1: ours is faster)")
    decodes = phases[1:]
    if len(decodes) > 1:  # how a decode step grows from the shortest context to the longest
        for name, runs in rounds.items():
            value, low, high, _ = paired_ratio([r[decodes[-1]] for r in runs], [r[decodes[0]] for r in runs])
            print(f"{name}: {decodes[-1]} / {decodes[0]} {value:.2f} [{low:.2f} .. {high:.2f}]")


def engines(args) -> list[tuple[str, str, str]]:
    """``(name, weights, kv_cache)`` of each of our exports: every ``--weights`` with every
    ``--kv-cache`` (``moe-onnx int4``, ``moe-onnx int4 static``, ...)."""
    return [(f"moe-onnx {w}" + ("" if kv == "concat" else f" {kv}"), w, kv)
            for w in _list(args.weights) for kv in _list(args.kv_cache)]


def _list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def prepare(src: Path, args, cfg: dict) -> tuple[dict[str, Path], dict[str, Path]]:
    """Checkpoint, exports, GGUFs, prepared copies: ``{engine: export folder}`` and ``{weights:
    GGUF}`` (empty without llama.cpp). What an earlier run made for the same config is reused; a
    missing piece is made from a new checkpoint (the same seeded weights), written only then."""
    from moe_onnx import manifest
    from moe_onnx.benchmarks import llama_cpp
    from moe_onnx.runtime import ort_cache

    made = args.outdir / "made.json"  # the config of what lies in OUTDIR
    if made.is_file() and json.loads(made.read_text()) != cfg:
        print(f"{args.outdir} holds another config: making everything anew", flush=True)
        for old in [*args.outdir.glob("export-*"), args.outdir / "gguf"]:
            shutil.rmtree(old, ignore_errors=True)
    args.outdir.mkdir(parents=True, exist_ok=True)
    made.write_text(json.dumps(cfg))
    exports = {name: args.outdir / ("export-" + w + ("" if kv == "concat" else f"-{kv}"))
               for name, w, kv in engines(args)}
    ggufs = {}
    if args.llama_cpp:
        llama = llama_cpp.LlamaCpp.locate(args.llama_cpp)
        ggufs = {w: args.outdir / "gguf" / f"{src.name}-{llama_cpp.gguf_type(w)}.gguf"
                 for w in _list(args.weights)}
    todo = [name for name, out in exports.items() if not (out / manifest.FILENAME).is_file()]
    missing = [w for w, g in ggufs.items() if not g.is_file()]
    if not todo and not missing:
        print(f"reusing the exports and GGUFs in {args.outdir} (the same config)", flush=True)
    else:
        start = time.perf_counter()
        size = write_checkpoint(src, cfg, FAMILIES[args.family][1])
        print(f"checkpoint: {size / 1e9:.2f} GB bf16 in {time.perf_counter() - start:.0f} s", flush=True)
    for name, w, kv in engines(args):
        if name not in todo:
            continue
        out = exports[name]
        figures = _export(src, out, w, kv_cache=kv)
        print(f"export --weights {w} --kv-cache {kv}: {figures['export_s']:.0f} s, peak RSS "
              f"{figures['export_peak_rss_mb']:.0f} MB, {export_sizes(out)}", flush=True)
    if missing:
        llama_cpp.write_stub_tokenizer(src, cfg["vocab_size"])
    for w in missing:
        start = time.perf_counter()
        # Q8_0 straight from the converter (no bf16 GGUF on disk); Q4_0 quantized from a bf16 one
        source = llama_cpp.gguf_type(w) if llama_cpp.gguf_type(w) == "q8_0" else "bf16"
        ggufs[w] = llama_cpp.convert(llama, src, args.outdir / "gguf", w, source=source)
        how = "converted" if source != "bf16" else "converted and quantized"
        print(f"llama.cpp: {ggufs[w].name} ({ggufs[w].stat().st_size / 1e9:.2f} GB) {how} in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    if not args.keep:
        shutil.rmtree(src, ignore_errors=True)
        for full in (args.outdir / "gguf").glob("*-bf16.gguf"):
            full.unlink()
    for out in exports.values():
        if ort_cache.lookup(out)[0] is None:
            start = time.perf_counter()
            if ort_cache.prepared_model(out, "auto") is not None:
                print(f"prepared onnxruntime copy of {out.name} in {time.perf_counter() - start:.0f} s",
                      flush=True)
    return exports, ggufs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--family", default="lfm2_moe", choices=sorted(FAMILIES))
    parser.add_argument("--llama-cpp", default=None, help="a llama.cpp build: time it on the same checkpoint")
    parser.add_argument("--weights", default="int4", help="int4, int8 or both (int4,int8)")
    parser.add_argument("--kv-cache", default="concat", help="concat, static or both (concat,static)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contexts", default="64,512")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, help="fewer layers (the released pattern cut)")
    parser.add_argument("--hidden", type=int, help="a narrower model, widths in the released proportions")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the bf16 GGUF")
    parser.add_argument("--wait-quiet", type=float, default=1200,
                        help="seconds to wait, before each timed run, for other jobs to stop (0: never)")
    parser.add_argument("--json", help="write every round's samples here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(str(args.outdir), args.threads, args.prompt, _contexts(args), args.steps,
                               args.check)))
        return
    from moe_onnx.benchmarks import llama_cpp

    cfg = FAMILIES[args.family][0](args.layers, args.hidden, args.vocab)
    exports, ggufs = prepare(args.outdir / "checkpoint", args, cfg)
    llama = llama_cpp.LlamaCpp.locate(args.llama_cpp) if ggufs else None
    peers = {f"llama.cpp {llama_cpp.gguf_type(w).upper()}": llama_cpp.LlamaBenchRunner(llama, g, args.threads)
             for w, g in ggufs.items()}
    rounds: dict[str, list] = {name: [] for name in [*exports, *peers]}
    print(f"CPU, {args.threads} threads, {args.rounds} rounds", flush=True)
    for r in range(args.rounds):
        order = list(rounds) if r % 2 == 0 else list(reversed(rounds))
        for name in order:
            waited = wait_quiet(args.wait_quiet)
            print(f"round {r + 1}, {name}: {_load()}, {_busy():.2f} cores busy after waiting "
                  f"{waited:.0f} s for quiet", flush=True)
            if name in exports:
                rounds[name].append(run_ours(exports[name], args, check=r == 0))
            else:
                rounds[name].append(llama_round(peers[name], args, _contexts(args), first=r == 0))
    for name in exports:
        check = rounds[name][0]["check"]
        print(f"stability of {name}: logits finite {check['finite']}, prefill vs token-by-token argmax "
              f"equal at {check['argmax_equal']}/{check['positions']} positions (max diff "
              f"{check['max_rel_diff']:.2e} of the largest logit; logit std {check['logit_std']:.2f}); "
              f"greedy tokens {check['tokens']}, the same when repeated: {check['tokens_repeat']}",
              flush=True)
    report(rounds, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rounds, indent=1))
    for name, peer in peers.items():
        print(f"{name} flash attention: {llama_cpp._choices(peer.flash_attn)}", flush=True)
    print("prepared copy loaded: " + ", ".join(f"{n} {rounds[n][0]['prepared']}" for n in exports))


if __name__ == "__main__":
    main()
