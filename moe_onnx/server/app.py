"""The OpenAI-compatible HTTP app (Starlette): routes, streaming, errors, the API key.

    GET  /health                 no key needed; per-model queue and batch counts
    GET  /v1/models
    POST /v1/completions         text or token-id prompt; "stream": true for server-sent events
    POST /v1/chat/completions    the export's chat template

Every error is an OpenAI-style JSON body (:mod:`moe_onnx.server.errors`); a body over 4 MB is
413 however it is sent (:mod:`moe_onnx.server.body`); a full queue is 429 with ``Retry-After``.
A request is decoded, validated and tokenized on a worker thread, never on the event loop. A
client that goes away cancels its job: dropped while it waits, its row stopped at the next token
while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moe_onnx.server import body
from moe_onnx.server.batching import Closed, Delta, Failure, Finish, QueueFull
from moe_onnx.server.engine import Prepared, ServedModel
from moe_onnx.server.errors import ApiError, from_validation, queue_full, unavailable
from moe_onnx.server.responses import ChatFormat, CompletionFormat
from moe_onnx.server.schemas import ChatCompletionRequest, CompletionRequest, ModelList

log = logging.getLogger(__name__)


class ServerState:
    """What the routes share: the models by name and the API key."""

    def __init__(self, models: list[ServedModel], api_key: str | None = None):
        self.models = {m.name: m for m in models}
        if len(self.models) != len(models):
            raise ValueError("two served models have the same name")
        if api_key is not None and not api_key.strip():
            # an empty key would let in exactly the requests that send none
            raise ValueError("the API key is empty: give a key, or None to serve without one")
        self.api_key = api_key

    def model(self, name: str | None) -> ServedModel:
        if name is None:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise ApiError(404, f"the model '{name}' does not exist; this server has "
                           f"{', '.join(self.models)}", param="model", code="model_not_found")
        return self.models[name]


def build_app(models: list[ServedModel], api_key: str | None = None) -> Starlette:
    """The app over loaded models; their decode threads start and stop with its lifespan."""
    state = ServerState(models, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for m in models:
            m.scheduler.start()
        yield
        for m in models:
            await asyncio.to_thread(m.scheduler.close)

    routes = [
        Route("/health", _route(health, None), methods=["GET"]),
        Route("/v1/models", _route(list_models, state), methods=["GET"]),
        Route("/v1/completions", _route(completions, state), methods=["POST"]),
        Route("/v1/chat/completions", _route(chat_completions, state), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.server = state
    return app


def _route(handler, guard: ServerState | None):
    """``handler`` with the API key check (unless ``guard`` is None) and errors as JSON."""

    async def endpoint(request: Request) -> Response:
        try:
            if guard is not None and guard.api_key is not None:
                _check_key(request, guard.api_key)
            return await handler(request, request.app.state.server)
        except ApiError as err:
            return _error(err)

    return endpoint


def _check_key(request: Request, key: str) -> None:
    given = request.headers.get("authorization", "")
    token = given[7:] if given[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise ApiError(401, "a valid API key is needed: 'Authorization: Bearer KEY'",
                       code="invalid_api_key")


# -- routes -------------------------------------------------------------------------------------
async def health(request: Request, state: ServerState) -> Response:
    counts = {name: {"running": m.scheduler.running, "waiting": m.scheduler.waiting, **m.scheduler.stats}
              for name, m in state.models.items()}
    return JSONResponse({"status": "ok", "pid": os.getpid(), "models": counts})


async def list_models(request: Request, state: ServerState) -> Response:
    return _json(ModelList(data=[m.card() for m in state.models.values()]))


async def completions(request: Request, state: ServerState) -> Response:
    return await _generate(request, state, CompletionRequest, ServedModel.completion, CompletionFormat)


async def chat_completions(request: Request, state: ServerState) -> Response:
    return await _generate(request, state, ChatCompletionRequest, ServedModel.chat, ChatFormat)


async def _generate(request: Request, state: ServerState, schema, prepare, answer_format) -> Response:
    """Parse ``schema``, let the model ``prepare`` it, answer in ``answer_format`` (both routes).
    Decoding, validating and tokenizing run on a worker thread, so that a large body never holds
    up the event loop (and with it every other request)."""
    raw = await body.read(request)
    req, model, prepared = await asyncio.to_thread(_prepare, raw, state, schema, prepare)
    fmt = answer_format(model.name, len(prepared.prompt_ids), req.return_token_ids)
    return await _answer(request, model, prepared, req, fmt)


# -- request in, answer out ---------------------------------------------------------------------
def _prepare(raw: bytes, state: ServerState, schema: type[BaseModel], prepare):
    try:
        req = schema.model_validate(body.decode(raw))
    except ValidationError as err:
        raise from_validation(err) from None
    model = state.model(req.model)
    return req, model, prepare(model, req)


async def _answer(request: Request, model: ServedModel, prepared: Prepared, req,
                  fmt: CompletionFormat) -> Response:
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def sink(event):  # called on the decode thread
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
            loop.call_soon_threadsafe(events.put_nowait, event)

    job = prepared.job(sink)
    try:
        model.scheduler.submit(job)
    except QueueFull:
        raise queue_full(model.scheduler.max_batch, model.scheduler.max_queue) from None
    except Closed:
        raise unavailable("the server is shutting down") from None
    if req.stream:
        return StreamingResponse(_stream(events, job, model, fmt, req.include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    collect = asyncio.ensure_future(_collect(events))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():
            collect.cancel()
            model.scheduler.cancel(job)
    if not collect.done() or collect.cancelled():
        return Response(status_code=499)  # the client left; nobody reads this
    text, end = collect.result()
    if isinstance(end, Failure):
        raise ApiError(end.status, end.message, type="server_error")
    return _json(fmt.response(text, end))


async def _collect(events: asyncio.Queue) -> tuple[str, Finish | Failure]:
    parts = []
    while True:
        event = await events.get()
        if isinstance(event, Delta):
            parts.append(event.text)
        else:
            return "".join(parts), event


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(events: asyncio.Queue, job, model: ServedModel, fmt: CompletionFormat,
                  include_usage: bool):
    ended = False
    try:
        for chunk in fmt.opening():
            yield _sse(chunk)
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield _sse(fmt.delta(event.text))
                continue
            ended = True
            if isinstance(event, Finish):
                yield _sse(fmt.closing(event))
                if include_usage:
                    yield _sse(fmt.usage_chunk(event))
            else:
                yield _sse(ApiError(event.status, event.message, type="server_error").body())
            yield "data: [DONE]\n\n"
            return
    finally:
        if not ended:  # cancelled: the client disconnected
            model.scheduler.cancel(job)


def _sse(obj: BaseModel) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


def _json(obj: BaseModel, status: int = 200) -> Response:
    return Response(obj.model_dump_json(), status_code=status, media_type="application/json")


def _error(err: ApiError) -> Response:
    response = _json(err.body(), err.status)
    response.headers.update(err.headers)
    return response


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    path = request.url.path
    message = {404: f"no route {path}", 405: f"{request.method} is not allowed on {path}"}
    return _error(ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail)), type=kind))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("moe-onnx serve: %s %s failed", request.method, request.url.path)
    return _error(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error"))
