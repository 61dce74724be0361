"""``moe-onnx serve --ray --replicas 2`` on loopback: both replicas answer (each its own session
and batches), streaming passes Ray Serve's proxy, a short load is answered in full and checked."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("ray.serve",
                    reason="ray is not installed: pip install -e '.[ray]' for the Ray Serve test")
openai = pytest.importorskip("openai", reason="the server tests need the openai client (the test extra)")

from test_server_support import tiny_export  # noqa: E402

from studies.serve_http import get as _get  # noqa: E402
from studies.serve_load import own_server, run_load  # noqa: E402


def test_two_ray_replicas_behind_the_proxy(tmp_path):
    out = tiny_export(tmp_path / "tiny")
    with own_server(str(out), threads=1, max_batch=4, max_queue=16, replicas=2) as (url, _):
        pids = set()
        deadline = time.time() + 30
        while len(pids) < 2 and time.time() < deadline:
            pids.add(_get(url, "/health")["pid"])
        assert len(pids) == 2, "one replica answered every /health"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        whole = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=8, temperature=0)
        streamed = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=8, temperature=0,
                                             stream=True)
        assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
        report = run_load(url, clients=8, requests=32, max_tokens=8)
        counts = (report.ok, report.bad, report.mismatched, report.duplicate_ids)
        assert counts == (32, 0, 0, 0), report.problems
