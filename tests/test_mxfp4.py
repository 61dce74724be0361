"""MXFP4 checkpoints, as gpt-oss ships them: experts as ``*_blocks`` + ``*_scales``, read dequantized.

The tiny checkpoint is written here in exactly the hub's layout (transformers' ``integrations/mxfp4.py``
reads it back); the reference is transformers' model holding the weights transformers' own
``convert_moe_packed_tensors`` dequantizes from it.
"""

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from models import make_model
from safetensors.numpy import save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import moe_onnx
from moe_onnx import manifest
from moe_onnx.cli import main
from moe_onnx.exporter import families
from moe_onnx.exporter.checkpoint import SafetensorsCheckpoint
from moe_onnx.exporter.mxfp4 import FP4_VALUES, Mxfp4Checkpoint, dequantize
from moe_onnx.exporter.verify import compare, fake_quantized
from moe_onnx.quantize import QuantConfig

EXPERTS = ("experts.gate_up_proj", "experts.down_proj")  # [E, in, out] in memory


def quantize_mxfp4(w_EIO: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[E, in, out]`` -> blocks uint8 ``[E, out, in/32, 16]`` and scales uint8 ``[E, out, in/32]``:
    per block of 32 inputs the smallest power of two that brings its max under 6, values rounded to
    the nearest FP4 (E2M1) value, two per byte, the even index in the low nibble."""
    w = np.swapaxes(w_EIO, 1, 2)
    groups = w.reshape(*w.shape[:2], -1, 32)
    exponent = np.ceil(np.log2(np.maximum(np.abs(groups).max(-1), 1e-30) / 6.0)).astype(np.int32)
    nearest = np.abs(groups / np.ldexp(1.0, exponent)[..., None] - FP4_VALUES[:, None, None, None, None])
    codes = nearest.argmin(0).astype(np.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent + 127).astype(np.uint8)


def write_mxfp4(model, path, edit=None):
    """``model`` saved as gpt-oss's hub checkpoint (MXFP4 experts, ``quantization_config``); returns
    the in-memory tensors transformers dequantizes from it. ``edit(tensors)`` may corrupt it first."""
    path.mkdir(parents=True)
    tensors, dequantized = {}, {}
    for name, t in model.state_dict().items():
        if name.endswith(EXPERTS):
            blocks, scales = quantize_mxfp4(t.numpy())
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
            dequantized[name] = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                           dtype=torch.float32)
        else:
            tensors[name] = t.numpy()
    if edit:
        edit(tensors)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path / "model.safetensors"))
    config = {**model.config.to_dict(), "quantization_config": {"quant_method": "mxfp4"}}
    (path / "config.json").write_text(json.dumps(config))
    return dequantized


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    """(the MXFP4 source directory, the reference model with transformers' dequantized experts)."""
    src = tmp_path_factory.mktemp("mxfp4") / "src"
    reference = make_model("gpt_oss", seed=3)
    original = {k: v.clone() for k, v in reference.state_dict().items()}
    dequantized = write_mxfp4(reference, src)
    reference.load_state_dict(dequantized, strict=False)
    for name, t in dequantized.items():  # MXFP4 is lossy: the test would not notice a float read
        assert 0.01 < (t - original[name]).abs().max() < 0.5 * original[name].abs().max()
    return src, reference


def test_dequantization_is_transformers_bit_for_bit():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 5, 4, 16), dtype=np.uint8)  # every nibble, both halves
    scales = rng.integers(127 - 20, 127 + 8, (3, 5, 4), dtype=np.uint8)
    want = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    np.testing.assert_array_equal(np.swapaxes(dequantize(blocks, scales), -1, -2), want.numpy())


@pytest.mark.parametrize("impl", ["dispatch", "gather", "fused"])
def test_mxfp4_checkpoint_matches_transformers_dequantized(mxfp4, impl, tmp_path, monkeypatch):
    src, reference = mxfp4
    read = Mxfp4Checkpoint.load

    def one_expert_at_a_time(self, name):  # streaming: never a whole layer of float experts
        assert not name.endswith(EXPERTS), f"{name} read whole"
        return read(self, name)

    monkeypatch.setattr(Mxfp4Checkpoint, "load", one_expert_at_a_time)
    out = moe_onnx.export(src, tmp_path / "out", moe_impl=impl)
    report = compare(reference, out, manifest.read(out).spec, lengths=(9, 5), decode_steps=3)
    assert report.max_rel <= 1e-4 and report.argmax_agree == 1.0, report


