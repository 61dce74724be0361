"""``moe-onnx serve`` and llama-server side by side: one checkpoint, the same seeded requests.

    python -m studies.serve_load --checkpoint SRC [--make-checkpoint] [--llama-cpp TREE] \\
        [--weights int4,int8] [--loads 1,4,16] [--arrivals burst,poisson] [--rate 2] [--requests 48] \\
        [--threads 2] [--work /tmp/serve-side-by-side] [--llama-tune | --llama-config fa=on,...] [--json F]

SRC is a transformers checkpoint with a tokenizer (``--make-checkpoint``: first write there, when
it is not, the random-weight Mixtral of BENCHMARKS.md's table, :data:`studies.serve_peers.SERVE_MODEL`;
:mod:`studies.serve_peers` starts the servers). Per ``--weights`` entry SRC is exported
(``moe_onnx.export(..., weights=W)``) and, with ``--llama-cpp``, converted to the GGUF of the same
bits (:func:`moe_onnx.benchmarks.llama_cpp.convert`: f32, then ``llama-quantize`` to Q4_0 / Q8_0),
both under ``--work``. Without ``--llama-cpp`` only our server is measured, and the report says so.

The load: ``--requests`` completions drawn once from ``--seed`` (prompts of random token ids,
most short and ``--long-share`` of them a few hundred tokens; ``max_tokens`` uniform in
``--answers``), sent as token ids so both servers read the very same prompts. ``clients`` is how
many may be in flight at once; a request is sent at its arrival time or when a client is free,
whichever is later. Arrivals: ``burst`` (all at time 0: as fast as the clients go) or
``poisson`` (exponential gaps at ``--rate`` per second, seeded). Every request streams, over
plain HTTP from threads of this process (:func:`studies.serve_http.request`), greedy.

Each (weights, clients, arrivals) runs on a fresh server of each kind, one right after the other,
so that no prompt cache holds an earlier run's prompts: ours with ``--max-batch clients``,
llama-server with ``-np clients`` and ``clients`` x the model's context (each slot the model's
whole context, as each of our rows has). Both keep their prompt caches at their defaults (the
prompts share no prefix). Answers are checked against the same server's answers of the 1-client
burst run (one request at a time): token ids for ours, text for llama-server (its tokens and
kernels differ from ours, so its answers are checked only against its own).

Reported per server and run: answers (ok; errors; mismatched: well-formed but not the answer the
request got alone, with the median token or character where they diverge), completion tokens/s
over the run's wall time (first send to last answer), time to first token p50/p99 (from the
request's send, not its arrival: time waiting for a free client is not counted), inter-token
latency p50/p99 (the gaps between a stream's chunks that carry text; both servers send one token a
chunk unless a token ends inside a UTF-8 character), and the CPU time the machine spent outside
this process and its servers during the run (other sessions' work sharing the cores).
``--llama-tune`` first tries llama-server's candidate settings
(:data:`studies.serve_peers.CANDIDATES`) on the largest load's burst and keeps the one with the
most tokens/s.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from studies import serve_http
from studies.serve_peers import (
    CANDIDATES,
    CpuWatch,
    LlamaConfig,
    llama_server,
    llama_server_binary,
    llama_version,
    our_server,
    write_checkpoint,
)

LLAMA_SKIPPED = ("llama-server side skipped: no llama.cpp tree given "
                 "(--llama-cpp TREE, built with llama-server)")


@dataclass(frozen=True)
class Ask:
    prompt: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    requests: int = 48
    seed: int = 0
    short: tuple[int, int] = (8, 32)
    long: tuple[int, int] = (200, 400)
    long_share: float = 0.25
    answers: tuple[int, int] = (16, 128)
    rate: float = 2.0  # poisson arrivals per second

    def asks(self, vocab: int, special: set[int]) -> list[Ask]:
        """The requests, the same for every server and load: prompt ids drawn from the vocabulary
        without its special ids, lengths and ``max_tokens`` uniform in their ranges."""
        rng = np.random.default_rng(self.seed)
        ids = np.array([i for i in range(vocab) if i not in special])
        asks = []
        for _ in range(self.requests):
            lo, hi = self.long if rng.random() < self.long_share else self.short
            prompt = rng.choice(ids, int(rng.integers(lo, hi + 1)))
            answer = int(rng.integers(self.answers[0], self.answers[1] + 1))
            asks.append(Ask([int(i) for i in prompt], answer))
        return asks

    def arrivals(self, kind: str) -> list[float]:
        """Seconds from the run's start at which each request arrives."""
        if kind == "burst":
            return [0.0] * self.requests
        gaps = np.random.default_rng(self.seed + 1).exponential(1 / self.rate, self.requests)
        return [0.0, *np.cumsum(gaps[:-1]).tolist()]


