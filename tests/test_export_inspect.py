"""``moe-onnx inspect``: what it says about an export, checked against the export's own facts."""

import re

from click.testing import CliRunner
from models import make_model

import moe_onnx
from moe_onnx import manifest
from moe_onnx.cli import main


def test_inspect_quotes_the_cache_at_no_more_positions_than_the_model_has(tmp_path):
    model = make_model("mixtral", max_position_embeddings=1024)
    out = moe_onnx.export(model, tmp_path / "out")
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("kv cache"))
    quoted = re.search(r"\(([\d.]+) MB at (\d+) positions", line)
    assert quoted and int(quoted[2]) == 1024, line
    per_position = manifest.read(out).kv_bytes_per_token
    assert float(quoted[1]) == round(per_position * 1024 / 1e6, 1), line


def test_verify_on_int4_labels_the_quantization_error_and_ends_with_the_verdict(tmp_path):
    """The int4 export's error against the source model is reported as quantization error, not
    as the check; the line that decides (the same dequantized weights) says it passed and against
    which tolerance."""
    src = tmp_path / "src"
    make_model("mixtral").save_pretrained(src)
    args = ["export", str(src), "-o", str(tmp_path / "out"), "--weights", "int4", "--verify"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = [x for x in result.output.splitlines() if "max rel err" in x]
    assert len(lines) == 2, result.output
    quantization = "quantization error vs source (int4, block 32; reported, not checked): "
    assert lines[0].startswith(quantization), lines
    assert lines[1].startswith("verify (fp32 against the same dequantized weights): "), lines
    assert lines[1].endswith(": passed (fp32 tolerance 0.0001)"), lines


def test_verify_on_a_float_export_states_its_verdict(tmp_path):
    src = tmp_path / "src"
    make_model("mixtral").save_pretrained(src)
    result = CliRunner().invoke(main, ["export", str(src), "-o", str(tmp_path / "out"), "--verify"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "max rel err" in x)
    assert line.startswith("verify (fp32): ") and line.endswith(": passed (fp32 tolerance 0.0001)"), line
