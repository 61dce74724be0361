"""The bench suite end to end on tiny shapes: rows, checks and files (never asserts on timings)."""

import csv
import json

from click.testing import CliRunner

import moe_onnx
from moe_onnx.benchmarks.measure import Stats
from moe_onnx.cli import main
from moe_onnx.graphs.moe import MOE_IMPLS


def test_stats():
    s = Stats.of([3.0, 1.0, 2.0, 10.0])
    assert (s.p50, s.min, s.n) == (2.5, 1.0, 4) and s.p90 == 10.0


def test_bench_cli_tiny(tmp_path):
    args = ["bench", "--tiny", "--rounds", "1", "--decode-steps", "2", "--prompt-lens", "4,8",
            "--decode-contexts", "4", "--no-peers", "--json", str(tmp_path / "b.json"),
            "--csv", str(tmp_path / "b.csv"), "--plot", str(tmp_path / "b.png")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["conditions"]["threads"] == 2 and data["conditions"]["copy_bandwidth_gbs"] > 0
    variants = {(r["model"], r["impl"]) for r in data["rows"]}
    for shape in ("coarse", "fine"):
        assert {(f"{shape}-moe", impl) for impl in MOE_IMPLS} <= variants
        assert (f"{shape}-dense-active", "dense-ffn") in variants and (f"{shape}-dense-total", "dense-ffn") in variants
    assert len(data["rows"]) == len(variants) * 3  # two prompt lengths + one decode context
    decode = [r for r in data["rows"] if r["phase"] == "decode"]
    assert all(r["pct_of_bandwidth"] > 0 and r["active_mb"] > 0 for r in decode)
    assert {c["shape"] for c in data["checks"]} == {"coarse", "fine"}
    with open(tmp_path / "b.csv") as f:
        assert len(list(csv.DictReader(f))) == len(data["rows"])
    assert (tmp_path / "b.png").stat().st_size > 1000
    assert "targets" in result.output and "prefill" in result.output


def test_bench_user_exports_and_bad_provider(tmp_path):
    from models import make_model

    out = moe_onnx.export(make_model("mixtral"), tmp_path / "mixtral")
    result = CliRunner().invoke(main, ["bench", str(out), "--rounds", "1", "--decode-steps", "2",
                                       "--prompt-lens", "4", "--decode-contexts", "4"])
    assert result.exit_code == 0, result.output
    assert "mixtral" in result.output and "dispatch" in result.output
    result = CliRunner().invoke(main, ["bench", str(out), "--providers", "tpu"])
    assert result.exit_code != 0 and "cpu and/or cuda" in result.output
