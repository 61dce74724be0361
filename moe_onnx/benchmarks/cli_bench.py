"""The ``bench`` command's glue: a progress bar on stderr, the table on stdout, files on request."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from moe_onnx.benchmarks.report import format_table, write_csv, write_json, write_plot
from moe_onnx.benchmarks.suite import BenchOptions, run_bench
from moe_onnx.errors import MoeOnnxError


def progress_bar(start: float):
    def show(done: int, total: int, what: str) -> None:
        width = 30
        filled = int(width * done / total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {time.time() - start:5.0f}s {what[:48]:48s}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def run_cli(*, json_path, csv_path, plot_path, **options) -> None:
    """Run the suite with ``options`` (see :class:`BenchOptions`) and report."""
    if options["providers"] and any(p not in ("cpu", "cuda") for p in options["providers"]):
        raise MoeOnnxError(f"--providers takes cpu and/or cuda, got {','.join(options['providers'])}")
    opts = BenchOptions(**{**options, "outs": [Path(o) for o in options["outs"]]})
    start = time.time()
    result = run_bench(opts, progress=progress_bar(start), log=lambda m: print(m, file=sys.stderr))
    result["conditions"]["wall_seconds"] = round(time.time() - start, 1)
    print(format_table(result))
    print(f"\n(bench took {result['conditions']['wall_seconds']:.0f} s)")
    if json_path:
        write_json(result, Path(json_path))
    if csv_path:
        write_csv(result, Path(csv_path))
    if plot_path:
        write_plot(result, Path(plot_path))
