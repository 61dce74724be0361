"""Shared by the server tests: a tiny export with a tokenizer and a chat template, a server in a
thread on 127.0.0.1, and a session wrapper whose steps can be slowed and watched."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import uvicorn
from models import make_model

import moe_onnx

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator(["def f(x):\n    return x + 1\n" * 20, "héllo wörld <|user|> <|assistant|>"],
                            trainer)
    return tok


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
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, app):
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=2)
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


class WatchedSession:
    """A session whose generate can sleep ``delay`` per token and counts what it produced, and
    whether the generation was closed early."""

    def __init__(self, session, delay: float = 0.0):
        self._session, self.delay = session, delay
        self.tokens = 0
        self.closed_early = 0

    def __getattr__(self, name):
        return getattr(self._session, name)

    def generate(self, *args, **kwargs):
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