@dataclass
class Run:
    server: str  # moe-onnx, llama-server
    weights: str
    clients: int
    arrivals: str
    requests: int
    wall_s: float = 0.0
    ok: int = 0
    errors: int = 0
    mismatched: int = 0
    diverged_at: int | None = None  # median first differing token (ours) or character, of those
    completion_tokens: int = 0
    tokens_per_s: float = 0.0
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    chunks_per_token: float | None = None
    other_cpu_s: float | None = None  # CPU seconds the machine spent outside both processes' trees
    problems: list[str] = field(default_factory=list)


def drive(url: str, asks: list[Ask], at: list[float], clients: int) -> tuple[list[serve_http.Outcome], float]:
    """Every ask streamed, in order, each sent at its arrival time or when one of ``clients``
    is free; the outcomes and the wall time (first send to last answer)."""
    outcomes: list[serve_http.Outcome | None] = [None] * len(asks)
    order, lock = iter(range(len(asks))), threading.Lock()
    start = time.perf_counter()

    def client() -> None:
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                return
            time.sleep(max(0.0, start + at[i] - time.perf_counter()))
            outcomes[i] = serve_http.request(url, asks[i].prompt, stream=True, max_tokens=asks[i].max_tokens,
                                             timeout=600)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [o for o in outcomes if o is not None]
    end = max((o.sent_at + o.seconds for o in done), default=start)
    return outcomes, end - min((o.sent_at for o in done), default=start)


def summarise(run: Run, outcomes: list, wall: float, reference: list | None) -> Run:
    """``run`` filled from the outcomes. A well-formed answer that differs from ``reference`` (the
    same server's one-at-a-time answer) counts as ok and as mismatched, with where it diverged:
    quantized kernels round a row differently with other rows beside it (see BENCHMARKS.md)."""
    ok, gaps, chunks, diverged = [], [], 0, []
    for i, o in enumerate(outcomes):
        if o is None or o.kind != "ok":
            run.errors += 1
            run.problems.append(f"request {i}: " + (o.problem or o.kind if o else "lost"))
            continue
        alone = reference[i] if reference is not None and reference[i] and reference[i].kind == "ok" else None
        if alone is not None and _answer(o) != _answer(alone):
            run.mismatched += 1
            diverged.append(_first_difference(_answer(o), _answer(alone)))
        ok.append(o)
        gaps += np.diff(o.chunk_s).tolist()
        chunks += len(o.chunk_s)

    def pct(values, q):
        return round(float(np.percentile(values, q)) * 1e3, 1) if values else None

    firsts = [o.first_token_s for o in ok if o.first_token_s is not None]
    run.ok, run.wall_s = len(ok), round(wall, 2)
    run.completion_tokens = sum(o.tokens for o in ok)
    run.tokens_per_s = round(run.completion_tokens / wall, 1) if wall else 0.0
    run.ttft_p50_ms, run.ttft_p99_ms = pct(firsts, 50), pct(firsts, 99)
    run.itl_p50_ms, run.itl_p99_ms = pct(gaps, 50), pct(gaps, 99)
    run.chunks_per_token = round(chunks / run.completion_tokens, 3) if run.completion_tokens else None
    run.diverged_at = int(np.median(diverged)) if diverged else None
    run.problems = run.problems[:10]
    return run


def _answer(o: serve_http.Outcome):
    return tuple(o.ids) if o.ids else o.text


def _first_difference(a, b) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def warm(url: str, token: int, lengths: tuple[int, ...] = (8, 300)) -> None:
    """A short and a long request of one repeated id, so that first-call costs stay out of a run."""
    for n in lengths:
        outcome = serve_http.request(url, [token] * n, stream=True, max_tokens=4, timeout=300)
        if outcome.kind != "ok":
            raise RuntimeError(f"warm-up request failed: {outcome.problem or outcome.status}")


# -- one invocation --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    checkpoint: Path
    work: Path
    weights: tuple[str, ...] = ("int4", "int8")
    loads: tuple[int, ...] = (1, 4, 16)
    arrivals: tuple[str, ...] = ("burst", "poisson")
    threads: int = 2
    llama_tree: str | None = None
    llama: LlamaConfig = LlamaConfig()
    tune: bool = False


