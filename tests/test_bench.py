"""The bench suite end to end on tiny shapes: rows, targets and files. Never asserts on timings."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

import moe_onnx
from moe_onnx.benchmarks.conditions import resolve_providers
from moe_onnx.benchmarks.memory import copy_bandwidth, peak_rss
from moe_onnx.benchmarks.models import DENSE_FFN
from moe_onnx.benchmarks.peers import HF_ONNX, TORCH
from moe_onnx.benchmarks.timing import Stats, Unit, interleave, paired_ratio
from moe_onnx.cli import main
from moe_onnx.graphs.moe import MOE_IMPLS
from moe_onnx.runtime.providers import ProviderError, cuda_usable

TINY = ["--tiny", "--rounds", "1", "--prefill-reps", "1", "--decode-steps", "1", "--prompt-lens", "4,8",
        "--decode-contexts", "4", "--threads", "1"]


def test_stats_and_interleaving_order():
    s = Stats.of([3.0, 1.0, 2.0, 10.0])
    assert (s.p50, s.min, s.max, s.n) == (2.5, 1.0, 10.0, 4)
    calls = []
    units = [Unit(("a",), lambda: calls.append("a") or 1.0, 2), Unit(("b",), lambda: calls.append("b") or 2.0, 1)]
    samples = interleave(units, rounds=2, progress=lambda *a: None)
    # per round and unit: one untimed call, then the timed ones
    assert calls == ["a", "a", "a", "b", "b"] * 2
    assert samples == {("a",): [[1.0, 1.0]] * 2, ("b",): [[2.0]] * 2}
    # a deadline already past: only the minimum number of whole rounds
    samples = interleave(units, rounds=5, progress=lambda *a: None, deadline=0.0, min_rounds=2)
    assert [len(r) for r in samples.values()] == [2, 2]
    # one round distorted by load: the median over rounds ignores it
    value, low, high, at_min = paired_ratio([[2.0], [2.0], [9.0]], [[1.0], [1.0], [1.0]])
    assert (value, low, high, at_min) == (2.0, 2.0, 9.0, 2.0)


def test_memory_helpers():
    assert copy_bandwidth(gib=1 / 64, threads=2, repeats=1) > 0
    with peak_rss() as peak:
        block = np.ones(50_000_000 // 8)
    assert peak["peak_mb"] > 0 and block.sum() > 0


def test_providers():
    assert resolve_providers(["cpu"])[0] == [("cpu", ["CPUExecutionProvider"], "cpu")]
    with pytest.raises(ProviderError, match="cpu, cuda or auto"):
        resolve_providers(["tpu"])
    if not cuda_usable():
        chosen, notes = resolve_providers(["auto"])
        assert [c[0] for c in chosen] == ["cpu"] and "cuda skipped" in notes[0]
        with pytest.raises(ProviderError, match="not usable"):
            resolve_providers(["cuda"])


def test_bench_cli_tiny(tmp_path):
    files = ["--json", str(tmp_path / "b.json"), "--csv", str(tmp_path / "b.csv"), "--plot", str(tmp_path / "b.png")]
    result = CliRunner().invoke(main, ["bench", *TINY, *files])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "b.json").read_text())
    c = data["conditions"]
    assert c["threads"] == 1 and c["batch"] == 1 and c["copy_bandwidth_gbs"] > 0 and "machine" in c
    variants = {(r["model"], r["impl"]) for r in data["rows"]}
    for shape in ("coarse", "fine"):
        assert {(f"{shape}-moe", impl) for impl in MOE_IMPLS} <= variants
        assert {(f"{shape}-dense-active", DENSE_FFN), (f"{shape}-dense-total", DENSE_FFN)} <= variants
        assert (f"{shape}-moe", TORCH) in variants
        hf = (f"{shape}-moe", HF_ONNX) in variants
        assert hf or any(f["variant"] == f"{shape}-moe/{HF_ONNX}" for f in data["failures"])
    assert len(data["rows"]) == len(variants) * 3  # two prompt lengths + one decode context
    for r in data["rows"]:
        assert {"machine", "provider", "batch", "threads", "dtype", "length"} <= set(r)
        assert r["p50_ms"] > 0 and r["p90_ms"] >= r["p50_ms"] >= r["min_ms"]
        if r["phase"] == "decode":
            assert r["pct_of_copy_bw"] > 0 and r["active_mb"] > 0
    assert {t["shape"] for t in data["targets"]} == {"coarse", "fine"}
    assert all(isinstance(t["met"], bool) for t in data["targets"])
    with open(tmp_path / "b.csv") as f:
        assert len(list(csv.DictReader(f))) == len(data["rows"])
    assert (tmp_path / "b.png").stat().st_size > 1000
    assert "targets" in result.output and "decode, per token" in result.output


def test_bench_user_export(tmp_path):
    from models import make_model

    out = moe_onnx.export(make_model("mixtral"), tmp_path / "mixtral")
    args = ["bench", str(out), "--providers", "cpu", "--rounds", "1", "--decode-steps", "2",
            "--prompt-lens", "4", "--decode-contexts", "4,8", "--json", str(tmp_path / "u.json")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "u.json").read_text())
    assert {(r["model"], r["impl"], r["phase"], r["length"]) for r in data["rows"]} == {
        ("mixtral", "dispatch", "prefill", 4), ("mixtral", "dispatch", "decode", 4), ("mixtral", "dispatch", "decode", 8)}
    assert data["targets"] == []


def test_bench_bad_arguments(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--tiny", "--providers", "tpu"])
    assert result.exit_code == 2 and "cpu, cuda or auto" in result.output
    result = CliRunner().invoke(main, ["bench", "--tiny", "--impls", "nope", "--no-peers"])
    assert result.exit_code == 2 and "unknown MoE impl" in result.output
    if not cuda_usable():
        result = CliRunner().invoke(main, ["bench", "--tiny", "--providers", "cuda"])
        assert result.exit_code == 2 and "CUDA execution provider is not usable" in result.output
