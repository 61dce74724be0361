"""A request body as an OpenAI client sends it: read under a size and a time limit, then decoded
as a JSON object of valid Unicode strings nested at most :data:`MAX_DEPTH` deep.

The size is counted as the body arrives, so a ``Transfer-Encoding: chunked`` body is held to the
same :data:`MAX_BYTES` as one with a ``Content-Length``. Each failure is an :class:`ApiError`
(413, 408 or 400), the 400s naming the field where one is to blame.
"""

from __future__ import annotations

import asyncio
import json
import re

from starlette.requests import Request

from moe_onnx.server.errors import ApiError, bad_request

MAX_BYTES = 4 << 20
MAX_DEPTH = 32  # an OpenAI request nests a tool's JSON schema a few levels deep, nothing more
READ_TIMEOUT_S = 30.0
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


async def read(request: Request, max_bytes: int | None = None, timeout_s: float | None = None) -> bytes:
    """The whole body, or 413 as soon as it passes ``max_bytes``, or 408 past ``timeout_s``
    (:data:`MAX_BYTES`, :data:`READ_TIMEOUT_S` unless given)."""
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    timeout_s = READ_TIMEOUT_S if timeout_s is None else timeout_s
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    try:
        return await asyncio.wait_for(_read_all(request, max_bytes), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s",
                       code="timeout") from None


async def _read_all(request: Request, max_bytes: int) -> bytes:
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        parts.append(chunk)
    return b"".join(parts)


def decode(raw: bytes) -> dict:
    """The body as a JSON object; 400 for anything else."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise bad_request(f"the body is not UTF-8 (byte {err.start})", code="malformed_json") from None
    try:
        body = json.loads(text)
    except RecursionError:  # deeper than the interpreter recurses: find the field by its brackets
        raise _too_deep(_deep_field(raw)) from None
    except ValueError as err:
        raise bad_request(f"the body is not valid JSON: {err}", code="malformed_json") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    _check_values(body)
    return body


def _check_values(body: dict) -> None:
    """No string holds a lone surrogate (it cannot be encoded, so no tokenizer takes it) and no
    value nests deeper than MAX_DEPTH (templates and serializers recurse)."""
    stack = [(value, (key,), 1) for key, value in body.items()]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                field = ".".join(map(str, path))
                raise bad_request(f"'{field}' holds a lone UTF-16 surrogate (not valid Unicode)",
                                  param=field)
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise _too_deep(str(path[0]))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((v, (*path, k), depth + 1) for k, v in items if isinstance(v, (str, dict, list)))


def _deep_field(raw: bytes) -> str | None:
    """The top-level key whose value nests past MAX_DEPTH, by scanning brackets and strings."""
    depth, key = 0, None
    for token in _JSON_TOKENS.finditer(raw):
        text = token.group()
        if text in (b"[", b"{"):
            depth += 1
            if depth > MAX_DEPTH + 1:
                return key
        elif text in (b"]", b"}"):
            depth -= 1
        elif depth == 1:  # a key of the body, or a string value (the next key replaces it)
            key = text[1:-1].decode("utf-8", "replace")
    return None


def _too_deep(field: str | None) -> ApiError:
    where = f"'{field}'" if field else "the body"
    return bad_request(f"{where} nests more than {MAX_DEPTH} levels deep", param=field)


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the request body is over {max_bytes} bytes", code="request_too_large")
