"""Kernels per decode step (``inspect --step-nodes``, ``studies.step_profile``): counted from
onnxruntime's profiler over the runtime's own step, for both KV caches."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner
from models import make_model

import moe_onnx
from moe_onnx.cli import main
from moe_onnx.runtime.profile import profile_step


def _counts(profile) -> dict[str, int]:
    return {op: n for op, n, _ in profile.by_op()}


@pytest.mark.parametrize("kv_cache", ["concat", "static"])
def test_step_profile_counts_the_kernels_of_one_step(kv_cache, tmp_path):
    out = moe_onnx.export(make_model("mixtral"), tmp_path / "out", kv_cache=kv_cache)
    layers = moe_onnx.manifest.read(out).spec.num_layers
    profile = profile_step(out, context=8, threads=1, steps=2)
    ops = _counts(profile)
    # One step's kernels, not every step's: a third step adds none.
    assert _counts(profile_step(out, context=8, threads=1, steps=3)) == ops
    assert sum(ops.values()) == profile.nodes == len(profile.kernels)
    # Every layer's expert MatMuls ran (dispatch: gate_up and down per expert), and the cache
    # update is the one the export asked for: one TensorScatter per past (key and value) per layer.
    experts = moe_onnx.manifest.read(out).spec.moe.num_experts
    assert ops["MatMul"] >= 2 * experts * layers
    assert ops.get("TensorScatter", 0) == (2 * layers if kv_cache == "static" else 0)
    assert len({name for _, name, _ in profile.kernels}) == profile.nodes  # each node once


def test_inspect_step_nodes_prints_the_profile(tmp_path):
    out = moe_onnx.export(make_model("llama"), tmp_path / "out")
    result = CliRunner().invoke(main, ["inspect", str(out), "--step-nodes"])
    assert result.exit_code == 0, result.output
    profile = profile_step(out, context=16)
    line = next(ln for ln in result.output.splitlines() if ln.startswith("decode step"))
    assert f"{profile.nodes} kernels after onnxruntime's optimizations" in line, line
    printed = {op: int(n) for op, n in re.findall(r"(\w+) (\d+)(?:,|$)", line.split(": ", 1)[1])}
    assert printed == _counts(profile), line
