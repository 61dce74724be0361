"""``moe-onnx serve``: load the exports, then serve them with uvicorn (or Ray Serve)."""

from __future__ import annotations

import ipaddress
import logging
import os

from moe_onnx.errors import MoeOnnxError
from moe_onnx.runtime.threads import share_threads
from moe_onnx.server.config import ServeConfig, build

log = logging.getLogger(__name__)
KEEP_ALIVE_S = 5.0  # uvicorn's own default, stated here beside the header deadline
HEADERS_S = 10.0


def serve(config: ServeConfig, *, ray: bool = False, replicas: int = 1) -> None:
    """Serve until interrupted: one process, or ``replicas`` Ray Serve replicas."""
    _warn_if_exposed(config)
    if ray:
        try:
            from moe_onnx.server.ray_app import serve_with_ray
        except ImportError as err:
            raise MoeOnnxError(f"--ray needs Ray Serve: pip install 'moe-onnx[ray]' ({err})") from None
        return serve_with_ray(config, replicas)
    if replicas != 1:
        raise MoeOnnxError("--replicas needs --ray (one process serves one replica)")
    import uvicorn

    if len(config.outs) > 1:
        # Several models, one process: one onnxruntime thread pool between their sessions, so a
        # model's decode never competes with another's spinning threads (moe_onnx.runtime.threads).
        share_threads(config.threads or os.cpu_count() or 1)
    app = build(config)
    log.warning("moe-onnx serve: %s on http://%s:%d/v1", ", ".join(app.state.server.models),
                config.host, config.port)
    uvicorn.Server(uvicorn_config(app, config.host, config.port)).run()


def uvicorn_config(app, host: str, port: int, *, keep_alive_s: float = KEEP_ALIVE_S,
                   headers_s: float = HEADERS_S):
    """uvicorn's settings for ``app``: an idle connection closed after ``keep_alive_s``, one
    whose request headers are not in ``headers_s`` after it opened (or after its last answer)
    closed too, however slowly they trickle in."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                          timeout_graceful_shutdown=5, timeout_keep_alive=keep_alive_s,
                          http=_with_header_deadline(headers_s))


def _with_header_deadline(seconds: float) -> type:
    """uvicorn's HTTP protocol (httptools, else h11) with a deadline on request headers: uvicorn
    arms its keep-alive timer only after a response, so a connection that never sends a request,
    or sends its headers a line a second, would be kept forever."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderDeadline(AutoHTTPProtocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self._deadline = self.loop.call_later(seconds, self._late)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _late(self) -> None:
            self._deadline = None
            waiting_for_headers = self.cycle is None or self.cycle.response_complete
            if waiting_for_headers and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


def _warn_if_exposed(config: ServeConfig) -> None:
    try:
        loopback = ipaddress.ip_address(config.host).is_loopback
    except ValueError:
        loopback = config.host == "localhost"
    if not loopback and config.api_key is None:
        log.warning("moe-onnx serve: listening on %s without --api-key: anyone who reaches it can "
                    "use the model", config.host)
