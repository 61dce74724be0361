"""What ``moe-onnx bench`` runs: :class:`BenchOptions`, and the click options that fill it.

Kept free of onnxruntime and torch: the command line imports it to build its ``bench`` command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click

# The built-in models' MoE impls by default: ``gather`` copies the chosen experts' weights per
# token (about 20 s per variant and round to build a 512-token past on the coarse shape, twice
# dispatch's memory), so it runs when asked for (--impls).
DEFAULT_IMPLS = ("dispatch", "dense", "fused")


@dataclass
class BenchOptions:
    """What to run and how often; defaults are ``moe-onnx bench`` with no arguments."""

    outs: list[Path] = field(default_factory=list)  # user exports; empty = the embedded default
    providers: list[str] = field(default_factory=lambda: ["auto"])  # cpu|cuda|auto|openvino|webgpu|wasm
    impls: list[str] | None = None  # MoE impls for the default models (None = DEFAULT_IMPLS)
    weights: list[str] = field(default_factory=lambda: ["fp32"])  # weight formats of the default models
    # KV caches of the default models: concat | static, ":fp16" for a cache stored in fp16 (--kv-dtype)
    kv_caches: list[str] = field(default_factory=lambda: ["concat"])
    shapes: list[str] | None = None  # built-in shapes to run ("coarse", "fine"); None = both
    batch: int = 1
    prompt_lens: list[int] = field(default_factory=lambda: [32, 256])
    decode_contexts: list[int] = field(default_factory=lambda: [64, 512])
    rounds: int = 4  # at most; fewer (>= 2) where the time budget says so
    time_budget_s: float | None = 270.0  # wall time of the whole run, setup included; None = no limit
    prefill_reps: int = 1  # timed prefills per variant per round
    decode_steps: int = 8  # timed decode steps per variant per round
    decode_warmup: int = 4  # untimed decode steps before them: a step's caches take a few to settle
    peer_reps: int = 1  # timed prefills of peers, and decode steps of the prefix-recomputing one, per round
    threads: int = 2
    shared_threads: bool = True  # one onnxruntime thread pool for the process (moe_onnx.runtime.threads)
    peers: bool = True
    gather_limit_gb: float = 1.0  # skip a weight-gather prefill whose gathered weights exceed this
    tf32: bool = True  # CUDA runs fp32 MatMuls in TF32: onnxruntime's default (the runtime's is off)
    tiny: bool = False  # tiny shapes, for tests
    bandwidth_gib: float = 0.5  # the copy test copies it into another: 1 GiB moved, past a 480 MiB L3
    llama_cpp: Path | None = None  # a llama.cpp build (scripts/build_llama_cpp.sh): the llama.cpp peer
    max_memory_gb: float | None = None  # refuse a run estimated above this (None: the memory available)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str | None) -> list[str] | None:
    return text.split(",") if text else None


_OPTIONS = [
    click.option("--providers", default="auto", show_default=True,
                 help="Comma-separated: cpu, cuda, auto (CPU, plus CUDA where usable), openvino, webgpu "
                 "(onnxruntime's plugin EPs; the report says which nodes each took), wasm "
                 "(onnxruntime-web in Node)."),
    click.option("--impls", default=None,
                 help=f"MoE impls for the built-in models (default: {','.join(DEFAULT_IMPLS)}; "
                 "gather on request)."),
    click.option("--weights", default="fp32", show_default=True,
                 help="Comma-separated weight formats of the built-in models: fp32, int8, int4; ':BLOCK' "
                 "sets a quantized one's block size (int4:128)."),
    click.option("--kv-cache", "kv_caches", default="concat", show_default=True,
                 help="Comma-separated KV caches of the built-in models' exports: concat, static; "
                 "':fp16' stores one in fp16 (static:fp16)."),
    click.option("--shapes", default=None, help="Built-in MoE shapes to run: coarse, fine (default: both)."),
    click.option("--batch", type=int, default=1, show_default=True),
    click.option("--prompt-lens", default="32,256", show_default=True, help="Prefill prompt lengths."),
    click.option("--decode-contexts", default="64,512", show_default=True,
                 help="KV-cache lengths of decode steps."),
    click.option("--threads", type=int, default=2, show_default=True),
    click.option("--shared-threads/--per-session-threads", default=True, show_default=True,
                 help="One onnxruntime thread pool for all variants (no spinning neighbours), "
                 "or a pool each."),
    click.option("--rounds", type=int, default=4, show_default=True,
                 help="Interleaved rounds over all variants (at most; at least 2 within --time-budget)."),
    click.option("--time-budget", "time_budget_s", type=float, default=270.0, show_default=True,
                 help="Seconds for the whole run: no round starts that would end past it (0 = no limit)."),
    click.option("--prefill-reps", type=int, default=1, show_default=True,
                 help="Timed prefills per variant per round."),
    click.option("--decode-steps", type=int, default=8, show_default=True,
                 help="Timed decode steps per variant per round."),
    click.option("--decode-warmup", type=int, default=4, show_default=True,
                 help="Untimed decode steps before them, per variant per round (caches settle after "
                 "a switch)."),
    click.option("--no-peers", is_flag=True, help="Skip PyTorch eager and transformers' own ONNX export."),
    click.option("--llama-cpp", "llama_cpp", type=click.Path(file_okay=False), default=None,
                 help="llama.cpp build (the directory scripts/build_llama_cpp.sh prints): time the built-in "
                 "MoE models in GGUF (f32, q8_0, q4_0 for --weights fp32, int8, int4) with llama-bench."),
    click.option("--max-memory", "max_memory_gb", type=float, default=None,
                 help="GB the run may use: a variant set estimated above it is refused before any work "
                 "(default: the memory available now)."),
    click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None),
    click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None),
    click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
                 help="PNG (needs matplotlib)."),
    click.option("--tiny", is_flag=True, hidden=True, help="Tiny built-in shapes (tests)."),
]


def bench_options(command):
    """The ``bench`` command's options; the command receives them as keyword arguments, for
    :func:`options_from`."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def options_from(outs, *, providers: str, impls: str | None, weights: str, kv_caches: str,
                 shapes: str | None, prompt_lens: str, decode_contexts: str, time_budget_s: float,
                 no_peers: bool, llama_cpp: str | None, tiny: bool, **plain) -> BenchOptions:
    """:class:`BenchOptions` from the command line's values (:func:`bench_options`, less the output
    files); ``plain`` are fields taken as they are."""
    return BenchOptions(
        outs=[Path(o) for o in outs], providers=providers.split(","), impls=_names(impls),
        weights=weights.split(","), kv_caches=kv_caches.split(","), shapes=_names(shapes),
        prompt_lens=_ints(prompt_lens), decode_contexts=_ints(decode_contexts),
        time_budget_s=time_budget_s or None, peers=not no_peers, tiny=tiny,
        bandwidth_gib=0.25 if tiny else 0.5, llama_cpp=Path(llama_cpp) if llama_cpp else None, **plain)
