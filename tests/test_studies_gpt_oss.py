"""``studies.gpt_oss_scale`` on a tiny gpt-oss checkpoint: the hub's MXFP4 layout written shard by
shard, exported, prepared and measured in child processes, with every figure printed (numbers
where numbers belong; timings never asserted); llama.cpp too where a build is found."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
from test_studies import NUMBER, REPO, _llama_cpp_build

from moe_onnx.exporter.checkpoint import SafetensorsCheckpoint
from moe_onnx.exporter.mxfp4 import Mxfp4Checkpoint
from studies import edge_memory, gpt_oss_scale


def test_checkpoint_has_the_hub_mxfp4_layout(tmp_path):
    size = gpt_oss_scale.write_checkpoint(tmp_path, tiny=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "mxfp4"}
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    listed = list(gpt_oss_scale.tensors(config))
    assert set(index["weight_map"]) == {name for name, _, _ in listed}
    assert index["metadata"]["total_size"] == size == sum(
        {"BF16": 2, "U8": 1}[dtype] * int(np.prod(shape)) for _, dtype, shape in listed)
    shards = sorted(tmp_path.glob("*.safetensors"))
    ckpt = Mxfp4Checkpoint(SafetensorsCheckpoint(shards))
    name = "model.layers.1.mlp.experts.gate_up_proj"  # [E, H, 2F] once dequantized
    assert ckpt.shape(name) == (8, 64, 128)
    expert = ckpt.load_index(name, 3)
    assert np.isfinite(expert).all() and 0 < np.abs(expert).max() <= 6 * 2.0 ** -6


def test_gpt_oss_scale_prints_every_figure(tmp_path):
    """Uncapped, and under a 1 GiB cap (a cgroup) where this machine lets the tests make one."""
    capped = os.access(edge_memory.CGROUP_ROOT, os.W_OK)
    args = ["--tiny", "--work", str(tmp_path), "--cap-gib", "1" if capped else "0", "--prompt", "4",
            "--steps", "2", "--threads", "1"]
    llama = _llama_cpp_build()
    if llama:
        args += ["--llama-cpp", llama]
    result = subprocess.run([sys.executable, "-m", "studies.gpt_oss_scale", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(rf"checkpoint: {NUMBER} GB \(MXFP4 experts, bf16 rest\), 2 layers of 8 experts",
                     out), out
    assert re.search(rf"export --weights int4: {NUMBER} s, peak RSS {NUMBER} MB, files {NUMBER} GB", out), out
    assert re.search(rf"prepare: {NUMBER} s, peak RSS {NUMBER} MB \(process tree\)", out), out
    rows = [line for line in out.splitlines() if line.startswith("| moe-onnx")]
    assert len(rows) == (4 if capped else 2), out  # skewed, uniform per cap
    assert not capped or "| 1.00 GiB (" in out, out
    for row in rows:  # load s, anon / file GiB, peak GiB, prefill ms, decode ms, MB read, in memory, wall s
        assert re.search(rf"\| {NUMBER} \| {NUMBER} / {NUMBER} \| {NUMBER} \| {NUMBER} \| {NUMBER} \| "
                         rf"{NUMBER} \| {NUMBER}% \| {NUMBER} \|$", row), row
    if llama:
        assert re.search(rf"convert_hf_to_gguf.py --outtype q8_0: {NUMBER} s, peak RSS {NUMBER} MB", out), out
        assert re.search(rf"^\| llama.cpp .* \| {NUMBER} \| {NUMBER} \| \| \| {NUMBER} \|$", out, re.M), out
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left without --keep
