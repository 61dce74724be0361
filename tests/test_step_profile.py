"""Kernels per decode step (``inspect --step-nodes``, ``benchmarks.step_profile``): counted from
onnxruntime's profiler over the runtime's own step, for both KV caches."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from models import make_model

import moe_onnx
from moe_onnx.benchmarks import step_profile
from moe_onnx.cli import main
from moe_onnx.runtime.profile import profile_step


@pytest.mark.parametrize("kv_cache", ["concat", "static"])
def test_step_profile_counts_the_kernels_of_one_step(kv_cache, tmp_path, capsys):
    out = moe_onnx.export(make_model("mixtral"), tmp_path / "out", kv_cache=kv_cache)
    profile = profile_step(out, context=8, threads=1, steps=2)
    ops = {op: n for op, n, _ in profile.by_op()}
    # Every layer's expert MatMuls ran, and the cache update is the one the export asked for.
    assert ops["MatMul"] >= 3 * 6 * 2
    assert ops.get("TensorScatter", 0) == (6 if kv_cache == "static" else 0)
    assert all(us >= 0 for _, _, us in profile.kernels)
    step_profile.main([str(out), "--contexts", "8", "--threads", "1", "--steps", "2"])
    assert f"context 8: {profile.nodes} kernels" in capsys.readouterr().out


def test_inspect_step_nodes(tmp_path):
    out = moe_onnx.export(make_model("llama"), tmp_path / "out")
    result = CliRunner().invoke(main, ["inspect", str(out), "--step-nodes"])
    assert result.exit_code == 0, result.output
    assert "kernels after onnxruntime's optimizations" in result.output and "MatMul" in result.output


def test_decode_ab_compares_builtin_caches():
    import subprocess
    import sys

    # a child process: the pool it shares is process-wide
    code = ("from moe_onnx.benchmarks import decode_ab, models\n"
            "models.DEFAULT_SHAPES = models.TINY_SHAPES\n"
            "decode_ab.main(['--builtin', 'fine', '--contexts', '4,8', '--rounds', '1', '--steps', '1', "
            "'--threads', '1', '--weights', 'int4,int4:16'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split()[0] for line in result.stdout.splitlines() if "@" in line]
    assert sorted(set(rows)) == ["fine-int4-concat", "fine-int4-static-fp16", "fine-int4b16-concat",
                                 "fine-int4b16-static-fp16"] and len(rows) == 8


def test_batch_decode_counts_every_row(tmp_path):
    """``benchmarks.batch_decode``: left-padded prompts of different lengths, every row decoding
    all its tokens, tokens/s per batch size."""
    import numpy as np

    from moe_onnx.benchmarks import batch_decode

    prompts = batch_decode.left_padded_prompts(4, 12, 128, np.random.default_rng(0))
    assert [len(p) for p in prompts] == [12, 4, 1, 1]
    out = moe_onnx.export(make_model("mixtral", eos_token_id=None), tmp_path / "out")
    rates = batch_decode.ours(out, [1, 4], prompt=12, new=3, rounds=1, threads=1)
    assert set(rates) == {1, 4} and all(r > 0 for r in rates.values())