def test_mxfp4_straight_into_int4(mxfp4, tmp_path):
    src, reference = mxfp4
    out = moe_onnx.export(src, tmp_path / "out", weights="int4")
    expected = fake_quantized(copy.deepcopy(reference), QuantConfig(4, 32), families.get("gpt_oss").names)
    report = compare(expected, out, manifest.read(out).spec, lengths=(7, 3), decode_steps=2, exact=True)
    assert report.max_rel < 1e-4 and report.argmax_agree == 1.0, report


@pytest.mark.parametrize("weights", [[], ["--weights", "int8"]])
def test_verify_runs_an_mxfp4_source(mxfp4, weights, tmp_path):
    """--verify builds the reference without transformers' MXFP4 loader (which needs accelerate)."""
    src, _ = mxfp4
    result = CliRunner().invoke(main, ["export", str(src), "-o", str(tmp_path / "out"), "--verify", *weights])
    assert result.exit_code == 0, result.output
    assert "argmax agree 100.0%" in result.output, result.output


def _drop(name):
    return lambda tensors: tensors.pop(name)


def _regroup(name, groups):  # a pair consistent with itself whose block count disagrees with config.json
    def edit(tensors):
        tensors[name + "_blocks"] = tensors[name + "_blocks"][:, :, :groups]
        tensors[name + "_scales"] = tensors[name + "_scales"][:, :, :groups]
    return edit


def _reshape_scales(name):
    return lambda tensors: tensors.update({name: tensors[name][:, :, :1]})


L0 = "model.layers.0.mlp.experts."


@pytest.mark.parametrize("edit, words", [
    (_drop(L0 + "gate_up_proj_scales"), [f"MXFP4 tensor '{L0}gate_up_proj_blocks' has no scales",
                                         f"'{L0}gate_up_proj_scales' is missing"]),
    (_drop(L0 + "down_proj_blocks"), [f"MXFP4 scales '{L0}down_proj_scales' have no blocks"]),
    (_reshape_scales(L0 + "gate_up_proj_scales"), [f"'{L0}gate_up_proj_blocks' has shape [6, 64, 2, 16]",
                                                   f"scales '{L0}gate_up_proj_scales' [6, 64, 1]"]),
    (_regroup(L0 + "gate_up_proj", 1), [f"'{L0}gate_up_proj_blocks' [6, 64, 1, 16]",
                                        "has shape [6, 32, 64] but config.json implies [6, 64, 64]"]),
])
def test_inconsistent_mxfp4_tensors_are_named(edit, words, tmp_path):
    write_mxfp4(make_model("gpt_oss"), tmp_path / "src", edit)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", str(tmp_path / "src"), "-o", str(out)])
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("error:") and "\n" not in message, message
    for word in words:
        assert word in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no partial OUT


def test_blocks_of_another_dtype_are_named_and_leave_nothing(tmp_path):
    name = L0 + "down_proj_blocks"
    write_mxfp4(make_model("gpt_oss"), tmp_path / "src", lambda t: t.update({name: t[name].view(np.int8)}))
    result = CliRunner().invoke(main, ["export", str(tmp_path / "src"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: MXFP4 tensor '{name}' is int8, not uint8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_checkpoint_shows_the_pairs_as_float_tensors(mxfp4):
    src, reference = mxfp4
    ckpt = Mxfp4Checkpoint(SafetensorsCheckpoint([src / "model.safetensors"]))
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert name in ckpt.names() and name + "_blocks" not in ckpt.names()
    assert ckpt.shape(name) == tuple(reference.state_dict()[name].shape) == (6, 64, 64)
    np.testing.assert_array_equal(ckpt.load_index(name, 4), reference.state_dict()[name][4].numpy())
