"""Progress of the weights on stderr: on a terminal or when asked; silent when piped or --quiet."""

import io
import re
import sys
from pathlib import Path

import onnx
import pytest
from models import make_model

import moe_onnx
from moe_onnx.cli import main
from moe_onnx.exporter.progress import WeightProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def src(tmp_path) -> Path:
    make_model("mixtral").save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def external_weights(out: Path) -> tuple[int, int]:
    """Tensors stored in model.onnx_data, and its size."""
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    count = sum(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    return count, (out / "model.onnx_data").stat().st_size


def final_line(stderr: str) -> str:
    return re.split(r"[\r\n]", stderr.rstrip("\n"))[-1].rstrip()


def test_progress_forced_on_ends_with_tensors_and_bytes(src, tmp_path, capsys):
    out = moe_onnx.export(src, tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    count, size = external_weights(out)
    assert count > 10
    line = final_line(err)
    assert line.startswith("wrote weights:") and f" {count} tensors, {size / 1e6:.1f} MB in " in line, line
    assert "MB/s" in line and err.endswith("\n")


def test_no_progress_when_stderr_is_not_a_terminal(src, tmp_path, capsys):
    moe_onnx.export(src, tmp_path / "out")
    assert capsys.readouterr().err == ""


def run_cli(args: list[str], monkeypatch) -> str:
    """The export command with stderr a terminal; returns what it wrote there."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    main.main(args, standalone_mode=False)
    return terminal.getvalue()


def test_cli_shows_progress_on_a_terminal_unless_quiet(src, tmp_path, monkeypatch):
    err = run_cli(["export", str(src), "-o", str(tmp_path / "out")], monkeypatch)
    assert "\rwriting weights: 0/" in err and final_line(err).startswith("wrote weights:"), err
    err = run_cli(["export", str(src), "-o", str(tmp_path / "quiet"), "--quiet"], monkeypatch)
    assert err == ""
    assert (tmp_path / "quiet" / "model.onnx").is_file()


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Tensor:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes


def test_line_shows_counts_rate_and_eta():
    stream, clock = io.StringIO(), Clock()
    bar = WeightProgress(4, 400_000_000, stream, interval=0.0, clock=clock)
    for t in range(4):
        clock.now = float(t)
        bar(Tensor(100_000_000))
    assert stream.getvalue().split("\r")[-1] == (
        "writing weights: 3/4 tensors, 300.0 MB/400.0 MB, 100 MB/s, ETA 0:01"
    )
    clock.now = 4.0
    bar.finish()
    assert final_line(stream.getvalue()) == "wrote weights: 4 tensors, 400.0 MB in 4.0 s (100 MB/s)"


def test_failed_write_ends_the_line():
    """An error message after a progress line starts on a line of its own."""
    stream = io.StringIO()
    bar = WeightProgress(2, 2_000, stream, interval=0.0)
    bar(Tensor(1_000))
    bar.abort()
    assert stream.getvalue().endswith("\n") and "wrote" not in stream.getvalue()
