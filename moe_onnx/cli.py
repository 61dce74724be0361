"""The ``moe-onnx`` command line: each command parses its options, then calls one library function."""

from __future__ import annotations

import functools
import logging
import sys

import click

from moe_onnx.benchmarks.options import bench_options
from moe_onnx.dtypes import COMPUTE_DTYPES, QUANTIZED_DTYPES
from moe_onnx.errors import MoeOnnxError
from moe_onnx.runtime.providers import PROVIDERS
from moe_onnx.server.config import BATCHING


def friendly_errors(fn):
    """Expected errors become one line on stderr and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MoeOnnxError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log progress.")
def main(verbose: bool) -> None:
    """Export, inspect, run and benchmark MoE and dense transformer models on ONNX Runtime."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


@main.command()
@click.argument("src", type=click.Path(path_type=str))
@click.option("-o", "--out", required=True, type=click.Path(path_type=str), help="Output directory.")
@click.option("--dtype", type=click.Choice(list(COMPUTE_DTYPES)), default="fp32", show_default=True,
              help="Compute dtype: activations, KV cache, and the weights unless --weights says otherwise.")
@click.option("--weights", type=click.Choice(list(QUANTIZED_DTYPES)), default=None,
              help="Store weights block-quantized (symmetric, one scale per block); ONNX Runtime fuses "
              "DequantizeLinear + MatMul into MatMulNBits. Router, norms and biases stay in --dtype.")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default="32",
              show_default=True, help="Values per quantization scale (--weights).")
@click.option("--quant-method", type=click.Choice(["rtn", "search"]), default="rtn", show_default=True,
              help="Scales: round-to-nearest of the block maximum, or the best of a few clipped scales.")
@click.option(
    "--moe-impl",
    type=click.Choice(["auto", "dispatch", "gather", "dense", "fused"]),
    default="auto",
    show_default=True,
    help="Expert dispatch: auto/dispatch (sparse token dispatch, plain ONNX), gather (weight gather), "
    "dense (every expert, the baseline), fused (onnxruntime's com.microsoft.MoE op; QMoE with --weights).",
)
@click.option("--kv-cache", type=click.Choice(["concat", "static"]), default="concat", show_default=True,
              help="concat: past/present grow each step (onnxruntime-genai's contract); static: one "
              "preallocated buffer per layer updated in place (opset 24 TensorScatter), so a decode step "
              "copies no cache whatever the context.")
@click.option("--kv-dtype", type=click.Choice(["fp16"]), default=None,
              help="Store the KV cache in fp16 under --dtype fp32 (half the bytes a decode step reads from "
              "it, half its memory; llama.cpp's default). Default: the compute dtype.")
@click.option("--verify", is_flag=True, help="Compare logits with the PyTorch model; fail beyond tolerance.")
@click.option("--verify-text", type=click.Path(dir_okay=False), default=None,
              help="With --verify (implied): also print PyTorch vs ONNX perplexity on this text file.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr (shown only on a terminal anyway).")
@friendly_errors
def export(src, out, dtype, weights, block_size, quant_method, moe_impl, kv_cache, kv_dtype, verify,
           verify_text, force, quiet):
    """Export a Hugging Face checkpoint directory SRC to an ONNX decoder in OUT."""
    from moe_onnx.exporter import export as run_export

    path = run_export(src, out, dtype=dtype, weights=weights, block_size=int(block_size),
                      quant_method=quant_method, moe_impl=moe_impl, kv_cache=kv_cache, kv_dtype=kv_dtype,
                      verify=verify, verify_text=verify_text, force=force,
                      progress=False if quiet else None)
    click.echo(f"wrote {path}")


def _text_files(given: tuple[str, ...], more: tuple[str, ...]) -> list[str]:
    """``--text-files`` values plus the files after them: each an existing file, or a glob (quoted
    so the shell leaves it) expanded here in sorted order; a glob matching no file is an error."""
    import glob
    from pathlib import Path

    if more and not given:
        raise click.UsageError(f"unexpected argument {more[0]!r}: text files go after --text-files")
    files: list[str] = []
    for item in (*given, *more):
        if Path(item).is_file():
            files.append(item)
        elif any(c in item for c in "*?["):
            matches = sorted(f for f in glob.glob(item, recursive=True) if Path(f).is_file())
            if not matches:
                raise click.BadParameter(f"the glob {item!r} matches no file", param_hint="'--text-files'")
            files += matches
        else:
            what = "is not a file" if Path(item).exists() else "does not exist"
            raise click.BadParameter(f"{item!r} {what}", param_hint="'--text-files'")
    return files


