"""Events of a job (:mod:`moe_onnx.server.batching`) as OpenAI response objects: whole answers
and the chunks of a stream, for completions and for chat."""

from __future__ import annotations

import time
import uuid

from moe_onnx.server.batching import Finish
from moe_onnx.server.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionResponse,
    Usage,
)


class CompletionFormat:
    """``text_completion`` objects for one request."""

    prefix = "cmpl"

    def __init__(self, model: str, prompt_tokens: int, token_ids: bool):
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created, self.model = int(time.time()), model
        self.prompt_tokens, self.token_ids = prompt_tokens, token_ids

    def usage(self, finish: Finish) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=finish.completion_tokens,
                     total_tokens=self.prompt_tokens + finish.completion_tokens)

    def _ids(self, finish: Finish) -> list[int] | None:
        return list(finish.ids) if self.token_ids else None

    def response(self, text: str, finish: Finish):
        choice = CompletionChoice(text=text, finish_reason=finish.reason, token_ids=self._ids(finish))
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice],
                                  usage=self.usage(finish))

    def opening(self) -> list:
        return []

    def delta(self, text: str):
        return self._chunk([CompletionChoice(text=text)])

    def closing(self, finish: Finish):
        choice = CompletionChoice(text="", finish_reason=finish.reason, token_ids=self._ids(finish))
        return self._chunk([choice])

    def usage_chunk(self, finish: Finish):
        return self._chunk([], usage=self.usage(finish))

    def _chunk(self, choices, usage=None):
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=usage)


class ChatFormat(CompletionFormat):
    """``chat.completion`` and ``chat.completion.chunk`` objects for one request."""

    prefix = "chatcmpl"

    def response(self, text: str, finish: Finish):
        choice = ChatChoice(message=ChatMessageOut(content=text), finish_reason=finish.reason,
                            token_ids=self._ids(finish))
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model,
                                      choices=[choice], usage=self.usage(finish))

    def opening(self) -> list:
        return [self._chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])]

    def delta(self, text: str):
        return self._chunk([ChatChunkChoice(delta=ChatDelta(content=text))])

    def closing(self, finish: Finish):
        choice = ChatChunkChoice(delta=ChatDelta(), finish_reason=finish.reason, token_ids=self._ids(finish))
        return self._chunk([choice])

    def _chunk(self, choices, usage=None):
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices,
                                   usage=usage)
