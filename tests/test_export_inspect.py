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