PROVIDER_HELP = ("Where onnxruntime runs the graph: auto (CUDA when usable, else CPU), cpu, cuda, or the "
                 "plugin EPs openvino and webgpu (extras [openvino], [webgpu]).")
TEXT_FILES_HELP = ("one or more files or quoted globs ('lib/*.py', '**' recurses), after one flag or "
                   "repeated: --text-files a.py b.py")


@main.command()
@click.argument("out", type=click.Path(path_type=str))
@click.argument("more_text_files", nargs=-1, type=click.Path(path_type=str), metavar="[TEXT_FILE]...")
@click.option("--routing", is_flag=True, help="Also route --text-files through the graph: tokens per expert.")
@click.option("--text-files", multiple=True, type=click.Path(path_type=str),
              help=f"Text for --routing: {TEXT_FILES_HELP}.")
@click.option("--step-nodes", is_flag=True,
              help="Also load the export on CPU and count the kernels one decode step runs after "
              "onnxruntime's graph optimizations, by op type.")
@click.option("--provider", type=click.Choice([p for p in PROVIDERS if p != "auto"]), default=None,
              help="Also load the export on this provider and say which nodes it took and which fell "
              "back to the CPU provider, by op type.")
@friendly_errors
def inspect(out, more_text_files, routing, text_files, step_nodes, provider):
    """Describe an export: architecture, experts, parameters, graph inputs and outputs, files."""
    from moe_onnx.exporter.describe import describe

    files = _text_files(text_files, more_text_files)
    if routing and not files:
        raise click.UsageError("--routing needs --text-files")
    click.echo(describe(out))
    if step_nodes:
        from moe_onnx.runtime.profile import profile_step

        profile = profile_step(out, context=16)
        ops = ", ".join(f"{op} {n}" for op, n, _ in sorted(profile.by_op(), key=lambda r: -r[1]))
        click.echo(f"decode step  {profile.nodes} kernels after onnxruntime's optimizations (CPU): {ops}")
    if provider:
        from moe_onnx.runtime import load
        from moe_onnx.runtime.providers import describe_assignment

        session = load(out, provider=provider, ort_cache="off")
        click.echo(f"placement    on {provider}: {describe_assignment(session.assignment)}")
    if routing:
        _echo_quality(out, files, window=None, max_windows=None, routing=True)


@main.command(name="eval")
@click.argument("out", type=click.Path(path_type=str))
@click.argument("more_text_files", nargs=-1, type=click.Path(path_type=str), metavar="[TEXT_FILE]...")
@click.option("--text-files", multiple=True, required=True, type=click.Path(path_type=str),
              help=f"Text to score: {TEXT_FILES_HELP}.")
@click.option("--window", type=int, default=None, help="Tokens per window (default min(256, max positions)).")
@click.option("--max-windows", type=int, default=None, help="Score at most this many windows.")
@click.option("--routing", is_flag=True, help="Also report tokens per expert per layer (load balance).")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads.")
@click.option("--provider", type=click.Choice(list(PROVIDERS)), default="cpu", show_default=True,
              help=PROVIDER_HELP)
@friendly_errors
def eval_(out, more_text_files, text_files, window, max_windows, routing, threads, provider):
    """Perplexity of an export on text files, computed through the ONNX graph itself."""
    files = _text_files(text_files, more_text_files)
    _echo_quality(out, files, window=window, max_windows=max_windows, routing=routing, threads=threads,
                  provider=provider)


