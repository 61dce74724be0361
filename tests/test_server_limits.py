"""The server's limits against a hostile or careless client, on a real uvicorn on 127.0.0.1: a
body over the size limit however it is sent, a prompt longer than any context holds, a
tokenization that must not hold up other requests, connections that idle or trickle their
headers, an empty API key, bind warnings."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra: pip install -e '.[serve]'")

from test_server_support import (  # noqa: E402
    CountingTokenizer,
    LiveServer,
    WatchedSession,
    closed_within,
    raw_connection,
    request,
    tiny_export,
)

import moe_onnx.runtime as rt  # noqa: E402
from moe_onnx.server.app import build_app  # noqa: E402
from moe_onnx.server.engine import ServedModel  # noqa: E402

MB = 1 << 20


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("limits") / "tiny")


@pytest.fixture(scope="module")
def session(export):
    return rt.load(export, provider="cpu", threads=1)


@pytest.fixture(scope="module")
def server(session):
    with LiveServer(build_app([ServedModel("tiny", session)])) as live:
        yield live


def _status_line(sock) -> bytes:
    reader = sock.makefile("rb")
    line = reader.readline()
    reader.close()
    return line


def _send_chunked(sock, total: int, piece: int = 64 << 10) -> None:
    """A chunked body of ``total`` bytes (not JSON); stops quietly once the server hangs up."""
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = f"{piece:x}\r\n".encode() + b"x" * piece + b"\r\n"
    try:
        for _ in range(total // piece):
            sock.sendall(chunk)
        sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass


def test_a_chunked_body_over_the_limit_is_413(server):
    with raw_connection(server.url) as sock:
        _send_chunked(sock, 5 * MB)
        assert _status_line(sock).startswith(b"HTTP/1.1 413"), "a 5 MB chunked body was read whole"
    with raw_connection(server.url) as sock:  # under the limit, chunked is read as usual
        _send_chunked(sock, 1 * MB)
        assert _status_line(sock).startswith(b"HTTP/1.1 400")
    status, _, body = request(server.url, "POST", "/v1/completions", b"x" * (5 * MB))
    assert status == 413 and body["error"]["message"]


def test_a_body_that_trickles_in_is_408(server, monkeypatch):
    monkeypatch.setattr("moe_onnx.server.body.READ_TIMEOUT_S", 1.0)
    with raw_connection(server.url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")  # and the rest never comes
        started = time.time()
        assert _status_line(sock).startswith(b"HTTP/1.1 408")
        assert time.time() - started < 5


def test_a_prompt_no_context_holds_is_refused_before_tokenizing(session):
    counting = CountingTokenizer(session.tokenizer)
    model = ServedModel("tiny", WatchedSession(session, tokenizer=counting))
    with LiveServer(build_app([model])) as live:
        huge = "def f(x): return x\n" * 2000  # 38,000 characters for a context of 256 tokens
        status, _, body = request(live.url, "POST", "/v1/completions", {"prompt": huge})
        assert status == 400 and body["error"]["param"] == "prompt", body
        assert body["error"]["code"] == "context_length_exceeded"
        messages = [{"role": "user", "content": huge}]
        status, _, body = request(live.url, "POST", "/v1/chat/completions", {"messages": messages})
        assert status == 400 and body["error"]["param"] == "messages", body
        assert counting.encoded == 0, "the text was tokenized before its length was checked"
        status, _, _ = request(live.url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 200 and counting.encoded == 1


def test_tokenizing_does_not_hold_up_other_requests(session):
    gate = threading.Event()
    held = CountingTokenizer(session.tokenizer, gate=gate)
    model = ServedModel("tiny", WatchedSession(session, tokenizer=held))
    with LiveServer(build_app([model])) as live:
        answer = {}
        slow = threading.Thread(target=lambda: answer.update(r=request(
            live.url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})))
        slow.start()
        try:
            assert held.entered.wait(10)
            status, _, body = request(live.url, "GET", "/health", timeout=3)
            assert status == 200 and body["status"] == "ok"
        finally:
            gate.set()
            slow.join(30)
        assert answer["r"][0] == 200


def test_idle_and_trickling_connections_are_closed(session):
    with LiveServer(build_app([ServedModel("tiny", session)]), keep_alive_s=0.5, headers_s=1.0) as live:
        with raw_connection(live.url) as idle:  # opened, never used
            assert closed_within(idle, 4), "an idle connection was kept"
        with raw_connection(live.url) as slow:  # one header line every 0.2 s, forever
            slow.sendall(b"GET /health HTTP/1.1\r\n")
            closed, deadline = False, time.time() + 4
            while not closed and time.time() < deadline:
                try:
                    slow.sendall(b"X-Slow: 1\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                closed = closed_within(slow, 0.2)
            assert closed, "a client trickling its headers was kept"
        with raw_connection(live.url) as used:  # answered, then idle past keep-alive
            used.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _status_line(used).startswith(b"HTTP/1.1 200")
            assert closed_within(used, 4)
        assert request(live.url, "GET", "/health")[0] == 200


def test_a_full_queue_says_when_to_retry(session):
    slow = WatchedSession(session, delay=0.05)
    model = ServedModel("tiny", slow, max_batch=1, max_queue=0)
    with LiveServer(build_app([model])) as live:
        busy = threading.Thread(target=lambda: request(
            live.url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 40, "temperature": 0}))
        busy.start()
        try:
            deadline = time.time() + 10
            while model.scheduler.running == 0 and time.time() < deadline:
                time.sleep(0.01)
            status, headers, body = request(live.url, "POST", "/v1/completions", {"prompt": "x"})
            assert status == 429 and body["error"]["code"] == "queue_full"
            assert int(headers["Retry-After"]) >= 1
        finally:
            busy.join(30)


def test_an_empty_api_key_is_refused(session, tmp_path):
    """An empty key would let in exactly the requests without one."""
    with pytest.raises(ValueError, match="empty"):
        build_app([ServedModel("tiny", session)], api_key="")
    cli = [sys.executable, "-m", "moe_onnx.cli", "serve", str(tmp_path / "never-loaded"), "--port", "9"]
    for extra, env in (["--api-key", ""], _without_key()), ([], {**_without_key(), "MOE_ONNX_API_KEY": ""}):
        done = subprocess.run([*cli, *extra], capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 2 and "--api-key" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_a_bind_beyond_loopback_without_a_key_warns(tmp_path):
    missing = str(tmp_path / "no-such-export")  # the warning comes first; then the load fails
    cli = [sys.executable, "-m", "moe_onnx.cli", "serve", missing, "--host", "0.0.0.0", "--port", "9"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=60, env=_without_key())
    assert "0.0.0.0 without --api-key" in done.stderr, done.stderr
    keyed = subprocess.run([*cli, "--api-key", "k"], capture_output=True, text=True, timeout=60,
                           env=_without_key())
    assert "without --api-key" not in keyed.stderr and keyed.returncode != 0


def _without_key() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "MOE_ONNX_API_KEY"}
