"""Bad input: one readable message, exit code != 0, no traceback, nothing half-written left behind."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from models import make_model

from moe_onnx.cli import main


@pytest.fixture
def src(tmp_path) -> Path:
    make_model("mixtral").save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def run_export(src, out, *extra):
    result = CliRunner().invoke(main, ["export", str(src), "-o", str(out), *extra])
    return result


def assert_clean_failure(result, out: Path, *words):
    assert result.exit_code != 0
    message = result.output.strip()
    assert "Traceback" not in message and message.count("\n") == 0, message
    assert message.startswith("error:"), message
    for word in words:
        assert word in message, message
    assert not out.exists() or not any(out.iterdir())
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


def test_unknown_model_type_lists_supported(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt_bigcode"
    (src / "config.json").write_text(json.dumps(cfg))
    result = run_export(src, tmp_path / "out")
    assert_clean_failure(result, tmp_path / "out", "gpt_bigcode", "mixtral", "qwen3_moe", "llama")


def test_missing_config(src, tmp_path):
    (src / "config.json").unlink()
    assert_clean_failure(run_export(src, tmp_path / "out"), tmp_path / "out", "config.json")


def test_truncated_safetensors_names_the_file(src, tmp_path):
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    assert_clean_failure(run_export(src, tmp_path / "out"), tmp_path / "out", "truncated", str(path))


def test_corrupt_safetensors_header_names_the_file(src, tmp_path):
    path = src / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json!!!!"
    path.write_bytes(bytes(data))
    assert_clean_failure(run_export(src, tmp_path / "out"), tmp_path / "out", "corrupt", str(path))


def test_missing_tensor_is_named(src, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(src / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    result = run_export(src, tmp_path / "out")
    assert_clean_failure(result, tmp_path / "out", "model.layers.1.self_attn.k_proj.weight", "missing")


def test_shape_disagreeing_with_config(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 50
    (src / "config.json").write_text(json.dumps(cfg))
    result = run_export(src, tmp_path / "out")
    assert_clean_failure(result, tmp_path / "out", "shape", "config.json")


def test_out_not_empty_is_refused_unless_force(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_export(src, out)
    assert result.exit_code != 0 and "--force" in result.output
    assert (out / "keep.txt").read_text() == "precious"
    result = run_export(src, out, "--force")
    assert result.exit_code == 0, result.output
    assert (out / "model.onnx").exists() and not (out / "keep.txt").exists()


def test_failed_verify_leaves_nothing(src, tmp_path, monkeypatch):
    """A verification failure (forced by a zero tolerance) removes the temporary output."""
    from moe_onnx.exporter import verify

    monkeypatch.setitem(verify.TOLERANCE, "fp32", 0.0)
    result = run_export(src, tmp_path / "out", "--verify")
    assert result.exit_code != 0
    assert "verification failed" in result.output
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


class _Payload:
    """Unpickling this calls a function (a harmless print here; os.system in a real attack)."""

    def __reduce__(self):
        return (print, ("UNPICKLED: CODE RAN",))


@pytest.mark.parametrize("fmt", ["torch.save", "pickle protocol 4"])
def test_pickle_that_runs_code_is_refused_in_one_line(src, tmp_path, fmt):
    """The real CLI (a subprocess, so torch's warnings reach stderr as a user sees them)."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    bin_path = src / "pytorch_model.bin"
    if fmt == "torch.save":
        torch.save({**state, "extra": _Payload()}, bin_path)
    else:
        bin_path.write_bytes(pickle.dumps({"extra": _Payload()}, protocol=4))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "moe_onnx.cli", "export", str(src), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc
    assert "UNPICKLED" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert str(bin_path) in lines[0] and "not a plain tensor checkpoint" in lines[0], lines[0]
    assert "weights_only" not in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_missing_source(tmp_path):
    result = run_export(tmp_path / "nope", tmp_path / "out")
    assert_clean_failure(result, tmp_path / "out", "does not exist")


def test_inspect_on_non_export(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code != 0 and "not a moe-onnx export" in result.output


def test_cli_export_and_inspect(src, tmp_path):
    result = run_export(src, tmp_path / "out", "--verify")
    assert result.exit_code == 0, result.output
    assert "max rel err" in result.output
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    for word in ("mixtral", "E=6", "k=3", "active per token", "past_key_values.0.key", "model.onnx_data"):
        assert word in result.output, word