@main.command()
@click.argument("out", type=click.Path(path_type=str))
@click.option("--prompt", default=None, help="Text prompt (needs the export's tokenizer.json).")
@click.option("--ids", default=None, help="Comma-separated prompt token ids instead of text, e.g. 1,2,3.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0)
@click.option("--top-p", type=float, default=1.0)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--provider", type=click.Choice(list(PROVIDERS)), default="auto", show_default=True,
              help=PROVIDER_HELP)
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the generated ids (and text) as JSON.")
@click.option("--ort-cache", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Load the export's prepared onnxruntime copy (weights mapped, not copied; see `prepare`).")
@friendly_errors
def run(out, prompt, ids, max_new_tokens, temperature, top_k, top_p, seed, stop, provider, threads, as_json,
        ort_cache):
    """Generate from an export: streams text, then reports prefill and decode speed on stderr."""
    from moe_onnx.runtime.cli_run import run_generation

    run_generation(out, prompt=prompt, ids=ids, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, seed=seed, stop=stop, provider=provider, threads=threads,
                   as_json=as_json, load_options={"ort_cache": ort_cache})


@main.command()
@click.argument("out", type=click.Path(path_type=str))
@friendly_errors
def prepare(out):
    """Build (or check) the export's prepared onnxruntime copy for this CPU and onnxruntime version.

    Later CPU loads map its weights from the file instead of copying them: less memory, a faster
    load. `run`/`serve` build it on first use for exports of 256 MiB or more; this builds it now.
    """
    from moe_onnx.runtime.ort_cache import prepare_export

    click.echo(prepare_export(out))


@main.command()
@click.argument("outs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (loopback unless told).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--provider", type=click.Choice(list(PROVIDERS)), default="auto", show_default=True,
              help=PROVIDER_HELP)
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (per replica).")
@click.option("--max-batch", type=int, default=8, show_default=True, help="Requests decoded together.")
@click.option("--max-queue", type=int, default=64, show_default=True,
              help="Requests that may wait beyond a full batch; one more is answered 429 at once.")
@click.option("--batching", type=click.Choice(BATCHING), default="continuous", show_default=True,
              help="continuous: requests join and leave the running batch between decode steps; whole: "
                   "a request waits for the running batch to end. Static-cache exports batch whole.")
@click.option("--prefill-chunk", type=int, default=256, show_default=True,
              help="With continuous batching: prompt tokens prefilled between two decode steps.")
@click.option("--prefix-cache-mb", type=float, default=256, show_default=True,
              help="With continuous batching: MiB of prompts' KV caches kept (least recently used "
                   "evicted) so that a prompt sharing a prefix prefills only the rest; 0 turns it off.")
@click.option("--api-key", envvar="MOE_ONNX_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health (or $MOE_ONNX_API_KEY).")
@click.option("--ray", is_flag=True,
              help="Serve through Ray Serve's HTTP proxy (pip install 'moe-onnx[ray]').")
@click.option("--replicas", type=int, default=1, show_default=True,
              help="With --ray: replicas, each its own session.")
@friendly_errors
def serve(outs, host, port, provider, threads, max_batch, max_queue, batching, prefill_chunk,
          prefix_cache_mb, api_key, ray, replicas):
    """Serve exports OUT... over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."""
    import os

    from moe_onnx.server.config import ServeConfig
    from moe_onnx.server.run import serve as serve_config

    if api_key is None and os.environ.get("MOE_ONNX_API_KEY") == "":
        api_key = ""  # click reads a variable set but empty as unset: refuse it as an empty --api-key
    config = ServeConfig(tuple(outs), host=host, port=port, provider=provider, threads=threads,
                         max_batch=max_batch, max_queue=max_queue, api_key=api_key, batching=batching,
                         prefill_chunk=prefill_chunk, prefix_cache_mb=prefix_cache_mb)
    serve_config(config, ray=ray, replicas=replicas)


@main.command()
@click.option("--models", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder with moe/, dense-active/, dense-total/ (default: the shipped reference_models).")
@click.option("--work", type=click.Path(file_okay=False), default="out/demo", show_default=True,
              help="Where the exports go (reused when the source is unchanged).")
@click.option("--threads", type=int, default=2, show_default=True)
@friendly_errors
def demo(models, work, threads):
    """The main job: export the shipped reference MoE and its dense twins, generate, compare."""
    from moe_onnx.reference.demo import run_demo

    run_demo(models, work, threads)


@main.command()
@click.argument("outs", nargs=-1, type=click.Path(exists=True, file_okay=False))
@bench_options
@friendly_errors
def bench(outs, **options):
    """Prefill and decode latency of sparse vs dense: OUT exports, or built-in MoE shapes and dense twins."""
    from moe_onnx.benchmarks.cli_bench import run_cli

    run_cli(outs, **options)


def _echo_quality(out, text_files, **kwargs) -> None:
    from moe_onnx.evaluation import evaluate, format_report

    click.echo(format_report(evaluate(out, list(text_files), **kwargs)))


@main.command()
@click.argument("out", type=click.Path(path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@friendly_errors
def web(out, host, port):
    """Serve a page that runs the export in the browser: onnxruntime-web (wasm with threads, or
    WebGPU when the browser has an adapter) and the export's own tokenizer.json."""
    from moe_onnx.web import make_server

    server = make_server(out, host, port)
    click.echo(f"moe-onnx web: http://{host}:{server.server_address[1]}/ serves {out} (Ctrl-C stops)")
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
