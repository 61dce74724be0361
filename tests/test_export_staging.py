"""Temporary directories of killed exports are cleaned up by the next export into the same OUT:
only ours (name pattern and marker) and only when their process is gone."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner
from models import make_model

import moe_onnx
from moe_onnx.cli import main

MARKER = ".moe-onnx-partial"


@pytest.fixture
def src(tmp_path) -> Path:
    make_model("llama").save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftover(parent: Path, name: str, owner: dict | None, size: int = 1000) -> Path:
    """A directory as a killed export leaves it: some data, and (when ``owner``) our marker."""
    path = parent / name
    path.mkdir()
    (path / "model.onnx_data").write_bytes(b"\0" * size)
    if owner is not None:
        (path / MARKER).mkdir()
        (path / MARKER / "owner.json").write_text(json.dumps(owner))
    return path


def test_stale_temp_dirs_are_removed_and_others_kept(src, tmp_path, caplog):
    work = tmp_path / "work"
    work.mkdir()
    me = psutil.Process()
    gone = dead_pid()
    stale = [
        leftover(work, ".out.tmp-k1ll3d_0", {"pid": gone, "host": socket.gethostname()}, size=2_000_000),
        leftover(work, ".out.old-k1ll3d_0", {"pid": gone}),
        # The pid now belongs to a later process (this one): the owner is gone all the same.
        leftover(work, ".out.tmp-reused00", {"pid": os.getpid(), "started": me.create_time() - 1000}),
    ]
    kept = [
        leftover(work, ".out.tmp-users000", None),  # our name pattern, no marker: the user's
        leftover(work, ".out.tmp-running0", {"pid": os.getpid(), "started": me.create_time()}),  # running
        leftover(work, ".out.tmp-elsewher", {"pid": gone, "host": "another-machine"}),  # cannot tell
        leftover(work, ".other.tmp-k1ll3d_", {"pid": gone}),  # another OUT's
        leftover(work, ".out.tmp-k1ll3d_0.bak", {"pid": gone}),  # not our pattern
        leftover(work, "out.tmp-k1ll3d_0", {"pid": gone}),
    ]
    with caplog.at_level(logging.WARNING, logger="moe_onnx"):
        out = moe_onnx.export(src, work / "out")
    assert (out / "model.onnx").is_file()
    assert [p for p in stale if p.exists()] == []
    assert [p for p in kept if not (p / "model.onnx_data").is_file()] == []
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == len(stale), messages
    for path in stale:
        assert any(str(path) in m and "\n" not in m for m in messages), (path, messages)
    assert any("2.0 MB" in m for m in messages), messages
    # Nothing of ours is left in or beside the export.
    assert not (out / MARKER).exists()
    assert MARKER not in json.loads((out / "moe_onnx.json").read_text())["files"]
    assert sorted(p.name for p in work.iterdir()) == sorted(["out"] + [p.name for p in kept])


def test_replacing_an_export_leaves_nothing_beside_it(src, tmp_path):
    out = moe_onnx.export(src, tmp_path / "out")
    moe_onnx.export(src, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert not (out / MARKER).exists()


def test_killed_export_is_cleaned_up_by_the_next(src, tmp_path, caplog):
    """``kill -9`` during an export (here while --verify runs), then export again."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "moe_onnx.cli", "export", str(src), "-o", str(out), "--verify"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        temps: list[Path] = []
        while not temps and proc.poll() is None and time.monotonic() < deadline:
            temps = [p for p in tmp_path.glob(".out.tmp-*") if (p / "model.onnx").is_file()]
            time.sleep(0.005)
        assert temps, f"the export ended (rc {proc.returncode}) before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert temps[0].is_dir() and not out.exists()  # what a killed export leaves behind

    with caplog.at_level(logging.WARNING, logger="moe_onnx"):
        result = CliRunner().invoke(main, ["export", str(src), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert not temps[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert [r.getMessage() for r in caplog.records if str(temps[0]) in r.getMessage()]


def test_interrupted_export_leaves_nothing(src, tmp_path, monkeypatch):
    """Ctrl-C while the side files are written: no OUT, no temporary directory."""
    export_module = sys.modules["moe_onnx.exporter.export"]

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "write_side_files", interrupt)
    result = CliRunner().invoke(main, ["export", str(src), "-o", str(tmp_path / "out")])
    assert result.exit_code == 130 and "interrupted" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_out_gets_the_permissions_of_a_plain_mkdir(tmp_path):
    import os

    from models import make_model

    import moe_onnx

    out = moe_onnx.export(make_model("llama", num_hidden_layers=1), tmp_path / "out")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
