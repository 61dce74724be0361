"""``moe-onnx serve``: load the exports, then serve them with uvicorn (or Ray Serve)."""

from __future__ import annotations

import ipaddress
import logging
import os

from moe_onnx.errors import MoeOnnxError
from moe_onnx.runtime.threads import share_threads
from moe_onnx.server.config import ServeConfig, build

log = logging.getLogger(__name__)


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
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=5)


def _warn_if_exposed(config: ServeConfig) -> None:
    try:
        loopback = ipaddress.ip_address(config.host).is_loopback
    except ValueError:
        loopback = config.host == "localhost"
    if not loopback and config.api_key is None:
        log.warning("moe-onnx serve: listening on %s without --api-key: anyone who reaches it can "
                    "use the model", config.host)
