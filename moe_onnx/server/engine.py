"""One served export: its session, chat template and scheduler, and requests made into jobs.

Everything a request can get wrong about the model (text without a tokenizer, ids outside the
vocabulary, a prompt and ``max_tokens`` beyond the context, chat without a template) is found
here, before the job is queued, and answered as a 400 naming the field.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from moe_onnx.runtime.session import Session
from moe_onnx.runtime.tokenizer import no_tokenizer_message
from moe_onnx.server.batching import BATCHING, Job, Sampling, Scheduler
from moe_onnx.server.chat import ChatTemplate, ChatTemplateError
from moe_onnx.server.continuous import ContinuousScheduler
from moe_onnx.server.errors import ApiError, bad_request
from moe_onnx.server.schemas import ChatCompletionRequest, CompletionRequest, ModelCard

_OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
# A generous bound on the characters of one token (real vocabularies average ~4): a text longer
# than this many per position cannot fit the context, and is refused before it is tokenized.
MAX_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class Prepared:
    """A validated request: prompt ids, limit, sampling, stop strings."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]

    def job(self, sink) -> Job:
        return Job(self.prompt_ids, self.max_tokens, self.sampling, self.stop, sink)


class ServedModel:
    """An export loaded for serving under ``name``.

    ``batching``: ``continuous`` (:mod:`moe_onnx.server.continuous`; a static-cache export gets
    whole batches instead: its preallocated buffers are not merged) or ``whole``
    (:class:`~moe_onnx.server.batching.Scheduler`). Continuous is the default. ``prefix_cache_mb``:
    continuous batching's prompt cache (:mod:`moe_onnx.server.prefix_cache`) in MiB; 0 turns it off.
    """

    def __init__(self, name: str, session: Session, *, max_batch: int = 8, max_queue: int = 64,
                 gather_s: float = 0.005, batching: str = "continuous", prefill_chunk: int = 256,
                 prefix_cache_mb: float = 256):
        self.name, self.session = name, session
        self.template = ChatTemplate.find(session.path)
        self.defaults = {**_OPENAI_DEFAULTS, **_generation_defaults(session.path)}
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        if batching == "continuous" and session.info.kv_cache != "static":
            self.scheduler = ContinuousScheduler(session, max_batch, max_queue, prefill_chunk,
                                                 prefix_cache_bytes=int(prefix_cache_mb * 2**20))
        else:
            self.scheduler = Scheduler(session, max_batch, max_queue, gather_s)
        self.created = int(time.time())

    @classmethod
    def load(cls, out, *, name: str | None = None, provider: str = "auto", threads: int | None = None,
             **scheduling) -> ServedModel:
        session = Session(out, provider=provider, threads=threads)
        return cls(name or Path(out).resolve().name, session, **scheduling)

    def card(self) -> ModelCard:
        return ModelCard(id=self.name, created=self.created, max_model_len=self.session.info.max_positions)

    # -- requests -> jobs -------------------------------------------------------------------
    def completion(self, req: CompletionRequest) -> Prepared:
        if isinstance(req.prompt, str):
            ids = self._encode(req.prompt, "prompt")
        else:
            ids = list(req.prompt)
        return self._prepare(req, ids, req.max_tokens, "prompt")

    def chat(self, req: ChatCompletionRequest) -> Prepared:
        if self.template is None:
            raise bad_request(
                f"model '{self.name}' has no chat template (no chat_template.jinja, no chat_template "
                "in tokenizer_config.json): use /v1/completions", param="messages",
                code="no_chat_template")
        messages = [m.for_template() for m in req.messages]
        try:
            text = self.template.render(messages, **req.template_variables)
        except ChatTemplateError as err:
            raise bad_request(f"the chat template refused the messages: {err}", param="messages") from None
        ids = self._encode(text, "messages", add_special_tokens=False)
        return self._prepare(req, ids, req.token_limit, "messages")

    def _encode(self, text: str, param: str, add_special_tokens: bool | None = None) -> list[int]:
        if self.session.tokenizer is None:
            raise bad_request(f"model '{self.name}': {no_tokenizer_message(self.session.path)}", param=param)
        context = self.session.info.max_positions
        if len(text) > MAX_CHARS_PER_TOKEN * context:
            raise bad_request(
                f"the prompt has {len(text)} characters; this model's maximum context of {context} "
                f"tokens holds at most {MAX_CHARS_PER_TOKEN * context} ({MAX_CHARS_PER_TOKEN} a token): "
                "shorten the prompt", param=param, code="context_length_exceeded")
        ids = self.session.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        if not ids:
            raise bad_request("the prompt is empty after tokenization", param=param)
        return ids

    def _prepare(self, req, ids: list[int], max_tokens: int | None, prompt_param: str) -> Prepared:
        info = self.session.info
        bad = [i for i in ids if not 0 <= i < info.vocab_size]
        if bad:
            raise bad_request(f"'{prompt_param}': token id {bad[0]} is outside the vocabulary "
                              f"[0, {info.vocab_size})", param=prompt_param)
        left = info.max_positions - len(ids)
        if left < 1:
            raise _too_long(len(ids), 1, info.max_positions, prompt_param)
        if max_tokens is None:
            max_tokens = left
        elif max_tokens > left:
            raise _too_long(len(ids), max_tokens, info.max_positions, "max_tokens")
        return Prepared(ids, max_tokens, self._sampling(req), req.stops)

    def _sampling(self, req) -> Sampling:
        def pick(name):
            value = getattr(req, name)
            return self.defaults[name] if value is None else value

        top_k = pick("top_k")
        seed = None if req.seed is None else req.seed % 2**64  # numpy takes non-negative seeds
        return Sampling(float(pick("temperature")), max(0, int(top_k)), float(pick("top_p")), seed)


def _too_long(prompt: int, new: int, context: int, param: str) -> ApiError:
    return bad_request(
        f"this model's maximum context is {context} tokens; the prompt has {prompt} and "
        f"max_tokens asks for {new} more ({prompt + new}): shorten the prompt or lower max_tokens",
        param=param, code="context_length_exceeded")


def _generation_defaults(out: Path) -> dict:
    """temperature, top_p, top_k from generation_config.json where the export sets them (as vLLM
    takes its defaults); the request's own values win."""
    path = out / "generation_config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}
    valid = {"temperature": lambda v: 0 <= v <= 2, "top_p": lambda v: 0 < v <= 1,
             "top_k": lambda v: isinstance(v, int) and v >= 0}
    return {k: config[k] for k, ok in valid.items()
            if type(config.get(k)) in (int, float) and ok(config[k])}
