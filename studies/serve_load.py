"""Load on ``moe-onnx serve``: concurrent clients, streaming and not, every answer checked.

    python -m studies.serve_load OUT [--clients 16] [--requests 200] [--max-tokens 32] \\
        [--threads 2] [--max-batch 8] [--max-queue 64] [--ray] [--replicas 2] [--rounds 1] [--json F]
    python -m studies.serve_load --url http://127.0.0.1:8000 [...]   # a server already up

With OUT it starts ``moe-onnx serve OUT`` on a free loopback port (``--replicas N`` > 1: under
Ray Serve) and measures the serving processes' memory (RSS of the process tree) idle, after each
of ``--rounds`` loads and after a few idle seconds. Clients are threads of this process (stdlib
HTTP, no retries): client c sends requests c, c + clients, ... one after the other, every other
request streams. Prompts are greedy (temperature 0) from a small pool whose answers are fetched
one at a time first, so each answer under load is checked token for token against its prompt's
own: a row mixed up with another's counts as ``mismatched``; a lost chunk, a missing ``[DONE]``
or usage that disagrees with the tokens as ``bad``. Reported: answers by kind (ok, 429/503, bad),
p50/p99 latency of whole answers and of the first streamed token, and aggregate completion
tokens/s over the wall time of the load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import psutil

from studies.serve_http import Outcome, free_port, get, request, serving

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def push(self, item):",
           "for i in range(10):", "# sort a list\n", "def main():\n    args =", "x = [", "while True:"]


@dataclass
class LoadReport:
    requests: int
    clients: int
    max_tokens: int
    wall_s: float
    ok: int
    rejected: int
    bad: int
    mismatched: int
    duplicate_ids: int
    latency_p50_ms: float
    latency_p99_ms: float
    first_token_p50_ms: float | None
    first_token_p99_ms: float | None
    tokens_per_s: float
    problems: list[str]
    server: dict = field(default_factory=dict)


def run_load(url: str, *, clients: int = 16, requests: int = 200, max_tokens: int = 32,
             prompts: list[str] = PROMPTS, model: str | None = None,
             api_key: str | None = None) -> LoadReport:
    """``requests`` greedy completions from ``clients`` threads; answers checked against the
    answer each prompt gets alone."""
    ask = dict(max_tokens=max_tokens, model=model, api_key=api_key)
    reference = {p: request(url, p, stream=False, **ask) for p in prompts}
    if any(r.kind != "ok" for r in reference.values()):
        raise RuntimeError(f"the reference answers failed: {[r.problem for r in reference.values()]}")
    outcomes: list[Outcome | None] = [None] * requests

    def client(c: int) -> None:
        for i in range(c, requests, clients):
            prompt = prompts[i % len(prompts)]
            outcome = request(url, prompt, stream=i % 2 == 1, **ask)
            if outcome.kind == "ok" and outcome.ids != reference[prompt].ids:
                outcome.kind = "mismatch"
                outcome.problem = f"request {i}: not the tokens {prompt!r} gets alone"
            outcomes[i] = outcome

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return _summarise(outcomes, clients, max_tokens, wall)


def _summarise(outcomes: list[Outcome | None], clients: int, max_tokens: int,
               wall: float) -> LoadReport:
    done = [o for o in outcomes if o is not None]
    ok = [o for o in done if o.kind == "ok"]
    ids = [o.answer_id for o in ok]
    firsts = [o.first_token_s for o in ok if o.first_token_s is not None]

    def pct(values, q):
        return round(float(np.percentile(values, q)) * 1e3, 1) if values else None

    problems = [o.problem for o in done if o.problem][:10]
    if len(done) != len(outcomes):
        problems.insert(0, f"{len(outcomes) - len(done)} requests have no outcome (lost)")
    return LoadReport(
        requests=len(outcomes), clients=clients, max_tokens=max_tokens, wall_s=round(wall, 2),
        ok=len(ok), rejected=sum(o.kind == "rejected" for o in done),
        bad=sum(o.kind == "bad" for o in done) + len(outcomes) - len(done),
        mismatched=sum(o.kind == "mismatch" for o in done), duplicate_ids=len(ids) - len(set(ids)),
        latency_p50_ms=pct([o.seconds for o in ok], 50),
        latency_p99_ms=pct([o.seconds for o in ok], 99),
        first_token_p50_ms=pct(firsts, 50), first_token_p99_ms=pct(firsts, 99),
        tokens_per_s=round(sum(o.tokens for o in ok) / wall, 1), problems=problems)


# -- a server of our own ---------------------------------------------------------------------------


@contextmanager
def own_server(out: str, *, threads: int | None, max_batch: int, max_queue: int, replicas: int = 1,
               ray: bool = False, extra: tuple[str, ...] = ()):
    """``moe-onnx serve OUT`` on a free loopback port (``extra``: more of its options); yields
    ``(url, process)``."""
    port = free_port()
    command = [sys.executable, "-m", "moe_onnx.cli", "serve", out, "--port", str(port),
               "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--provider", "cpu", *extra]
    command += ["--threads", str(threads)] if threads else []
    command += ["--ray", "--replicas", str(replicas)] if ray or replicas > 1 else []
    with serving(command, port, "moe-onnx serve") as up:
        yield up


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants (Ray's workers among them)."""
    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return round(total / 2**20, 1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="export to serve (or --url)")
    parser.add_argument("--url", default=None, help="a server already running")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=None, help="200; side by side: 48")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads per replica")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--replicas", type=int, default=1, help="> 1: serve under Ray Serve")
    parser.add_argument("--ray", action="store_true", help="serve under Ray Serve (also with 1 replica)")
    parser.add_argument("--rounds", type=int, default=1, help="loads in a row (the last is reported)")
    parser.add_argument("--settle", type=float, default=5.0, help="idle seconds before the last RSS")
    parser.add_argument("--json", default=None)
    from studies import serve_side_by_side

    serve_side_by_side.add_options(parser.add_argument_group(
        "side by side with llama-server (studies/serve_side_by_side.py)"))
    args = parser.parse_args(argv)
    if args.checkpoint:
        return serve_side_by_side.main(args)
    if (args.out is None) == (args.url is None):
        parser.error("give OUT, --url or --checkpoint")
    args.requests = args.requests or 200
    load = dict(clients=args.clients, requests=args.requests, max_tokens=args.max_tokens)
    if args.url:
        report = run_load(args.url, **load)
    else:
        with own_server(args.out, threads=args.threads, max_batch=args.max_batch,
                        max_queue=args.max_queue, replicas=args.replicas, ray=args.ray) as (url, proc):
            idle, after = tree_rss_mib(proc.pid), []
            for _ in range(args.rounds):  # memory that settles stops growing from round to round
                report = run_load(url, **load)
                print(format_report(report), file=sys.stderr)
                after.append(tree_rss_mib(proc.pid))
            time.sleep(args.settle)
            report.server = {"rss_idle_mib": idle, "rss_after_rounds_mib": after,
                             "rss_settled_mib": tree_rss_mib(proc.pid), "health": get(url, "/health"),
                             "threads": args.threads, "max_batch": args.max_batch,
                             "max_queue": args.max_queue, "replicas": args.replicas,
                             "ray": args.ray or args.replicas > 1}
    report.server["machine"] = f"{os.cpu_count()} logical cores, load average {os.getloadavg()}"
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(report), f, indent=2)


def format_report(r: LoadReport) -> str:
    lines = [
        f"{r.requests} requests from {r.clients} clients, max_tokens {r.max_tokens}, "
        f"half streamed: {r.wall_s} s",
        f"  ok {r.ok}   429/503 {r.rejected}   bad {r.bad}   mismatched {r.mismatched}   "
        f"duplicate ids {r.duplicate_ids}",
        f"  latency p50 {r.latency_p50_ms} ms  p99 {r.latency_p99_ms} ms;  first streamed token p50 "
        f"{r.first_token_p50_ms} ms  p99 {r.first_token_p99_ms} ms",
        f"  aggregate {r.tokens_per_s} completion tokens/s",
    ]
    if r.server:
        lines.append(f"  server: {json.dumps(r.server)}")
    lines += [f"  problem: {p}" for p in r.problems]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
