"""``moe-onnx serve``: load the exports, then serve them with uvicorn (or Ray Serve)."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from moe_onnx.errors import MoeOnnxError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """What ``moe-onnx serve`` was asked for; a Ray replica builds its app from it too."""

    outs: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    provider: str = "auto"
    threads: int | None = None
    max_batch: int = 8
    max_queue: int = 64
    api_key: str | None = None

    def __post_init__(self) -> None:
        if not self.outs:
            raise MoeOnnxError("give at least one export to serve")
        if self.max_batch < 1 or self.max_queue < 0:
            raise MoeOnnxError("--max-batch must be at least 1 and --max-queue at least 0")
        names = [Path(out).resolve().name for out in self.outs]
        if len(set(names)) != len(names):
            raise MoeOnnxError(f"two exports have the same folder name (the model's name): {names}")


def load_models(config: ServeConfig) -> list:
    """One :class:`~moe_onnx.server.engine.ServedModel` per export."""
    from moe_onnx.runtime import threads
    from moe_onnx.server.engine import ServedModel

    if len(config.outs) > 1 and config.threads:  # one pool, so no model's threads spin beside another's
        threads.share_threads(config.threads)
    return [ServedModel.load(out, provider=config.provider, threads=config.threads,
                             max_batch=config.max_batch, max_queue=config.max_queue)
            for out in config.outs]


def build(config: ServeConfig):
    """The Starlette app of ``config``, models loaded."""
    from moe_onnx.server.app import build_app

    return build_app(load_models(config), config.api_key)


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
