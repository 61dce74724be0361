"""``moe-onnx bench``'s one library call: progress bar on stderr, the table on stdout, files on request."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from moe_onnx.benchmarks.llama_cpp import format_ratios
from moe_onnx.benchmarks.memory import rss_mb
from moe_onnx.benchmarks.options import options_from
from moe_onnx.benchmarks.report import format_table, write_csv, write_json, write_plot
from moe_onnx.benchmarks.suite import run_bench


def progress_bar(start: float, stream=sys.stderr, width: int = 30):
    """A plain-text progress bar: ``[#####.....] 12/48  37s  prefill 256 coarse-moe/dispatch@cpu``."""

    def show(done: int, total: int, what: str) -> None:
        filled = int(width * done / max(total, 1))
        bar = f"[{'#' * filled}{'.' * (width - filled)}]"
        stream.write(f"\r{bar} {done}/{total} {time.time() - start:5.0f}s  {what[:60]:60s}")
        if done >= total:
            stream.write("\n")
        stream.flush()

    return show


def run_cli(outs, *, json_path=None, csv_path=None, plot_path=None, **options) -> dict:
    """Run the suite on the command line's values (:func:`moe_onnx.benchmarks.options.bench_options`),
    print and write the report."""
    opts = options_from(outs, **options)
    if plot_path:
        _check_matplotlib()
    start = time.time()

    def log(message: str) -> None:
        stamp = f"[{time.time() - start:5.0f}s {rss_mb() / 1e3:4.1f} GB]"  # wall time, this process's RSS
        print(f"{stamp} {message}", file=sys.stderr, flush=True)

    result = run_bench(opts, progress=progress_bar(start), log=log)
    result["conditions"]["wall_seconds"] = round(time.time() - start, 1)
    print(format_table(result))
    if result.get("llama_cpp"):
        print("\n" + format_ratios(result["llama_cpp"]))
    print(f"\nbench took {result['conditions']['wall_seconds']:.0f} s")
    for path, write in ((json_path, write_json), (csv_path, write_csv), (plot_path, write_plot)):
        if path:
            write(result, Path(path))
            print(f"wrote {path}")
    return result


def _check_matplotlib() -> None:
    """Fail before minutes of measuring, not after."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from moe_onnx.errors import MoeOnnxError

        raise MoeOnnxError("--plot needs matplotlib: pip install 'moe-onnx[bench]'") from None