def run(plan: Plan, workload: Workload) -> dict:
    """Every (weights, clients, arrivals) on both servers; the report (``runs``: :class:`Run` dicts)."""
    cfg = json.loads((plan.checkpoint / "config.json").read_text())
    vocab, context = cfg["vocab_size"], cfg["max_position_embeddings"]
    special = {i for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               for i in np.atleast_1d(cfg.get(k) if cfg.get(k) is not None else [])}
    asks = workload.asks(vocab, special)
    binary = llama_server_binary(plan.llama_tree) if plan.llama_tree else None
    report = {"conditions": _conditions(plan, workload, asks, context), "runs": [], "llama_tune": []}
    if binary is None:
        print(LLAMA_SKIPPED, file=sys.stderr)
        report["llama_server"] = LLAMA_SKIPPED
    plan.work.mkdir(parents=True, exist_ok=True)
    log = plan.work / "servers.log"
    for weights in plan.weights:
        starts = {"moe-onnx": partial(our_server, _export(plan, weights), threads=plan.threads, log=log)}
        if binary is not None:
            gguf = _gguf(plan, weights)
            config = _tune(report, binary, gguf, context, asks, plan, log) if plan.tune else plan.llama
            report.setdefault("llama_server", {"binary": str(binary), "version": llama_version(binary),
                                               "config": {}, "gguf": {}})
            report["llama_server"]["config"][weights] = config.label()
            report["llama_server"]["gguf"][weights] = str(gguf)
            starts["llama-server"] = partial(llama_server, binary, gguf, context=context, config=config,
                                             log=log)
        references: dict[str, list] = {}
        runs = [(1, "burst")] + [(c, a) for c in plan.loads for a in plan.arrivals if (c, a) != (1, "burst")]
        for clients, kind in runs:
            for name, start in starts.items():
                with start(clients) as url:
                    warm(url, max(set(range(vocab)) - special), (workload.short[0], workload.long[1]))
                    watch = CpuWatch()
                    outcomes, wall = drive(url, asks, workload.arrivals(kind), clients)
                    other = watch.other()
                done = summarise(Run(name, weights, clients, kind, len(asks)), outcomes, wall,
                                 references.get(name))
                done.other_cpu_s = other
                references.setdefault(name, outcomes)
                if clients in plan.loads and kind in plan.arrivals:
                    report["runs"].append(asdict(done))
                    print(format_run(done), file=sys.stderr, flush=True)
    return report


def _export(plan: Plan, weights: str) -> Path:
    out = plan.work / f"{plan.checkpoint.name}-{weights}"
    if not (out / "model.onnx").is_file():
        import moe_onnx

        moe_onnx.export(plan.checkpoint, out, weights=weights)
    return out


def _gguf(plan: Plan, weights: str) -> Path:
    from moe_onnx.benchmarks.llama_cpp import LlamaCpp, convert

    return convert(LlamaCpp.locate(plan.llama_tree), plan.checkpoint, plan.work / "gguf", weights)


def _tune(report: dict, binary: Path, gguf: Path, context: int, asks: list[Ask], plan: Plan,
          log: Path) -> LlamaConfig:
    """The candidate with the most tokens/s on the largest load's burst (the first 32 requests)."""
    clients, probe = max(plan.loads), asks[:32]
    best = None
    for config in CANDIDATES:
        with llama_server(binary, gguf, clients, context, config, log) as url:
            warm(url, 1, (8, max(len(a.prompt) for a in probe)))
            watch = CpuWatch()
            outcomes, wall = drive(url, probe, [0.0] * len(probe), clients)
            other = watch.other()
        tried = summarise(Run("llama-server", gguf.stem, clients, "burst", len(probe)), outcomes, wall, None)
        tried.other_cpu_s = other
        report["llama_tune"].append({"config": config.label(), **asdict(tried)})
        print(f"llama-server {config.label()}: {tried.tokens_per_s} tokens/s, TTFT p99 {tried.ttft_p99_ms} "
              f"ms, ITL p99 {tried.itl_p99_ms} ms, {tried.errors} errors, other CPU {other} s",
              file=sys.stderr, flush=True)
        if tried.errors == 0 and (best is None or tried.tokens_per_s > best[0]):
            best = (tried.tokens_per_s, config)
    if best is None:
        raise RuntimeError("every llama-server candidate had errors: see " + str(log))
    return best[1]


def _conditions(plan: Plan, workload: Workload, asks: list[Ask], context: int) -> dict:
    lengths = [len(a.prompt) for a in asks]
    return {"checkpoint": str(plan.checkpoint), "context": context, "threads": plan.threads,
            "workload": asdict(workload), "prompt_tokens": sum(lengths),
            "prompt_lengths": [min(lengths), int(np.median(lengths)), max(lengths)],
            "max_tokens_sum": sum(a.max_tokens for a in asks), "machine": _cpu(),
            "cores": os.cpu_count()}


def _cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    found = re.search(r"model name\s*:\s*(.*)", text)
    return found.group(1).strip() if found else "unknown"


