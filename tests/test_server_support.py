"""Shared by the server tests: a tiny export with a tokenizer and a chat template, a server in a
thread on 127.0.0.1, and a session wrapper whose steps can be slowed and watched."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path

import uvicorn
from models import byte_level_tokenizer, make_model  # noqa: F401 (test_server imports it here)

import moe_onnx

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_export(folder: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A tiny Qwen3-MoE export with a byte-level tokenizer.json (and a chat template), no EOS
    in generation_config.json so that greedy runs to max_tokens."""
    tok = byte_level_tokenizer()
    model = make_model("qwen3_moe", vocab_size=tok.get_vocab_size(), eos_token_id=None,
                       bos_token_id=None, pad_token_id=None)
    out = moe_onnx.export(model, folder)
    tok.save(str(out / "tokenizer.json"))
    config = {"bos_token": "<eos>", "eos_token": "<eos>", "add_bos_token": False}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a thread, configured as
    ``moe-onnx serve`` configures it (``limits``: its connection time limits)."""

    def __init__(self, app, **limits):
        from moe_onnx.server.run import uvicorn_config

        config = uvicorn_config(app, "127.0.0.1", 0, **limits)
        config.timeout_graceful_shutdown = 2
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def request(url: str, method: str, path: str, body=None, headers=None, timeout: float = 30):
    """``(status, headers, JSON body)`` of one request; ``body`` as bytes, text or JSON."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    raw = body if body is None or isinstance(body, (bytes, str)) else json.dumps(body)
    try:
        conn.request(method, path, raw, {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        return response.status, response.headers, json.loads(data) if data.strip() else {}
    finally:
        conn.close()


def raw_connection(url: str, timeout: float = 10) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (reading whatever it sends first)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


class CountingTokenizer:
    """The session's tokenizer, counting ``encode`` calls; ``gate`` (an Event) holds each
    encode until it is set, ``entered`` is set once one is held."""

    def __init__(self, tokenizer, gate: threading.Event | None = None):
        self._tokenizer, self.gate = tokenizer, gate
        self.encoded = 0
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode(self, *args, **kwargs):
        self.encoded += 1
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        return self._tokenizer.encode(*args, **kwargs)


class WatchedSession:
    """A session whose generate can sleep ``delay`` per token and counts what it produced, and
    whether the generation was closed early; ``batches`` holds the prompts of each streamed
    ``generate`` (each batch the decode thread ran); ``tokenizer`` may be replaced."""

    def __init__(self, session, delay: float = 0.0, tokenizer=None):
        self._session, self.delay = session, delay
        self.tokenizer = tokenizer or session.tokenizer
        self.tokens = 0
        self.closed_early = 0
        self.batches: list[list[list[int]]] = []

    def __getattr__(self, name):
        return getattr(self._session, name)

    def generate(self, *args, **kwargs):
        if kwargs.get("stream"):
            self.batches.append([list(p) for p in args[0]])
        generation = self._session.generate(*args, **kwargs)
        return self._watch(generation) if kwargs.get("stream") else generation

    def _watch(self, generation):
        finished = False
        try:
            for token in generation:
                time.sleep(self.delay)
                self.tokens += 1
                yield token
            finished = True
        finally:
            if not finished:
                self.closed_early += 1


class StepLog:
    """The session, logging each forward's ``(rows, tokens)``."""

    def __init__(self, session):
        self._session, self.steps = session, []

    def __getattr__(self, name):
        return getattr(self._session, name)

    def forward(self, ids, *args, **kwargs):
        self.steps.append(tuple(ids.shape))
        return self._session.forward(ids, *args, **kwargs)
