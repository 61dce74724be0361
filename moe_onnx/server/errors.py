"""Every failure the server answers with: an HTTP status and an OpenAI-style JSON body.

``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``, as the OpenAI API and
vLLM send it, so that clients (the ``openai`` package among them) raise their usual exceptions.
"""

from __future__ import annotations

from pydantic import ValidationError

from moe_onnx.server.schemas import ErrorBody, ErrorResponse


class ApiError(Exception):
    """An answer other than 200: ``status`` and the fields of the JSON error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param,
                                             code=self.code))


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def from_validation(err: ValidationError) -> ApiError:
    """The first problem pydantic found, naming its field (``messages.0.content``)."""
    first = err.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = f"'{param}' is required"
    elif param:
        message = f"'{param}': {message}"
    return bad_request(message, param=param)


def queue_full(max_batch: int, max_queue: int, retry_after_s: int = 1) -> ApiError:
    """429 with ``Retry-After``: a slot frees as soon as any request ends, which is soon."""
    return ApiError(429, f"the server is full ({max_batch} requests decoding, {max_queue} waiting): "
                    f"retry in {retry_after_s} s", type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(retry_after_s)})


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, type="server_error", code="unavailable")