def format_run(r: Run) -> str:
    return (f"{r.weights} {r.clients:2d} clients {r.arrivals:7s} {r.server:12s} ok {r.ok} errors {r.errors} "
            f"mismatched {r.mismatched}: {r.tokens_per_s} tokens/s, TTFT p50/p99 {r.ttft_p50_ms}/"
            f"{r.ttft_p99_ms} ms, ITL p50/p99 {r.itl_p50_ms}/{r.itl_p99_ms} ms, wall {r.wall_s} s, "
            f"diverged at {r.diverged_at}, other CPU {r.other_cpu_s} s"
            + "".join(f"\n    {p}" for p in r.problems[:3]))


def format_table(report: dict) -> str:
    """The runs as a markdown table, and ours over llama-server's where both ran."""
    lines = ["| weights | clients | arrivals | server | ok / errors / mismatched | completion tokens/s | "
             "TTFT p50 / p99 ms | ITL p50 / p99 ms | other CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['weights']} | {r['clients']} | {r['arrivals']} | {r['server']} | "
                     f"{r['ok']} / {r['errors']} / {r['mismatched']} | {r['tokens_per_s']} | "
                     f"{r['ttft_p50_ms']} / {r['ttft_p99_ms']} | {r['itl_p50_ms']} / {r['itl_p99_ms']} | "
                     f"{r['other_cpu_s']} |")
    lines.append("(other CPU s: the machine's CPU time outside this process and its servers during the run; "
                 "more than a few seconds means the run shared its cores)")
    pairs = {}
    for r in report["runs"]:
        pairs.setdefault((r["weights"], r["clients"], r["arrivals"]), {})[r["server"]] = r
    ratios = [(key, p["moe-onnx"], p["llama-server"]) for key, p in pairs.items() if len(p) == 2]
    if ratios:
        lines += ["", "ours / llama-server: tokens/s (> 1: ours more), TTFT p99 (< 1: ours sooner)"]
        lines += [f"  {w} {c:2d} clients {a:7s} tokens/s {_ratio(o, ll, 'tokens_per_s')}  "
                  f"TTFT p99 {_ratio(o, ll, 'ttft_p99_ms')}" for (w, c, a), o, ll in ratios]
    return "\n".join(lines)


def _ratio(ours: dict, theirs: dict, key: str) -> str:
    return f"{ours[key] / theirs[key]:.2f}" if ours[key] and theirs[key] else "-"


# -- the command line (python -m studies.serve_load --checkpoint ...) ------------------------------
def add_options(group) -> None:
    """The side-by-side options of ``python -m studies.serve_load``."""

    def pair(text: str) -> tuple[int, int]:
        lo, hi = (int(x) for x in text.split(","))
        return lo, hi

    group.add_argument("--checkpoint", default=None, help="a transformers checkpoint: side by side")
    group.add_argument("--make-checkpoint", action="store_true",
                       help="write the table's random Mixtral at --checkpoint first when it is not there")
    group.add_argument("--llama-cpp", default=None, help="llama.cpp tree with build/bin/llama-server")
    group.add_argument("--work", default="/tmp/serve-side-by-side", help="exports, GGUFs, server logs")
    group.add_argument("--weights", default="int4,int8")
    group.add_argument("--loads", default="1,4,16", help="concurrent clients per run")
    group.add_argument("--arrivals", default="burst,poisson")
    group.add_argument("--rate", type=float, default=2.0, help="poisson arrivals per second")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--short", type=pair, default=(8, 32), help="short prompts' tokens, LO,HI")
    group.add_argument("--long", type=pair, default=(200, 400), help="long prompts' tokens, LO,HI")
    group.add_argument("--long-share", type=float, default=0.25)
    group.add_argument("--answers", type=pair, default=(16, 128), help="max_tokens, LO,HI")
    group.add_argument("--llama-config", default="fa=on,t=2,tb=2,b=256,ub=256",
                       help="llama-server's -fa, -t, -tb, -b, -ub (--llama-tune: found by trying)")
    group.add_argument("--llama-tune", action="store_true", help="try llama-server's candidates first")


def main(args) -> None:
    """``python -m studies.serve_load --checkpoint ...``: :func:`run` and its table (and JSON)."""
    if args.make_checkpoint and not Path(args.checkpoint, "config.json").is_file():
        write_checkpoint(Path(args.checkpoint))
    given = dict(kv.split("=") for kv in args.llama_config.split(","))
    names = {"fa": "flash_attn", "t": "threads", "tb": "threads_batch", "b": "batch", "ub": "ubatch"}
    llama = LlamaConfig(**{names[k]: v if k == "fa" else int(v) for k, v in given.items()})
    plan = Plan(Path(args.checkpoint), Path(args.work), tuple(args.weights.split(",")),
                tuple(int(c) for c in args.loads.split(",")), tuple(args.arrivals.split(",")),
                args.threads or 2, args.llama_cpp, llama, args.llama_tune)
    workload = Workload(args.requests or 48, args.seed, args.short, args.long, args.long_share,
                        args.answers, args.rate)
    report = run(plan, workload)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
