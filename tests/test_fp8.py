"""FP8 checkpoints (DeepSeek-V3 / GLM-4.5-FP8 layout): float8_e4m3fn linear weights with a
float32 ``weight_scale_inv`` per block, dequantized while reading. Written here in exactly that
layout from a tiny glm4_moe (blocks of 24 x 24, so edge blocks are partial), compared with
transformers' model holding the same dequantized weights."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from models import make_model
from safetensors.torch import load_file, save_file

import moe_onnx
from moe_onnx import manifest
from moe_onnx.cli import main
from moe_onnx.errors import CheckpointError
from moe_onnx.exporter import fp8
from moe_onnx.exporter.checkpoint import open_checkpoint
from moe_onnx.exporter.config import Config
from moe_onnx.exporter.verify import compare

BLOCK = 24


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise FP8 as the hub's checkpoints hold it: scale = block max / 448, stored inverted."""
    rows, cols = w.shape
    R, C = -(-rows // BLOCK), -(-cols // BLOCK)
    padded = torch.zeros(R * BLOCK, C * BLOCK)
    padded[:rows, :cols] = w
    blocks = padded.reshape(R, BLOCK, C, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).reshape(R * BLOCK, C * BLOCK)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale.float()


def _fp8_copy(case: str, root, extra: dict | None = None):
    """(src dir, the same model with its FP8 round-tripped weights in float32): ``case`` saved with
    every layer's linear weights in FP8 and ``extra`` tensors beside them (not in the reference)."""
    src = root / "src"
    make_model(case).save_pretrained(src)
    state, reference = {}, {}
    for name, tensor in load_file(str(src / "model.safetensors")).items():
        linear = name.endswith(".weight") and tensor.ndim == 2 and ".layers." in name
        if linear and "norm" not in name and not name.endswith("mlp.gate.weight"):  # routers stay float
            q, scale = _quantize(tensor.float())
            state[name], state[name + "_scale_inv"] = q, scale
            values = q.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
            reference[name] = torch.from_numpy(fp8.dequantize(values, scale.numpy(), (BLOCK, BLOCK)))
        else:
            state[name] = reference[name] = tensor
    save_file({**state, **(extra or {})}, str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK],
                                  "activation_scheme": "dynamic"}
    (src / "config.json").write_text(json.dumps(cfg))
    ref_dir = root / "reference"  # the dequantized weights under the stored names, loaded as usual
    make_model(case).config.save_pretrained(ref_dir)
    save_file({k: v.contiguous() for k, v in reference.items()}, str(ref_dir / "model.safetensors"))
    import transformers

    dequantized = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32,
                                                                    attn_implementation="eager")
    return src, dequantized.eval()


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    return _fp8_copy("glm4_moe", tmp_path_factory.mktemp("fp8"))


def test_fp8_checkpoint_matches_transformers_on_the_dequantized_weights(fp8_checkpoint, tmp_path):
    src, reference = fp8_checkpoint
    assert sum(n.endswith("_scale_inv") for n in open_checkpoint(src).names()) > 20  # stored as FP8 pairs
    out = moe_onnx.export(src, tmp_path / "out", verify=True)  # verify builds the same reference
    report = compare(reference, out, manifest.read(out).spec)
    assert report.max_rel <= 1e-4 and report.argmax_agree == 1.0, report
    quantized = moe_onnx.export(src, tmp_path / "int4", weights="int4")  # straight into int4
    assert manifest.read(quantized).weights == "int4"


def test_deepseek_v3_fp8_checkpoint_with_its_multi_token_prediction_layer(tmp_path):
    """DeepSeek-V3's layout: MLA's projections (q_a, q_b, kv_a, kv_b, o) and every expert in FP8,
    and a multi-token-prediction layer stored after the last decoder layer (layer 3 of 3 here, FP8
    too): the decoder is exported from the rest and matches transformers on the dequantized weights."""
    mtp = "model.layers.3."
    q, scale = _quantize(torch.randn(64, 128))
    extra = {mtp + "eh_proj.weight": q, mtp + "eh_proj.weight_scale_inv": scale,
             mtp + "enorm.weight": torch.ones(64), mtp + "shared_head.head.weight": torch.randn(128, 64)}
    src, reference = _fp8_copy("deepseek_v3", tmp_path, extra)
    stored = open_checkpoint(src).names()
    assert {"model.layers.1.self_attn.kv_b_proj.weight_scale_inv", mtp + "eh_proj.weight"} <= stored
    out = moe_onnx.export(src, tmp_path / "out", verify=True)
    report = compare(reference, out, manifest.read(out).spec)
    assert report.max_rel <= 1e-4 and report.argmax_agree == 1.0, report


def test_dequantize_uses_each_block_scale():
    w = np.arange(1, 7, dtype=np.float32).reshape(2, 3)  # 2x3 in 2x2 blocks: a partial edge block
    scales = np.array([[10.0, 100.0]], np.float32)
    expected = np.array([[10, 20, 300], [40, 50, 600]], np.float32)
    np.testing.assert_array_equal(fp8.dequantize(w, scales, (2, 2)), expected)
    e8m0 = np.array([[128, 130]], np.uint8)  # 2^1, 2^3
    np.testing.assert_array_equal(fp8.dequantize(w, e8m0, (2, 2)), w * np.array([[2, 2, 8], [2, 2, 8]]))


@pytest.mark.parametrize("corrupt, message", [
    ("grid", "FP8 tensor 'model.layers.1.self_attn.k_proj.weight' has shape [32, 64] but its scales "
             "'model.layers.1.self_attn.k_proj.weight_scale_inv' have shape [1, 1]; 24x24 blocks need "
             "[2, 3]"),
    ("missing", "FP8 tensor 'model.layers.1.self_attn.k_proj.weight' has no scales"),
])
def test_inconsistent_fp8_tensors_are_named(fp8_checkpoint, corrupt, message, tmp_path):
    src = shutil.copytree(fp8_checkpoint[0], tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.weight_scale_inv"
    if corrupt == "grid":
        state[name] = torch.ones(1, 1)
    else:
        del state[name]
    save_file(state, str(src / "model.safetensors"))
    result = CliRunner().invoke(main, ["export", str(src), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "\n" not in result.output.strip(), result.output
    assert not (tmp_path / "out").exists()


def test_config_block_size_is_checked():
    cfg = Config({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}, "config.json")
    with pytest.raises(CheckpointError, match="weight_block_size must be two positive integers"):
        fp8.dequantizing(cfg, None)
