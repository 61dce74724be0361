"""Memory at the edge: load time, resident memory and decode speed of an export under memory caps,
beside llama.cpp on the same checkpoint under the same caps.

    python -m studies.edge_memory EXPORT [--gguf FILE --llama-cpp DIR] [--caps none,1.15,0.6]
        [--ort-cache on,off] [--texts skewed,uniform] [--prompt 64] [--steps 32] [--threads 2] [--cold]

Every measurement runs in a fresh child process, placed (when a cap is given) in a new cgroup v1
memory group whose ``memory.limit_in_bytes`` is the cap as a multiple of the export's weight files;
page cache is charged to it, as on a small device. The child loads the export (``rt.load``,
``ort_cache`` on or off), prefills ``--prompt`` tokens and decodes ``--steps`` tokens fed from a
text: ``skewed`` cycles over four token ids (the same experts again and again), ``uniform`` draws
ids at random (experts spread). It reports load seconds, anonymous and file-backed RSS after the
load and at the end, peak RSS, decode ms/token, bytes read from storage during decode
(``/proc/self/io``) and the share of the routed experts' bytes found in memory (1 - that / the
bytes of the k experts per layer a token routes to). ``--cold`` drops the page
cache (``echo 3 > /proc/sys/vm/drop_caches``, root) before each load. llama.cpp runs
``llama-bench`` (``-p PROMPT -n STEPS``, mmap on, its defaults) in the same cgroup; its wall time is
the whole run, load included. A child killed by the cap is reported as such, not hidden.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
SKEWED = (11, 12, 13, 14)


def _proc_status() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) << 10
    return fields


def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def child(export: str, ort_cache: str, text: str, prompt: int, steps: int, threads: int) -> dict:
    """One measured run in this process (the child): load, prefill, decode."""
    import numpy as np

    import moe_onnx.runtime as rt

    start = time.perf_counter()
    session = rt.load(export, provider="cpu", threads=threads, ort_cache=ort_cache)
    loaded = {"load_s": time.perf_counter() - start, "after_load": _proc_status(),
              "prepared": session.prepared}
    rng = np.random.default_rng(0)
    vocab = session.info.vocab_size
    ids = (np.resize(np.array(SKEWED), prompt + steps) if text == "skewed"
           else rng.integers(100, vocab, prompt + steps))
    start = time.perf_counter()
    _, cache = session.forward(ids[None, :prompt])
    prefill_s = time.perf_counter() - start
    read_before, start = _read_bytes(), time.perf_counter()
    for t in range(prompt, prompt + steps):
        _, cache = session.forward(ids[None, t:t + 1], cache=cache)
    decode_s = time.perf_counter() - start
    return {**loaded, "prefill_s": prefill_s, "decode_ms": decode_s / steps * 1e3,
            "read_mb_per_token": (_read_bytes() - read_before) / steps / 1e6, "end": _proc_status()}


def _cgroup(cap_bytes: int | None) -> Path | None:
    if cap_bytes is None:
        return None
    group = CGROUP_ROOT / f"moe-onnx-edge-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(cap_bytes))
    return group


def _in_group(group: Path | None, cmd: list[str]) -> list[str]:
    if group is None:
        return cmd
    return ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]


def _drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _capped(cmd: list[str], cap: int | None, timeout: int) -> tuple[subprocess.CompletedProcess | None, dict]:
    """Run ``cmd`` in a fresh cgroup capped at ``cap`` bytes (none: uncapped): the finished process
    and its wall time, or None and the error to report (a timeout, the OOM killer, a failure)."""
    group = _cgroup(cap)
    try:
        start = time.perf_counter()
        done = subprocess.run(_in_group(group, cmd), capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - start
    except subprocess.TimeoutExpired:
        return None, {"error": f"not done in {timeout} s"}
    finally:
        if group is not None:
            group.rmdir()
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["failed"])[-1][:200]
        return None, {"error": "killed (out of memory)" if done.returncode in (-9, 137) else last}
    return done, {"wall_s": wall}


def run_ours(export: Path, cap: int | None, ort_cache: str, text: str, args) -> dict:
    cmd = [sys.executable, "-m", "studies.edge_memory", "--child", str(export), "--ort-cache", ort_cache,
           "--texts", text, "--prompt", str(args.prompt), "--steps", str(args.steps),
           "--threads", str(args.threads)]
    done, result = _capped(cmd, cap, args.timeout)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), **result} if done else result


def run_llama(bench: Path, gguf: Path, cap: int | None, args) -> dict:
    cmd = [str(bench), "-m", str(gguf), "-p", str(args.prompt), "-n", str(args.steps), "-r", "1",
           "-t", str(args.threads), "-o", "json"]
    done, result = _capped(cmd, cap, args.timeout)
    if done is None:
        return result
    rate = {("decode" if t["n_gen"] else "prefill"): t["avg_ts"] for t in json.loads(done.stdout)}
    return {**result, "prefill_ms": 1e3 * args.prompt / rate["prefill"], "decode_ms": 1e3 / rate["decode"]}


def routed_bytes_per_token(export: Path) -> int:
    """Bytes of expert weights one decoded token reads: k experts in every MoE layer."""
    import onnx

    from moe_onnx import manifest

    moe = manifest.read(export).spec.moe
    graph = onnx.load(str(export / "model.onnx"), load_external_data=False).graph
    expert = sum(int(next(e.value for e in i.external_data if e.key == "length"))
                 for i in graph.initializer if ".experts." in i.name and i.external_data)
    return expert // moe.num_experts * moe.top_k if moe else 0


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f}"


def _row(name: str, cap: str, text: str, r: dict, routed: int) -> str:
    if "error" in r:
        return f"| {name} | {cap} | {text} | {r['error']} | | | | | | |"
    if "load_s" not in r:  # llama.cpp
        return f"| {name} | {cap} | {text} | | | | {r['decode_ms']:.1f} | | | {r['wall_s']:.1f} |"
    after, end = r["after_load"], r["end"]
    # routed expert bytes a token needed that were already in memory (storage reads are experts'
    # pages in a mapped load: every other weight is read by every token and stays resident)
    hit = max(0.0, 1 - r["read_mb_per_token"] * 1e6 / routed) if routed else 1.0
    return (f"| {name} | {cap} | {text} | {r['load_s']:.1f} | {_gib(after['RssAnon'])} / "
            f"{_gib(after['RssFile'])} | {_gib(end['VmHWM'])} | {r['decode_ms']:.1f} | "
            f"{r['read_mb_per_token']:.1f} | {hit:.0%} | {r['wall_s']:.1f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ort-cache", default="on,off")
    parser.add_argument("--caps", default="none,1.15,0.6", help="multiples of the export's weight files")
    parser.add_argument("--texts", default="skewed,uniform")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every load")
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--llama-cpp", type=Path, help="llama.cpp tree with build/bin/llama-bench")
    parser.add_argument("--timeout", type=int, default=600)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(str(args.export), args.ort_cache, args.texts, args.prompt, args.steps,
                               args.threads)))
        return
    size = sum(f.stat().st_size for f in args.export.glob("model.onnx*"))
    routed = routed_bytes_per_token(args.export)
    print(f"export {args.export}: {_gib(size)} GiB of model files; caps as multiples of it; a token "
          f"routes to {routed / 1e6:.0f} MB of expert weights\n")
    print("| engine | cap | text | load s | anon / file GiB after load | peak GiB | decode ms/token "
          "| MB read/token | expert bytes in memory | process wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cap_name in args.caps.split(","):
        cap = None if cap_name == "none" else int(float(cap_name) * size)
        label = "none" if cap is None else f"{cap_name}x ({_gib(cap)} GiB)"
        for text in args.texts.split(","):
            for mode in args.ort_cache.split(","):
                if args.cold:
                    _drop_caches()
                result = run_ours(args.export, cap, mode, text, args)
                print(_row(f"moe-onnx ort_cache={mode}", label, text, result, routed), flush=True)
        if args.gguf and args.llama_cpp:
            if args.cold:
                _drop_caches()
            bench = args.llama_cpp / "build" / "bin" / "llama-bench"
            result = run_llama(bench, args.gguf, cap, args)
            print(_row("llama.cpp", label, "its own", result, routed), flush=True)


if __name__ == "__main__":
    main()
