"""A bounded load on the server (16 clients, 96 requests, streaming and not): every request gets
a complete, well-formed answer equal to its prompt's answer alone, or a clean 429; none lost or
duplicated. Figures are printed, never asserted (BENCHMARKS.md has them)."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra: pip install -e '.[serve]'")

from test_server_support import LiveServer, tiny_export  # noqa: E402

import moe_onnx.runtime as rt  # noqa: E402
from moe_onnx.server.app import build_app  # noqa: E402
from moe_onnx.server.engine import ServedModel  # noqa: E402
from studies.serve_load import format_report, run_load  # noqa: E402


def test_load_every_request_answered_once_or_refused_cleanly(tmp_path):
    session = rt.load(tiny_export(tmp_path / "tiny"), provider="cpu", threads=1)
    model = ServedModel("tiny", session, max_batch=4, max_queue=6)
    with LiveServer(build_app([model])) as live:
        report = run_load(live.url, clients=16, requests=96, max_tokens=16)
        print(format_report(report))
        assert report.ok + report.rejected == 96, report.problems
        assert (report.bad, report.mismatched, report.duplicate_ids) == (0, 0, 0), report.problems
        assert report.ok >= 16 and model.scheduler.stats["largest_batch"] > 1
        assert model.scheduler.running == 0 and model.scheduler.waiting == 0
