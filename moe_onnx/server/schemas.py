"""The OpenAI API's requests and responses as typed models, apart from the serving logic.

Requests are strict (``"max_tokens": "5"`` or ``true`` is a 400, not a coercion) and ignore
fields they do not know, as vLLM does. Fields that would change the answer in a way this server
cannot honour (``echo``, ``logprobs``, penalties, ``n > 1``) are refused, never silently dropped.
Extensions that vLLM also takes: ``top_k``, ``return_token_ids``, ``add_generation_prompt``,
``chat_template_kwargs``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """What completions and chat share: model, sampling, stop, streaming."""

    model: str | None = None  # None: the first model the server holds
    temperature: float | None = Field(None, ge=0, le=2)  # None: generation_config.json, else 1
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 and 0: no top-k filter
    seed: int | None = None
    stop: Any = None  # a string or a list of strings
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    # OpenAI fields this server takes only at their neutral value
    logprobs: Any = None  # completions: an int (0 asks for the sampled token's); chat: a bool
    top_logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop):
        if stop is None or isinstance(stop, str):
            return stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ValueError("must be a string or a list of strings")
        if len(stop) > 16:
            raise ValueError("at most 16 stop sequences")
        return stop

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        # chat's "logprobs": false asks for none; any other value (0 included) asks for some
        if value is not None and value is not False:
            raise ValueError("logprobs are not supported by this server")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported by this server")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        if value:
            raise ValueError("logit_bias is not supported by this server")
        return value

    @property
    def stops(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stop if s)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: one prompt, as text or token ids."""

    prompt: Any  # text or token ids, or a list of one of them
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("one prompt per request (a list of several is not supported)")
            prompt = prompt[0]
        ids = isinstance(prompt, list) and all(type(i) is int for i in prompt)
        if not isinstance(prompt, str) and not ids:
            raise ValueError("must be a string or a list of integer token ids")
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported by this server")
        return echo

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, best_of):
        if best_of not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return best_of

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix):
        if suffix:
            raise ValueError("suffix is not supported by this server")
        return suffix


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; fields beyond role and content (``name``, ``tool_calls``) reach the template."""

    model_config = ConfigDict(strict=True, extra="allow")

    role: str = Field(min_length=1)
    content: Any = None  # text, a list of text parts, or None

    @field_validator("content")
    @classmethod
    def _text_only(cls, content):
        if content is None or isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ValueError("must be a string or a list of content parts")
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ValueError('only text parts are supported: {"type": "text", "text": "..."}')
        return [TextPart(type="text", text=part["text"]) for part in content]

    def for_template(self) -> dict:
        """The message as the template sees it: text parts joined (as vLLM's "string" content
        format does), keys whose value is None dropped (as transformers does)."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "\n".join(part.text for part in self.content)
        return message


RENDER_VARIABLES = frozenset({"messages", "tools", "documents"})  # the template's, from the request


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: max_completion_tokens, else the context left
    max_completion_tokens: int | None = Field(None, ge=1)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools):
        if tools:
            raise ValueError("tools are not supported by this server")
        return tools

    @field_validator("chat_template_kwargs")
    @classmethod
    def _own_variables(cls, kwargs):
        taken = sorted(set(kwargs or ()) & RENDER_VARIABLES)
        if taken:
            raise ValueError(f"'{taken[0]}' is set by the request itself, not by chat_template_kwargs")
        return kwargs

    @property
    def template_variables(self) -> dict[str, Any]:
        """What the chat template sees beside the messages: ``add_generation_prompt``, then
        ``chat_template_kwargs``, which win (as vLLM merges them)."""
        return {"add_generation_prompt": self.add_generation_prompt, **(self.chat_template_kwargs or {})}

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_tokens is None else self.max_tokens


# -- responses ---------------------------------------------------------------------------------
def _omitted_when_none():
    return Field(None, exclude_if=lambda value: value is None)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None
    token_ids: list[int] | None = _omitted_when_none()  # vLLM's return_token_ids


class CompletionResponse(BaseModel):
    """A whole answer, or (``usage`` None unless asked for) one streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = _omitted_when_none()


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: FinishReason
    token_ids: list[int] | None = _omitted_when_none()  # vLLM's return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = _omitted_when_none()
    content: str | None = _omitted_when_none()


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None
    token_ids: list[int] | None = _omitted_when_none()  # vLLM's return_token_ids


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = _omitted_when_none()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moe-onnx"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
