"""How long an export takes to load and give its first token, beside llama.cpp on the same checkpoint.

    python -m studies.load_time EXPORT [--gguf FILE --llama-cpp DIR] [--runs 3] [--threads 2]
        [--cold] [--parallel-prepack on,off] [--ort-cache on]

Each run is a fresh process, timed from its start to its exit, the engines taking turns so that a
drift of the machine hits all alike:

- ``moe-onnx run EXPORT --ids 1,2,3 --max-new-tokens 1`` (the command line a user types: Python's
  start, the imports, ``rt.load`` from the prepared copy, one prefill, exit), and the same work in
  a child that reports where its time went (imports, ``rt.load``, the first token);
- llama.cpp's ``llama-bench -p 0 -n 1 -r 1 --no-warmup`` on its GGUF (the GGUF mapped), which
  loads the model, makes a context and decodes one token: with its CPU repack (``--repack 1``, its
  default: an anonymous copy of the weights in the layout its fastest kernels read) and without
  (``--repack 0``: nothing but the mapped file, its fastest load).

``--cold`` drops the page cache (``sync; echo 3 > /proc/sys/vm/drop_caches``, root) before every
run, so that every byte a load needs comes from the disk; without it the files stay in the page
cache from run to run (warm: one untimed run of each engine first fills it).
``--parallel-prepack`` runs ours with onnxruntime's parallel pre-packing on, off, or both
(``MOE_ONNX_PARALLEL_PREPACK``; on by default in the runtime).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from studies import edge_memory


def child(export: str, threads: int, ort_cache: str) -> dict:
    """The CLI's work, timed part by part (in the child process)."""
    start = time.perf_counter()
    import moe_onnx.runtime as rt

    imported = time.perf_counter()
    session = rt.load(export, provider="cpu", threads=threads, ort_cache=ort_cache)
    loaded = time.perf_counter()
    session.generate([1, 2, 3], max_new_tokens=1)
    done = time.perf_counter()
    return {"import_s": imported - start, "load_s": loaded - imported, "first_token_s": done - loaded,
            "prepared": session.prepared}


def _timed(cmd: list[str], cold: bool, env: dict | None = None) -> tuple[float, str]:
    """Run ``cmd`` (after dropping the page cache when ``cold``): its wall seconds and stdout."""
    if cold:
        edge_memory._drop_caches()
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return wall, done.stdout


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--llama-cpp", type=Path, help="llama.cpp tree with build/bin/llama-bench")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every run")
    parser.add_argument("--parallel-prepack", default="on")
    parser.add_argument("--ort-cache", default="on", help="ours from the prepared copy (on) or not")
    parser.add_argument("--llama-repack", default="1,0",
                        help="llama.cpp's CPU repack of Q4_0/Q8_0 at load: on (its default, faster "
                             "decode), off (the GGUF mapped as it is: its fastest load), or both")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.export, args.threads, args.ort_cache)))
        return
    modes = args.parallel_prepack.split(",")
    if set(modes) - {"on", "off"}:
        raise SystemExit(f"--parallel-prepack takes on, off or both, got {args.parallel_prepack!r}")
    if args.cold and os.geteuid() != 0:
        raise SystemExit("--cold drops the page cache, which needs root")
    if args.ort_cache == "on":  # built now, so that no timed run (a cold one above all) includes the build
        from moe_onnx.runtime.ort_cache import prepare_export

        prepare_export(args.export)
    engines = _measure(args, modes)
    print(f"{'cold' if args.cold else 'warm'} page cache, {args.runs} runs, {args.threads} threads; "
          "seconds, median (min-max)\n")
    print("| engine | process wall | imports | load | first token |")
    print("|---|---|---|---|---|")
    for name, runs in engines.items():
        cells = [_cell([r[k] for r in runs]) if k in runs[0] else ""
                 for k in ("wall_s", "import_s", "load_s", "first_token_s")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n" + json.dumps(engines))


def _measure(args, modes: list[str]) -> dict[str, list]:
    """Every engine's runs, taking turns; warm: one untimed round first to fill the page cache."""
    moe_onnx = Path(sys.executable).with_name("moe-onnx")
    ours = ["--threads", str(args.threads), "--ort-cache", args.ort_cache]
    engines: dict[str, list] = {}
    for run in range(args.runs + (0 if args.cold else 1)):
        for mode in modes:
            env = {**os.environ, "MOE_ONNX_PARALLEL_PREPACK": "1" if mode == "on" else "0"}
            wall, _ = _timed([str(moe_onnx), "run", args.export, "--ids", "1,2,3", "--max-new-tokens", "1",
                              *ours], args.cold, env)
            _record(engines, f"moe-onnx run (parallel pre-pack {mode})", run, args, {"wall_s": wall})
            wall, out = _timed([sys.executable, "-m", "studies.load_time", "--child", args.export, *ours],
                               args.cold, env)
            _record(engines, f"rt.load + 1 token (parallel pre-pack {mode})", run, args,
                    {"wall_s": wall, **json.loads(out.strip().splitlines()[-1])})
        if args.gguf and args.llama_cpp:
            bench = args.llama_cpp / "build" / "bin" / "llama-bench"
            for repack in args.llama_repack.split(","):
                wall, _ = _timed([str(bench), "-m", str(args.gguf), "-p", "0", "-n", "1", "-r", "1",
                                  "--no-warmup", "-t", str(args.threads), "--repack", repack], args.cold)
                _record(engines, f"llama.cpp llama-bench -p 0 -n 1 --repack {repack}", run, args,
                        {"wall_s": wall})
    return engines


def _record(engines: dict, name: str, run: int, args, result: dict) -> None:
    if args.cold or run > 0:
        engines.setdefault(name, []).append(result)


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


if __name__ == "__main__":
    main()
